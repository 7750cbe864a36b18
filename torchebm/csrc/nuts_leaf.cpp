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
#include <cmath>
#include <limits>
#include <vector>

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
    T *VS = v_start.data_ptr<T>(), *PS = p_start.data_ptr<T>(), *RB = rho_before.data_ptr<T>();
    T *VE = v_end.data_ptr<T>(), *PEND = p_end.data_ptr<T>();
    int64_t *NL = n_leapfrog.data_ptr<int64_t>();
    bool *ALIVE = alive.data_ptr<bool>(), *TURN = is_turning.data_ptr<bool>(), *DIV = is_divergent.data_ptr<bool>();
    const T limit = -T(max_energy_error), neg_inf = -std::numeric_limits<T>::infinity();
    auto row = [&](T *base, int64_t level, int64_t c) { return base + (level * n + c) * d; };
    // chains are independent: split them over torch's intra-op threads once a task has ~16k numbers to touch
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d * (2 * levels + 6)));
    at::parallel_for(0, n, grain, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        T *p = P + c * d, *v = V + c * d, *r = RHO + c * d;
        const T *g = G + c * d, *ph = PH + c * d;
        const T half = -(T(0.5) * H[c]);
        T kinetic = 0;
        for (int64_t i = 0; i < d; ++i) {
          p[i] = ph[i] + half * g[i];
          v[i] = p[i] * M[i];
          kinetic += p[i] * v[i];
        }
        const T delta = E[c] + T(0.5) * kinetic - H0[c];
        const T w = std::isnan(delta) ? neg_inf : -delta;  // NaN: weight 0
        const bool diverged = w < limit, was_alive = ALIVE[c];
        SA[c] += T(was_alive ? 1 : 0) * std::exp(std::min(w, T(0)));
        const T log_w = log_add_exp(LW[c], w);
        if (LU[c] < w - log_w) {
          std::copy(X + c * d, X + (c + 1) * d, PX + c * d);
          std::copy(g, g + d, PG + c * d);
          PE[c] = E[c];
          PERR[c] = delta;
        }
        LW[c] = log_w;
        for (int64_t m = 0; m < levels; ++m)
          if (k % (int64_t(1) << m) == 0) {
            std::copy(v, v + d, row(VS, m, c));
            std::copy(p, p + d, row(PS, m, c));
            std::copy(r, r + d, row(RB, m, c));
          }
        for (int64_t i = 0; i < d; ++i) r[i] += p[i];
        auto closes = [&](int64_t m) { return (k + 1) % (int64_t(1) << m) == 0; };
        bool turn = false;
        for (int64_t m = 1; m < levels; ++m)
          if (closes(m)) {
            const T *rb = row(RB, m, c);
            turn |= turning(row(VS, m, c), v, d, [&](int64_t i) { return r[i] - rb[i]; });
          }
        for (int64_t m = 2; m < levels; ++m)  // across the halves of blocks of 4 or more leaves
          if (closes(m)) {
            const T *rb = row(RB, m, c), *rb_half = row(RB, m - 1, c), *ps_half = row(PS, m - 1, c);
            const T *pe_half = row(PEND, m - 1, c);
            turn |= turning(row(VS, m, c), row(VS, m - 1, c), d,
                            [&](int64_t i) { return rb_half[i] - rb[i] + ps_half[i]; }) ||
                    turning(row(VE, m - 1, c), v, d, [&](int64_t i) { return r[i] - rb_half[i] + pe_half[i]; });
          }
        for (int64_t m = 0; m < levels; ++m)
          if (closes(m)) {
            std::copy(v, v + d, row(VE, m, c));
            std::copy(p, p + d, row(PEND, m, c));
          }
        NL[c] += was_alive;
        TURN[c] = TURN[c] || turn;
        DIV[c] = DIV[c] || (was_alive && diverged);
        ALIVE[c] = was_alive && !(turn || diverged);
      }
    });
  });
  return {p_out, v_out};
}
