// The work of one NUTS leaf around the model call, on the CPU: what `torchebm.samplers.nuts.grow_leaf` does with
// some forty small torch ops, in two calls (the model's energy and gradient stay in Python, between them).
//   nuts_kick_drift: half kick and drift of the leapfrog step, p' = p - h/2 grad, x' = x + h M^-1 p'.
//   nuts_leaf:       the closing half kick, the leaf's weight, the progressive multinomial draw, the level
//                    checkpoints and the U-turn checks of every block the leaf closes, updating the growing
//                    sub-tree's tensors in place (the fields of `GrowingSubtree`, in order, with `Draw` flattened).
// The metric is scalar or diagonal, given as the inverse mass per coordinate. Chains are rows of [n, d] tensors and
// the level checkpoints [L, n, d]; leaf `k` of the sub-tree opens the levels m with 2^m | k and closes those with
// 2^m | k + 1. Checked against the Python `grow_leaf` in tests/test_nuts.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

// No fused multiply-adds here. GCC versions a vectorised loop with a runtime check that its arrays do not overlap,
// and contracts a*b+c into an FMA differently in the vector and the scalar version; which version runs depends on
// where the arrays lie in memory (the last chain's rows sit at the end of their allocations). With contraction the
// same chains gave last-bit differences from run to run in one process (a funnel warm-up at seed 0: 4 adapted step
// sizes in 6 runs); without it both versions round alike, and the arithmetic is that of the torch leaf.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

namespace tebm_nuts {

template <typename T>
T log_add_exp(T a, T b) {  // as torch.logaddexp
  if (std::isinf(a) && a == b) return a;
  const T m = std::max(a, b);
  return m + std::log1p(std::exp(-std::abs(a - b)));
}

// Stan's criterion as nuts.is_turning: a.r <= 0 or b.r <= 0 (false when either product is NaN), with r given by
// a function of the coordinate.
template <typename T, typename R>
bool turning(const T *a, const T *b, int64_t d, R r) {
  T da = 0, db = 0;
  for (int64_t i = 0; i < d; ++i) {
    const T ri = r(i);
    da += a[i] * ri;
    db += b[i] * ri;
  }
  if (std::isnan(da) || std::isnan(db)) return false;
  return da <= 0 || db <= 0;
}

// The rows of one sub-tree's level checkpoints ([L, n, d] tensors): level m of the chain at offset `o` is base + m *
// stride + o.
template <typename T>
struct LevelRows {
  T *v_start, *p_start, *rho_before, *v_end, *p_end;
  int64_t stride;
};

// One leaf of one chain's growing sub-tree, what `grow_leaf` does per chain: the closing half kick p = p' - h/2 grad
// and v = M^-1 p (written to p, v), the weight exp(H0 - H), the progressive multinomial draw (log_u < w - log_w), the
// checkpoints of the `levels` levels and the U-turn checks of every block leaf k closes (with Stan's two checks across
// the halves of blocks of 4 or more leaves). A chain that already stopped only keeps its counts and flags.
template <typename T>
void grow_chain_leaf(int64_t d, int64_t k, int64_t levels, const T *x, T energy, const T *g, const T *ph, T h,
                     const T *M, T h0, T log_u, T max_energy_error, T &log_weight, T &sum_accept, int64_t &n_leapfrog,
                     bool &alive, bool &is_turning, bool &is_divergent, T *rho, T *prop_x, T &prop_energy,
                     T *prop_grad, T &prop_error, const LevelRows<T> &rows, int64_t o, T *p, T *v) {
  const T neg_inf = -std::numeric_limits<T>::infinity(), half = -(T(0.5) * h);
  auto row = [&](T *base, int64_t m) { return base + m * rows.stride + o; };
  T kinetic = 0;
  for (int64_t i = 0; i < d; ++i) {
    p[i] = ph[i] + half * g[i];
    v[i] = p[i] * M[i];
    kinetic += p[i] * v[i];
  }
  const T delta = energy + T(0.5) * kinetic - h0;
  const T w = std::isnan(delta) ? neg_inf : -delta;  // NaN: weight 0
  const bool diverged = w < -max_energy_error, was_alive = alive;
  sum_accept += T(was_alive ? 1 : 0) * std::exp(std::min(w, T(0)));
  const T log_w = log_add_exp(log_weight, w);
  if (log_u < w - log_w) {
    std::copy(x, x + d, prop_x);
    std::copy(g, g + d, prop_grad);
    prop_energy = energy;
    prop_error = delta;
  }
  log_weight = log_w;
  for (int64_t m = 0; m < levels; ++m)
    if (k % (int64_t(1) << m) == 0) {
      std::copy(v, v + d, row(rows.v_start, m));
      std::copy(p, p + d, row(rows.p_start, m));
      std::copy(rho, rho + d, row(rows.rho_before, m));
    }
  for (int64_t i = 0; i < d; ++i) rho[i] += p[i];
  auto closes = [&](int64_t m) { return (k + 1) % (int64_t(1) << m) == 0; };
  bool turn = false;
  for (int64_t m = 1; m < levels; ++m)
    if (closes(m)) {
      const T *rb = row(rows.rho_before, m);
      turn |= turning(row(rows.v_start, m), v, d, [&](int64_t i) { return rho[i] - rb[i]; });
    }
  for (int64_t m = 2; m < levels; ++m)  // across the halves of blocks of 4 or more leaves
    if (closes(m)) {
      const T *rb = row(rows.rho_before, m), *rb_half = row(rows.rho_before, m - 1);
      const T *ps_half = row(rows.p_start, m - 1), *pe_half = row(rows.p_end, m - 1);
      turn |= turning(row(rows.v_start, m), row(rows.v_start, m - 1), d,
                      [&](int64_t i) { return rb_half[i] - rb[i] + ps_half[i]; }) ||
              turning(row(rows.v_end, m - 1), v, d, [&](int64_t i) { return rho[i] - rb_half[i] + pe_half[i]; });
    }
  for (int64_t m = 0; m < levels; ++m)
    if (closes(m)) {
      std::copy(v, v + d, row(rows.v_end, m));
      std::copy(p, p + d, row(rows.p_end, m));
    }
  n_leapfrog += was_alive;
  is_turning = is_turning || turn;
  is_divergent = is_divergent || (was_alive && diverged);
  alive = was_alive && !(turn || diverged);
}

void check_rows(const torch::Tensor &t, const torch::Tensor &x, const char *name, int64_t rows) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == x.scalar_type(), name,
              " must be a contiguous CPU tensor of the chains' dtype");
  TORCH_CHECK(t.numel() == rows, name, " has ", t.numel(), " elements, expected ", rows);
}

void check_flags(const torch::Tensor &t, torch::ScalarType type, const char *name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == type && t.numel() == n, name,
              " must be a contiguous CPU tensor of ", n, " ", c10::toString(type));
}

}  // namespace tebm_nuts

// [x + h M^-1 p', p'] with p' = p - h/2 grad; x, p, grad [n, *dim], h [n] (signed step), inverse [d].
std::vector<torch::Tensor> nuts_kick_drift(torch::Tensor x, torch::Tensor p, torch::Tensor grad, torch::Tensor h,
                                           torch::Tensor inverse) {
  using namespace tebm_nuts;
  const int64_t n = x.size(0), d = n ? x.numel() / n : 0;
  check_rows(x, x, "x", n * d); check_rows(p, x, "p", n * d); check_rows(grad, x, "grad", n * d);
  check_rows(h, x, "h", n); check_rows(inverse, x, "inverse", d);
  auto x_out = torch::empty_like(x), p_out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nuts_kick_drift", [&] {
    const scalar_t *X = x.data_ptr<scalar_t>(), *P = p.data_ptr<scalar_t>(), *G = grad.data_ptr<scalar_t>();
    const scalar_t *H = h.data_ptr<scalar_t>(), *M = inverse.data_ptr<scalar_t>();
    scalar_t *XO = x_out.data_ptr<scalar_t>(), *PO = p_out.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, d)), [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const scalar_t hc = H[c], half = scalar_t(-0.5) * hc;
        for (int64_t i = c * d; i < (c + 1) * d; ++i) {
          const scalar_t ph = P[i] + half * G[i];
          PO[i] = ph;
          XO[i] = X[i] + hc * (ph * M[i - c * d]);
        }
      }
    });
  });
  return {x_out, p_out};
}

// The rest of the leaf from the model's energy [n] and grad at x, and p' from nuts_kick_drift: returns [p, M^-1 p]
// and updates the sub-tree in place (log_weight, sum_accept [n]; n_leapfrog [n] int64; alive, is_turning,
// is_divergent [n] bool; rho [n, d]; the proposal's x [n, d], energy [n], grad [n, d], energy_error [n]; v_start,
// p_start, rho_before, v_end, p_end [L, n, d]). h0 [n] is each chain's starting H, log_u [n] the leaf's log-uniform.
std::vector<torch::Tensor> nuts_leaf(
    torch::Tensor x, torch::Tensor energy, torch::Tensor grad, torch::Tensor p_half, torch::Tensor h,
    torch::Tensor inverse, torch::Tensor h0, torch::Tensor log_u, int64_t k, double max_energy_error,
    torch::Tensor log_weight, torch::Tensor sum_accept, torch::Tensor n_leapfrog, torch::Tensor alive,
    torch::Tensor is_turning, torch::Tensor is_divergent, torch::Tensor rho, torch::Tensor prop_x,
    torch::Tensor prop_energy, torch::Tensor prop_grad, torch::Tensor prop_error, torch::Tensor v_start,
    torch::Tensor p_start, torch::Tensor rho_before, torch::Tensor v_end, torch::Tensor p_end) {
  using namespace tebm_nuts;
  const int64_t n = x.size(0), d = n ? x.numel() / n : 0, levels = v_start.size(0);
  TORCH_CHECK(k >= 0 && levels >= 1 && levels <= 62, "bad leaf index or level count");
  check_rows(x, x, "x", n * d); check_rows(energy, x, "energy", n); check_rows(grad, x, "grad", n * d);
  check_rows(p_half, x, "p_half", n * d); check_rows(h, x, "h", n); check_rows(inverse, x, "inverse", d);
  check_rows(h0, x, "h0", n); check_rows(log_u, x, "log_u", n); check_rows(log_weight, x, "log_weight", n);
  check_rows(sum_accept, x, "sum_accept", n); check_rows(rho, x, "rho", n * d);
  check_rows(prop_x, x, "proposal x", n * d); check_rows(prop_energy, x, "proposal energy", n);
  check_rows(prop_grad, x, "proposal grad", n * d); check_rows(prop_error, x, "proposal energy_error", n);
  for (auto *t : {&v_start, &p_start, &rho_before, &v_end, &p_end}) check_rows(*t, x, "level checkpoints", levels * n * d);
  check_flags(n_leapfrog, torch::kInt64, "n_leapfrog", n);
  check_flags(alive, torch::kBool, "alive", n); check_flags(is_turning, torch::kBool, "is_turning", n);
  check_flags(is_divergent, torch::kBool, "is_divergent", n);
  auto p_out = torch::empty_like(x), v_out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nuts_leaf", [&] {
    using T = scalar_t;
    const T *X = x.data_ptr<T>(), *E = energy.data_ptr<T>(), *G = grad.data_ptr<T>(), *PH = p_half.data_ptr<T>();
    const T *H = h.data_ptr<T>(), *M = inverse.data_ptr<T>(), *H0 = h0.data_ptr<T>(), *LU = log_u.data_ptr<T>();
    T *P = p_out.data_ptr<T>(), *V = v_out.data_ptr<T>(), *LW = log_weight.data_ptr<T>();
    T *SA = sum_accept.data_ptr<T>(), *RHO = rho.data_ptr<T>(), *PX = prop_x.data_ptr<T>();
    T *PE = prop_energy.data_ptr<T>(), *PG = prop_grad.data_ptr<T>(), *PERR = prop_error.data_ptr<T>();
    int64_t *NL = n_leapfrog.data_ptr<int64_t>();
    bool *ALIVE = alive.data_ptr<bool>(), *TURN = is_turning.data_ptr<bool>(), *DIV = is_divergent.data_ptr<bool>();
    const LevelRows<T> rows{v_start.data_ptr<T>(), p_start.data_ptr<T>(), rho_before.data_ptr<T>(), v_end.data_ptr<T>(),
                            p_end.data_ptr<T>(), n * d};
    // chains are independent: split them over torch's intra-op threads once a task has ~16k numbers to touch
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d * (2 * levels + 6)));
    at::parallel_for(0, n, grain, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c)
        grow_chain_leaf<T>(d, k, levels, X + c * d, E[c], G + c * d, PH + c * d, H[c], M, H0[c], LU[c],
                           T(max_energy_error), LW[c], SA[c], NL[c], ALIVE[c], TURN[c], DIV[c], RHO + c * d,
                           PX + c * d, PE[c], PG + c * d, PERR[c], rows, c * d, P + c * d, V + c * d);
    });
  });
  return {p_out, v_out};
}

// ---- Asynchronous chains ----------------------------------------------------------------------------------------
// Each chain runs its own NUTS draws, one leapfrog step per tick: when its tree ends it records the draw and starts
// the next one at once, instead of waiting for the deepest tree of the batch. A tick is nuts_kick_drift, the model
// (in Python) and nuts_async_advance. The per-chain state is a list of tensors in the order of `async_fields` (the
// Python `AsyncNUTS`); vectors are [n, d], level checkpoints [L, n, d] with L = max_tree_depth. Each tick brings
// uniforms u [n, 4]: the leaf's progressive draw, the join's, the next sub-tree's direction (forward if < 0.5) and
// the step-size jitter. A chain that starts a draw takes the next row of a pool of momenta [P, d] (row `cursor`,
// then cursor + 1), in chain order, so each momentum drawn is used and any thread count gives the same numbers. Checked against a driver
// made of the Python `grow_leaf` and `join_subtree` in tests/test_nuts.py.
namespace tebm_nuts {

#define TEBM_ASYNC_FIELDS(F)                                                                                    \
  F(x) F(p) F(grad) F(energy)                                                                                 \
  F(left_x) F(left_p) F(left_grad) F(left_v) F(left_energy)                                                   \
  F(right_x) F(right_p) F(right_grad) F(right_v) F(right_energy)                                              \
  F(draw_x) F(draw_energy) F(draw_grad) F(draw_error)                                                         \
  F(rho) F(log_weight) F(sum_accept) F(n_leapfrog) F(divergent) F(moved) F(depth) F(h0)                       \
  F(sub_log_weight) F(sub_sum_accept) F(sub_n_leapfrog) F(sub_alive) F(sub_turning) F(sub_divergent)          \
  F(sub_rho) F(sub_draw_x) F(sub_draw_energy) F(sub_draw_grad) F(sub_draw_error)                              \
  F(v_start) F(p_start) F(rho_before) F(v_end) F(p_end)                                                       \
  F(first_v) F(first_p) F(leaf) F(forward) F(step) F(eps)                                                     \
  F(step_size) F(log_step_size) F(log_step_size_bar) F(h_bar) F(mu) F(done)

#define TEBM_ENUM(name) A_##name,
enum AsyncField { TEBM_ASYNC_FIELDS(TEBM_ENUM) A_COUNT };
#undef TEBM_ENUM
#define TEBM_NAME(name) #name,
const char *const ASYNC_NAMES[] = {TEBM_ASYNC_FIELDS(TEBM_NAME)};
#undef TEBM_NAME

enum RecordField { R_x, R_energy, R_grad, R_accept_prob, R_is_divergent, R_energy_error, R_accepted, R_tree_depth,
                   R_n_leapfrog, R_hit_max_depth, R_COUNT };

bool is_flag(int f) {
  return f == A_divergent || f == A_moved || f == A_sub_alive || f == A_sub_turning || f == A_sub_divergent ||
         f == A_forward;
}
bool is_count(int f) { return f == A_n_leapfrog || f == A_depth || f == A_sub_n_leapfrog || f == A_leaf || f == A_done; }
bool is_vector(int f) {
  return f == A_x || f == A_p || f == A_grad || f == A_left_x || f == A_left_p || f == A_left_grad ||
         f == A_left_v || f == A_right_x || f == A_right_p || f == A_right_grad || f == A_right_v || f == A_draw_x ||
         f == A_draw_grad || f == A_rho || f == A_sub_rho || f == A_sub_draw_x || f == A_sub_draw_grad ||
         f == A_first_v || f == A_first_p;
}
bool is_level(int f) { return f >= A_v_start && f <= A_p_end; }

void check_async(const std::vector<torch::Tensor> &s, int64_t n, int64_t d, int64_t levels) {
  TORCH_CHECK((int64_t)s.size() == A_COUNT, "the asynchronous chains have ", A_COUNT, " fields, got ", s.size());
  const auto dtype = s[A_x].scalar_type();
  for (int f = 0; f < A_COUNT; ++f) {
    const auto type = is_flag(f) ? torch::kBool : is_count(f) ? torch::kInt64 : dtype;
    const int64_t size = is_level(f) ? levels * n * d : is_vector(f) ? n * d : n;
    TORCH_CHECK(s[f].device().is_cpu() && s[f].is_contiguous() && s[f].scalar_type() == type && s[f].numel() == size,
                "field ", ASYNC_NAMES[f], " must be a contiguous CPU tensor of ", size, " ", c10::toString(type));
  }
}

template <typename T>
struct Chains {  // typed pointers to every field
  std::vector<T *> f;
  std::vector<int64_t *> count;
  std::vector<bool *> flag;
  explicit Chains(const std::vector<torch::Tensor> &s) : f(A_COUNT, nullptr), count(A_COUNT, nullptr), flag(A_COUNT, nullptr) {
    for (int i = 0; i < A_COUNT; ++i) {
      if (is_flag(i)) flag[i] = s[i].data_ptr<bool>();
      else if (is_count(i)) count[i] = s[i].data_ptr<int64_t>();
      else f[i] = s[i].data_ptr<T>();
    }
  }
};

template <typename T>
void copy_row(const T *from, T *to, int64_t c, int64_t d) { std::copy(from + c * d, from + (c + 1) * d, to + c * d); }

// A new draw of chain c from its current draw (draw_*): momentum p_start [d], the one-leaf trajectory, this draw's step.
template <typename T>
void begin_draw(Chains<T> &s, int64_t c, int64_t d, const T *p_start, const T *M, T jitter, T u_jitter) {
  T *p = s.f[A_left_p] + c * d, *v = s.f[A_left_v] + c * d;
  T kinetic = 0;
  for (int64_t i = 0; i < d; ++i) {
    p[i] = p_start[i];
    v[i] = p[i] * M[i];
    kinetic += p[i] * v[i];
  }
  copy_row(s.f[A_draw_x], s.f[A_left_x], c, d);
  copy_row(s.f[A_draw_grad], s.f[A_left_grad], c, d);
  s.f[A_left_energy][c] = s.f[A_draw_energy][c];
  copy_row(s.f[A_left_x], s.f[A_right_x], c, d);
  copy_row(s.f[A_left_p], s.f[A_right_p], c, d);
  copy_row(s.f[A_left_grad], s.f[A_right_grad], c, d);
  copy_row(s.f[A_left_v], s.f[A_right_v], c, d);
  copy_row(s.f[A_left_p], s.f[A_rho], c, d);
  s.f[A_right_energy][c] = s.f[A_draw_energy][c];
  s.f[A_h0][c] = s.f[A_draw_energy][c] + T(0.5) * kinetic;
  s.f[A_draw_error][c] = 0;
  s.f[A_log_weight][c] = 0;
  s.f[A_sum_accept][c] = 0;
  s.count[A_n_leapfrog][c] = 0;
  s.count[A_depth][c] = 0;
  s.flag[A_divergent][c] = false;
  s.flag[A_moved][c] = false;
  s.f[A_eps][c] = jitter != 0 ? s.f[A_step_size][c] * (1 + jitter * (2 * u_jitter - 1)) : s.f[A_step_size][c];
}

// A new sub-tree of chain c from the edge of its trajectory in the direction drawn by u_direction.
template <typename T>
void begin_subtree(Chains<T> &s, int64_t c, int64_t d, T u_direction) {
  const bool forward = u_direction < T(0.5);
  const int ex = forward ? A_right_x : A_left_x, ep = forward ? A_right_p : A_left_p;
  const int eg = forward ? A_right_grad : A_left_grad, ee = forward ? A_right_energy : A_left_energy;
  copy_row(s.f[ex], s.f[A_x], c, d);
  copy_row(s.f[ep], s.f[A_p], c, d);
  copy_row(s.f[eg], s.f[A_grad], c, d);
  s.f[A_energy][c] = s.f[ee][c];
  copy_row(s.f[ex], s.f[A_sub_draw_x], c, d);
  copy_row(s.f[eg], s.f[A_sub_draw_grad], c, d);
  s.f[A_sub_draw_energy][c] = s.f[ee][c];
  s.f[A_sub_draw_error][c] = 0;
  std::fill(s.f[A_sub_rho] + c * d, s.f[A_sub_rho] + (c + 1) * d, T(0));
  s.f[A_sub_log_weight][c] = -std::numeric_limits<T>::infinity();
  s.f[A_sub_sum_accept][c] = 0;
  s.count[A_sub_n_leapfrog][c] = 0;
  s.flag[A_sub_alive][c] = true;
  s.flag[A_sub_turning][c] = false;
  s.flag[A_sub_divergent][c] = false;
  s.flag[A_forward][c] = forward;
  s.count[A_leaf][c] = 0;
  s.f[A_step][c] = forward ? s.f[A_eps][c] : -s.f[A_eps][c];
}

struct DualAveraging {  // the constants of `dual_averaging_update`, and whether it runs
  bool on;
  double target, gamma, t0, kappa;
  int64_t count;  // updates made before this run
};

// Record chain c's draw at its index `done` (and adapt its step size), then count it.
template <typename T>
void finish_draw(Chains<T> &s, int64_t c, int64_t d, int64_t n, bool hit_max, const std::vector<torch::Tensor> &out,
                 const DualAveraging &da) {
  const int64_t b = s.count[A_done][c], i = b * n + c;
  std::copy(s.f[A_draw_x] + c * d, s.f[A_draw_x] + (c + 1) * d, out[R_x].data_ptr<T>() + i * d);
  std::copy(s.f[A_draw_grad] + c * d, s.f[A_draw_grad] + (c + 1) * d, out[R_grad].data_ptr<T>() + i * d);
  const int64_t steps = s.count[A_n_leapfrog][c];
  const T accept = s.f[A_sum_accept][c] / T(std::max<int64_t>(steps, 1));
  out[R_energy].data_ptr<T>()[i] = s.f[A_draw_energy][c];
  out[R_accept_prob].data_ptr<T>()[i] = accept;
  out[R_is_divergent].data_ptr<bool>()[i] = s.flag[A_divergent][c];
  out[R_energy_error].data_ptr<T>()[i] = s.f[A_draw_error][c];
  out[R_accepted].data_ptr<bool>()[i] = s.flag[A_moved][c];
  out[R_tree_depth].data_ptr<int64_t>()[i] = s.count[A_depth][c];
  out[R_n_leapfrog].data_ptr<int64_t>()[i] = steps;
  out[R_hit_max_depth].data_ptr<bool>()[i] = hit_max;
  if (da.on) {  // as dual_averaging_update, for this chain
    const T m = T(da.count + b + 1), w = T(1) / (m + T(da.t0));
    const T h_bar = (1 - w) * s.f[A_h_bar][c] + w * (T(da.target) - accept);
    const T log_eps = s.f[A_mu][c] - (std::sqrt(m) / T(da.gamma)) * h_bar;
    const T eta = std::pow(m, -T(da.kappa));
    s.f[A_h_bar][c] = h_bar;
    s.f[A_log_step_size][c] = log_eps;
    s.f[A_log_step_size_bar][c] = eta * log_eps + (1 - eta) * s.f[A_log_step_size_bar][c];
    s.f[A_step_size][c] = std::exp(log_eps);
  }
  s.count[A_done][c] = b + 1;
}

// Join chain c's finished sub-tree to its trajectory (as `join_subtree`); returns whether the trajectory goes on.
template <typename T>
bool join(Chains<T> &s, int64_t c, int64_t d, T log_u, const T *v_last) {
  const bool forward = s.flag[A_forward][c];
  const int near_v = forward ? A_right_v : A_left_v, far_v = forward ? A_left_v : A_right_v;
  const int near_p = forward ? A_right_p : A_left_p;
  const bool valid = !(s.flag[A_sub_turning][c] || s.flag[A_sub_divergent][c]);
  const T merge = std::min(s.f[A_sub_log_weight][c] - s.f[A_log_weight][c], T(0));
  const bool take = valid && log_u < merge;
  const T *rho = s.f[A_rho] + c * d, *sub_rho = s.f[A_sub_rho] + c * d, *first_p = s.f[A_first_p] + c * d;
  const T *near_p_row = s.f[near_p] + c * d;
  const bool turn = turning(s.f[far_v] + c * d, v_last, d, [&](int64_t i) { return rho[i] + sub_rho[i]; }) ||
                    turning(s.f[far_v] + c * d, s.f[A_first_v] + c * d, d, [&](int64_t i) { return rho[i] + first_p[i]; }) ||
                    turning(s.f[near_v] + c * d, v_last, d, [&](int64_t i) { return sub_rho[i] + near_p_row[i]; });
  if (valid) {
    const int ex = forward ? A_right_x : A_left_x, ep = forward ? A_right_p : A_left_p;
    const int eg = forward ? A_right_grad : A_left_grad, ev = forward ? A_right_v : A_left_v;
    copy_row(s.f[A_x], s.f[ex], c, d);
    copy_row(s.f[A_p], s.f[ep], c, d);
    copy_row(s.f[A_grad], s.f[eg], c, d);
    std::copy(v_last, v_last + d, s.f[ev] + c * d);
    s.f[forward ? A_right_energy : A_left_energy][c] = s.f[A_energy][c];
    T *r = s.f[A_rho] + c * d;
    for (int64_t i = 0; i < d; ++i) r[i] += sub_rho[i];
    s.f[A_log_weight][c] = log_add_exp(s.f[A_log_weight][c], s.f[A_sub_log_weight][c]);
  }
  if (take) {
    copy_row(s.f[A_sub_draw_x], s.f[A_draw_x], c, d);
    copy_row(s.f[A_sub_draw_grad], s.f[A_draw_grad], c, d);
    s.f[A_draw_energy][c] = s.f[A_sub_draw_energy][c];
    s.f[A_draw_error][c] = s.f[A_sub_draw_error][c];
  }
  s.flag[A_divergent][c] = s.flag[A_divergent][c] || s.flag[A_sub_divergent][c];
  s.flag[A_moved][c] = s.flag[A_moved][c] || take;
  s.count[A_depth][c] += 1;
  s.count[A_n_leapfrog][c] += s.count[A_sub_n_leapfrog][c];
  s.f[A_sum_accept][c] += s.f[A_sub_sum_accept][c];
  return valid && !turn;
}

}  // namespace tebm_nuts

std::vector<std::string> nuts_async_fields() {
  return std::vector<std::string>(tebm_nuts::ASYNC_NAMES, tebm_nuts::ASYNC_NAMES + tebm_nuts::A_COUNT);
}

namespace tebm_nuts {
// The pool of momenta [P, d], checked.
void check_pool(const torch::Tensor &pool, const torch::Tensor &x, int64_t d, int64_t cursor) {
  TORCH_CHECK(pool.device().is_cpu() && pool.is_contiguous() && pool.scalar_type() == x.scalar_type() &&
              pool.dim() == 2 && pool.size(1) == d, "the pool of momenta must be a contiguous [P, d] CPU tensor of the chains' dtype");
  TORCH_CHECK(cursor >= 0 && cursor <= pool.size(0), "cursor must be a row of the pool of momenta");
}

// Start a draw and its first sub-tree on chain c with the next momentum of the pool (in chain order: serial).
template <typename T>
void start_with_pool(Chains<T> &s, int64_t c, int64_t d, const T *pool, int64_t &cursor, int64_t rows, const T *M,
                     T jitter, const T *u) {
  TORCH_CHECK(cursor < rows, "the pool of momenta ran out");
  begin_draw<T>(s, c, d, pool + cursor++ * d, M, jitter, u[3]);
  begin_subtree<T>(s, c, d, u[2]);
}
}  // namespace tebm_nuts

// Start a draw (and its first sub-tree) on every chain with fewer than n_draws draws, from its current draw, with the
// momenta of the pool from row `cursor`; returns the next unused row.
int64_t nuts_async_start(std::vector<torch::Tensor> state, torch::Tensor inverse, torch::Tensor pool, int64_t cursor,
                         torch::Tensor u, int64_t n_draws, double jitter) {
  using namespace tebm_nuts;
  const int64_t n = state[A_energy].numel(), d = n ? state[A_x].numel() / n : 0;
  check_async(state, n, d, state[A_v_start].numel() / std::max<int64_t>(1, n * d));
  check_rows(inverse, state[A_x], "inverse", d); check_rows(u, state[A_x], "u", 4 * n);
  check_pool(pool, state[A_x], d, cursor);
  AT_DISPATCH_FLOATING_TYPES(state[A_x].scalar_type(), "nuts_async_start", [&] {
    using T = scalar_t;
    Chains<T> s(state);
    const T *M = inverse.data_ptr<T>(), *U = u.data_ptr<T>();
    for (int64_t c = 0; c < n; ++c)
      if (s.count[A_done][c] < n_draws)
        start_with_pool<T>(s, c, d, pool.data_ptr<T>(), cursor, pool.size(0), M, T(jitter), U + 4 * c);
  });
  return cursor;
}

// The rest of a tick, from the new leaves (x, energy, grad at x, p' from nuts_kick_drift): every chain with fewer than
// n_draws draws grows its leaf, joins its sub-tree when it is complete or has stopped, records its draw when the
// trajectory ends (U-turn, divergence or max_tree_depth), then starts the next draw and sub-tree. `records` are the
// [n_draws, n, ...] outputs (`AsyncRecords`); `adapt` runs dual averaging per chain after each draw (target, gamma,
// t0, kappa, after `count` updates). Returns how many chains still have draws to make and the next unused row of the
// pool of momenta (chains that start a draw take rows from `cursor` on).
std::vector<int64_t> nuts_async_advance(std::vector<torch::Tensor> state, torch::Tensor x, torch::Tensor energy, torch::Tensor grad,
                           torch::Tensor p_half, torch::Tensor inverse, torch::Tensor pool, int64_t cursor,
                           torch::Tensor u,
                           int64_t n_draws, int64_t max_tree_depth, double max_energy_error, double jitter,
                           std::vector<torch::Tensor> records, bool adapt, double target, double gamma, double t0,
                           double kappa, int64_t count) {
  using namespace tebm_nuts;
  const int64_t n = state[A_energy].numel(), d = n ? state[A_x].numel() / n : 0;
  const int64_t levels = state[A_v_start].numel() / std::max<int64_t>(1, n * d);
  check_async(state, n, d, levels);
  TORCH_CHECK(levels == max_tree_depth, "the level checkpoints have ", levels, " rows, expected max_tree_depth = ",
              max_tree_depth);
  const auto &ref = state[A_x];
  check_rows(x, ref, "x", n * d); check_rows(energy, ref, "energy", n); check_rows(grad, ref, "grad", n * d);
  check_rows(p_half, ref, "p_half", n * d); check_rows(inverse, ref, "inverse", d);
  check_rows(u, ref, "u", 4 * n); check_pool(pool, ref, d, cursor);
  TORCH_CHECK((int64_t)records.size() == R_COUNT, "expected ", R_COUNT, " record tensors");
  for (int r = 0; r < R_COUNT; ++r) {
    const bool vec = r == R_x || r == R_grad;
    const auto type = (r == R_is_divergent || r == R_accepted || r == R_hit_max_depth) ? torch::kBool
                      : (r == R_tree_depth || r == R_n_leapfrog) ? torch::kInt64 : ref.scalar_type();
    TORCH_CHECK(records[r].is_contiguous() && records[r].scalar_type() == type &&
                records[r].numel() == n_draws * n * (vec ? d : 1), "record ", r, " has the wrong shape or dtype");
  }
  const DualAveraging da{adapt, target, gamma, t0, kappa, count};
  int64_t remaining = 0;
  AT_DISPATCH_FLOATING_TYPES(ref.scalar_type(), "nuts_async_advance", [&] {
    using T = scalar_t;
    Chains<T> s(state);
    const T *X = x.data_ptr<T>(), *E = energy.data_ptr<T>(), *G = grad.data_ptr<T>(), *PH = p_half.data_ptr<T>();
    const T *M = inverse.data_ptr<T>(), *U = u.data_ptr<T>();
    std::vector<char> starting(n, 0);  // chains that start a draw this tick: they take momenta after the parallel part
    const LevelRows<T> rows{s.f[A_v_start], s.f[A_p_start], s.f[A_rho_before], s.f[A_v_end], s.f[A_p_end], n * d};
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d * (2 * levels + 20)));
    std::atomic<int64_t> left{0};
    at::parallel_for(0, n, grain, [&](int64_t first, int64_t last) {
      std::vector<T> v(d);
      int64_t mine = 0;
      for (int64_t c = first; c < last; ++c) {
        if (s.count[A_done][c] >= n_draws) continue;
        const int64_t k = s.count[A_leaf][c], depth = s.count[A_depth][c];
        T *p = s.f[A_p] + c * d;
        grow_chain_leaf<T>(d, k, depth + 1, X + c * d, E[c], G + c * d, PH + c * d, s.f[A_step][c], M, s.f[A_h0][c],
                           std::log(U[4 * c]), T(max_energy_error), s.f[A_sub_log_weight][c],
                           s.f[A_sub_sum_accept][c], s.count[A_sub_n_leapfrog][c], s.flag[A_sub_alive][c],
                           s.flag[A_sub_turning][c], s.flag[A_sub_divergent][c], s.f[A_sub_rho] + c * d,
                           s.f[A_sub_draw_x] + c * d, s.f[A_sub_draw_energy][c], s.f[A_sub_draw_grad] + c * d,
                           s.f[A_sub_draw_error][c], rows, c * d, p, v.data());
        std::copy(X + c * d, X + (c + 1) * d, s.f[A_x] + c * d);
        std::copy(G + c * d, G + (c + 1) * d, s.f[A_grad] + c * d);
        s.f[A_energy][c] = E[c];
        if (k == 0) {
          std::copy(v.begin(), v.end(), s.f[A_first_v] + c * d);
          std::copy(p, p + d, s.f[A_first_p] + c * d);
        }
        s.count[A_leaf][c] = k + 1;
        if (k + 1 < (int64_t(1) << depth) && s.flag[A_sub_alive][c]) { ++mine; continue; }
        const bool goes_on = join<T>(s, c, d, std::log(U[4 * c + 1]), v.data());
        if (!goes_on || s.count[A_depth][c] == max_tree_depth) {
          finish_draw<T>(s, c, d, n, goes_on, records, da);
          if (s.count[A_done][c] >= n_draws) continue;
          starting[c] = 1;
        } else {
          begin_subtree<T>(s, c, d, U[4 * c + 2]);
        }
        ++mine;
      }
      left += mine;
    });
    for (int64_t c = 0; c < n; ++c)
      if (starting[c]) start_with_pool<T>(s, c, d, pool.data_ptr<T>(), cursor, pool.size(0), M, T(jitter), U + 4 * c);
    remaining = left.load();
  });
  return {remaining, cursor};
}

// Fresh asynchronous chains at x [n, d] (energy [n], grad [n, d]) with step sizes [n]: every field of `async_fields`,
// zero but for the current draw (the chains) and the step sizes; L = max_tree_depth rows of level checkpoints.
std::vector<torch::Tensor> nuts_async_init(torch::Tensor x, torch::Tensor energy, torch::Tensor grad,
                                           torch::Tensor step_size, int64_t max_tree_depth) {
  using namespace tebm_nuts;
  TORCH_CHECK(x.dim() == 2 && max_tree_depth >= 1 && max_tree_depth <= 62, "x must be [n, d], max_tree_depth in 1..62");
  const int64_t n = x.size(0), d = x.size(1);
  check_rows(energy, x, "energy", n); check_rows(grad, x, "grad", n * d); check_rows(step_size, x, "step_size", n);
  std::vector<torch::Tensor> s(A_COUNT);
  for (int f = 0; f < A_COUNT; ++f) {
    const auto type = is_flag(f) ? torch::kBool : is_count(f) ? torch::kInt64 : x.scalar_type();
    const std::vector<int64_t> shape = is_level(f) ? std::vector<int64_t>{max_tree_depth, n, d}
                                       : is_vector(f) ? std::vector<int64_t>{n, d} : std::vector<int64_t>{n};
    s[f] = torch::zeros(shape, x.options().dtype(type));
  }
  s[A_draw_x].copy_(x); s[A_draw_energy].copy_(energy); s[A_draw_grad].copy_(grad); s[A_step_size].copy_(step_size);
  s[A_x].copy_(x); s[A_energy].copy_(energy); s[A_grad].copy_(grad);
  return s;
}

#pragma GCC pop_options
