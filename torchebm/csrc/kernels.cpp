
// torchebm fused samplers, CPU build: OpenMP over blocks of chains. The random streams and the energies'
// formulas come from tebm_common.h (shared with kernels.cu); this file holds the lane-vectorised loops and
// the entry points `langevin_chain`, `hmc_chain`, `energy_and_gradient`, `energy_kinds`, `all_finite`, `standard_normal`,
// `max_threads`.
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <string>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "tebm_common.h"
#include "tebm_outputs.h"

// A block holds L chains in structure-of-arrays layout x[i * L + j] (coordinate i, lane j), so every
// inner loop runs over lanes and vectorises. Random numbers: one xoshiro128+ stream per chain, seeded
// from (seed, chain index) only, so results do not depend on the thread count or the block size.
namespace tebm {

// Chains per block (lanes): wide blocks for the separable one-pass ULA step (more independent work per
// instruction), narrow ones where per-block buffers grow with d (Gaussian) and must stay in cache.
constexpr int WIDE = 64, NARROW = 16;

template <int L>
struct Rng {  // one xoshiro128+ state per lane
  uint32_t s0[L], s1[L], s2[L], s3[L];
  void seed(uint64_t seed, int64_t first_chain) {
    for (int j = 0; j < L; ++j) seed_chain(seed, first_chain + j, s0[j], s1[j], s2[j], s3[j]);
  }
};

// Walks a [d][L] array v in coordinate pairs (i, i + 1), drawing one pair of N(0, 1) per lane for each:
// visit(v[i][j], v[i + 1][j], n0, n1), a zeroed spare standing in for the partner of an odd last coordinate.
// Each lane thus draws ceil(d / 2) pairs in coordinate order.
template <int L, typename T, typename Visit>
inline void normal_pairs(Rng<L> &g, T *v, int64_t d, Visit visit) {
  T spare[L] = {};
  for (int64_t i = 0; i < d; i += 2) {
    T *va = v + i * L;
    T *vb = (i + 1 < d) ? v + (i + 1) * L : spare;
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      uint32_t a0 = g.s0[j], a1 = g.s1[j], a2 = g.s2[j], a3 = g.s3[j];
      const uint32_t r1 = next_u32(a0, a1, a2, a3), r2 = next_u32(a0, a1, a2, a3);
      g.s0[j] = a0; g.s1[j] = a1; g.s2[j] = a2; g.s3[j] = a3;
      float n0, n1;
      box_muller(r1, r2, n0, n1);
      visit(va[j], vb[j], n0, n1);
    }
  }
}

// z[i * L + j] ~ N(0, 1) for i < d.
template <int L, typename T>
inline void fill_normal(Rng<L> &g, T *z, int64_t d) {
  normal_pairs(g, z, d, [](T &a, T &b, float n0, float n1) { a = (T)n0; b = (T)n1; });
}

// log(u), u ~ U(0, 1], one per lane (the Metropolis test).
template <int L>
inline void fill_log_uniform(Rng<L> &g, float *lu) {
#pragma omp simd
  for (int j = 0; j < L; ++j) {
    uint32_t a0 = g.s0[j], a1 = g.s1[j], a2 = g.s2[j], a3 = g.s3[j];
    const uint32_t r = next_u32(a0, a1, a2, a3);
    g.s0[j] = a0; g.s1[j] = a1; g.s2[j] = a2; g.s3[j] = a3;
    lu[j] = log_unit(unit_float(r));
  }
}

// void, declaring a member for energy F only if F has shape S.
template <typename F, typename S>
using Shape = std::enable_if_t<std::is_base_of_v<S, F>>;

template <typename T, int L>
struct Energy {
  int kind;
  int64_t d;
  T p0, p1, p2;             // scalar parameters (meaning depends on kind, set by analytic_energy in Python)
  const T *mean = nullptr;  // Gaussian: [d]
  const T *prec = nullptr;  // Gaussian: [d, d], symmetric

  // g <- grad E(x); e <- E(x) when e is not null. x, g: [d][L]; e: [L]; work: [d][L] scratch. Never inlined: one
  // compiled copy, so an energy's last bits (where the compiler fuses a multiply-add) do not depend on the caller.
  __attribute__((noinline)) void eval(const T *x, T *g, T *e, T *work) const {
    switch (kind) {
#define TEBM_EVAL(CODE, Formula)                                                         \
  case CODE:                                                                             \
    if constexpr (std::is_base_of_v<Quadratic, Formula>) apply<Formula>(x, g, e, work); \
    else apply<Formula>(x, g, e);                                                        \
    break;
      TEBM_ENERGIES(TEBM_EVAL)
#undef TEBM_EVAL
    }
  }

  // The loops, one per shape of tebm_common.h (`apply<F>` is the one for F's shape), applying F's formulas. Called
  // straight from eval, with only the arguments they use: with a layer in between, GCC summarised eval's memory
  // effects before those of the loops it calls and compiled the samplers' loops around eval differently (HMC 3%
  // slower); an unused argument gets a loop cloned and compiled differently (Ackley 3% slower).

  // g_i = grad(x_i), E = base + sum_i term(x_i) on every lane of every coordinate, the lane loop marked SIMD if F::simd.
  template <typename F>
  Shape<F, Separable> apply(const T *x, T *g, T *e) const {
    const T a = p0, b = p1, c = p2;  // copied: the lambdas then hold values, not `this`
    const T base = F::base(d, a, b, c);
    const auto grad = [=](T v) { return F::grad(v, a, b, c); };
    const auto term = [=](T v) { return F::term(v, a, b, c); };
    if (e) for (int j = 0; j < L; ++j) e[j] = base;
    for (int64_t i = 0; i < d; ++i) {
      const T *xi = x + i * L; T *gi = g + i * L;
      if constexpr (F::simd) {
#pragma omp simd
        for (int j = 0; j < L; ++j) {
          gi[j] = grad(xi[j]);
          if (e) e[j] += term(xi[j]);
        }
      } else {
        for (int j = 0; j < L; ++j) {
          gi[j] = grad(xi[j]);
          if (e) e[j] += term(xi[j]);
        }
      }
    }
  }

  // E = (x - mu)^T P (x - mu) / 2, grad = P (x - mu).
  template <typename F>
  Shape<F, Quadratic> apply(const T *x, T *g, T *e, T *delta) const {
    for (int64_t i = 0; i < d; ++i) {
#pragma omp simd
      for (int j = 0; j < L; ++j) delta[i * L + j] = x[i * L + j] - mean[i];
    }
    // Rows in groups of R: R independent accumulator chains hide the FMA latency and share each load of delta.
    constexpr int R = sizeof(T) == 4 ? 4 : 2;  // R x L accumulators fill 16 vector registers
    int64_t i = 0;
    for (; i + R <= d; i += R) {
      T acc[R][L] = {};
      for (int64_t k = 0; k < d; ++k) {
        const T *dk = delta + k * L;
        for (int r = 0; r < R; ++r) {
          const T pik = prec[(i + r) * d + k];
#pragma omp simd
          for (int j = 0; j < L; ++j) acc[r][j] += pik * dk[j];
        }
      }
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < L; ++j) g[(i + r) * L + j] = acc[r][j];
    }
    for (; i < d; ++i) {
      T acc[L] = {};
      for (int64_t k = 0; k < d; ++k) {
        const T pik = prec[i * d + k]; const T *dk = delta + k * L;
#pragma omp simd
        for (int j = 0; j < L; ++j) acc[j] += pik * dk[j];
      }
      for (int j = 0; j < L; ++j) g[i * L + j] = acc[j];
    }
    if (e) {
      for (int j = 0; j < L; ++j) e[j] = 0;
      for (int64_t i = 0; i < d; ++i) {
#pragma omp simd
        for (int j = 0; j < L; ++j) e[j] += T(0.5) * delta[i * L + j] * g[i * L + j];
      }
    }
  }

  // E = sum_{i<d-1} term(x_i, x_{i+1}): the pair adds `own` to g_i and `next` to g_{i+1}.
  template <typename F>
  Shape<F, Chained> apply(const T *x, T *g, T *e) const {
    if (e) for (int j = 0; j < L; ++j) e[j] = 0;
    for (int j = 0; j < L; ++j) g[(d - 1) * L + j] = 0;
    for (int64_t i = 0; i + 1 < d; ++i) {
      const T *xi = x + i * L, *xn = x + (i + 1) * L;
      T *gi = g + i * L, *gn = g + (i + 1) * L;
      const bool first = i == 0;
#pragma omp simd
      for (int j = 0; j < L; ++j) {
        T own, next;
        F::grad(xi[j], xn[j], p0, p1, p2, own, next);
        gi[j] = first ? own : gi[j] + own;
        gn[j] = next;
        if (e) e[j] += F::term(xi[j], xn[j], p0, p1, p2);
      }
    }
  }

  // E = energy(S1, S2, d) of S1 = sum_i sum1(x_i), S2 = sum_i sum2(x_i); g_i = grad(x_i, fa, fc), the factors from energy.
  template <typename F>
  Shape<F, OfTwoSums> apply(const T *x, T *g, T *e) const {
    T s1[L] = {}, s2[L] = {}, fa[L], fc[L];
    for (int64_t i = 0; i < d; ++i)
      for (int j = 0; j < L; ++j) {
        const T v = x[i * L + j];
        s1[j] += F::sum1(v, p0, p1, p2); s2[j] += F::sum2(v, p0, p1, p2);
      }
    for (int j = 0; j < L; ++j) {
      const T ej = F::energy(s1[j], s2[j], (T)d, p0, p1, p2, fa[j], fc[j]);
      if (e) e[j] = ej;
    }
    for (int64_t i = 0; i < d; ++i)
      for (int j = 0; j < L; ++j) g[i * L + j] = F::grad(x[i * L + j], fa[j], fc[j], p0, p1, p2);
  }
};

// Whether ULA takes F's one-pass step (separable_ula_step): a Separable energy whose lane loop vectorises.
template <typename F>
constexpr bool has_one_pass_ula() {
  if constexpr (std::is_base_of_v<Separable, F>) return F::simd;
  else return false;
}

// What a chain records every `thin`-th step; null pointers mean "not asked for".
template <typename T>
struct Recorder {
  int64_t n, d, n_records, thin;
  T *traj;          // [n, T, d]
  T *energy;        // [T, n]
  double *stats;    // [n_blocks, T, 2, d]: block mean and block sum of squared deviations
  T *accepted;      // [T, n]

  bool due(int64_t step) const { return (step + 1) % thin == 0 && (step + 1) / thin <= n_records; }
  bool wants_energy(int64_t step) const { return energy && due(step); }

  template <int L>
  void write(int64_t step, int64_t blk, int64_t c0, int nv, const T *x, const T *e, const bool *acc) const {
    if (!due(step)) return;
    const int64_t k = (step + 1) / thin - 1;
    if (traj)
      for (int j = 0; j < nv; ++j)
        for (int64_t i = 0; i < d; ++i) traj[((c0 + j) * n_records + k) * d + i] = x[i * L + j];
    if (energy) for (int j = 0; j < nv; ++j) energy[k * n + c0 + j] = e[j];
    if (accepted) for (int j = 0; j < nv; ++j) accepted[k * n + c0 + j] = acc[j] ? T(1) : T(0);
    if (stats) {
      double *s = stats + (blk * n_records + k) * 2 * d;
      for (int64_t i = 0; i < d; ++i) {
        double m = 0, m2 = 0;
        for (int j = 0; j < nv; ++j) m += (double)x[i * L + j];
        m /= nv;
        for (int j = 0; j < nv; ++j) { const double u = (double)x[i * L + j] - m; m2 += u * u; }
        s[i] = m; s[d + i] = m2;
      }
    }
  }
};

template <int L, typename T>
inline void load_block(const T *x, int64_t c0, int nv, int64_t d, T *xb) {
  for (int64_t i = 0; i < d; ++i)
    for (int j = 0; j < L; ++j) xb[i * L + j] = j < nv ? x[(c0 + j) * d + i] : T(0);
}

template <int L, typename T>
inline void store_block(T *x, int64_t c0, int nv, int64_t d, const T *xb) {
  for (int j = 0; j < nv; ++j)
    for (int64_t i = 0; i < d; ++i) x[(c0 + j) * d + i] = xb[i * L + j];
}

// One ULA step for an energy that is a sum of the same function over coordinates (grad_i depends on x_i only):
// noise, gradient and update in a single pass over the lanes, with nothing stored in between.
template <int L, typename T, typename Grad>
inline void separable_ula_step(Rng<L> &g, T *xb, int64_t d, T h, T c, Grad grad) {
  normal_pairs(g, xb, d, [=](T &a, T &b, float n0, float n1) {
    const T u = a, v = b;
    a = u - h * grad(u) + c * (T)n0;
    b = v - h * grad(v) + c * (T)n1;
  });
}

// ULA's one-pass step with F's gradient.
template <typename F, int L, typename T>
__attribute__((always_inline)) inline void one_pass_ula(const Energy<T, L> &E, Rng<L> &rng, T *xb, int64_t d, T h, T c) {
  const T a = E.p0, b = E.p1, p = E.p2;
  separable_ula_step<L>(rng, xb, d, h, c, [=](T v) { return F::grad(v, a, b, p); });
}

// Takes ULA's one-pass step if E's energy has one (has_one_pass_ula) and says whether it did.
template <int L, typename T>
__attribute__((always_inline)) inline bool one_pass_ula_step(const Energy<T, L> &E, Rng<L> &rng, T *xb, int64_t d, T h, T c) {
#define TEBM_ONE_PASS(CODE, Formula)                                              \
  if constexpr (has_one_pass_ula<Formula>())                                      \
    if (E.kind == CODE) { one_pass_ula<Formula>(E, rng, xb, d, h, c); return true; }
  TEBM_ENERGIES(TEBM_ONE_PASS)
#undef TEBM_ONE_PASS
  return false;
}

// One thread's block of L chains and its scratch, each [d][L]: the state x with g = grad E(x) and energy e,
// z (the noise, or HMC's momentum), the proposal y with gy = grad E(y) and energy ey, the energy's workspace, and
// when screening the start x0 with its energy e0.
template <typename T, int L>
struct Block {
  std::vector<T> buf;
  T *x, *g, *z, *y, *gy, *work, *x0;
  T e[L], ey[L], e0[L];
  bool acc[L];

  Block(int64_t d, bool screening) : buf((screening ? 7 : 6) * d * L) {
    x = buf.data(); g = x + d * L; z = g + d * L; y = z + d * L; gy = y + d * L; work = gy + d * L;
    x0 = screening ? work + d * L : nullptr;
  }

  // The Metropolis test, log u < log_alpha(j) for lane j: accepted lanes take the proposal (y, gy, ey).
  template <typename LogAlpha>
  void metropolis(Rng<L> &rng, int64_t d, LogAlpha log_alpha) {
    float lu[L];
    fill_log_uniform(rng, lu);
    for (int j = 0; j < L; ++j) acc[j] = (T)lu[j] < log_alpha(j);
    for (int64_t i = 0; i < d; ++i)
      for (int j = 0; j < L; ++j)
        if (acc[j]) { x[i * L + j] = y[i * L + j]; g[i * L + j] = gy[i * L + j]; }
    for (int j = 0; j < L; ++j) if (acc[j]) e[j] = ey[j];
  }
};

// The chains x [n, d] in blocks of L, their final states written to out [n, d], OpenMP over blocks: each block is
// loaded, seeded from (seed, its first chain), evaluated (energy too if `metropolis`: its steps keep e current), then takes
// `step(block, rng, t)` for t < n_steps, each step recorded, and last is screened if `screen` asks (screen_chain;
// only a Metropolis chain can fail to move). The generator stays a local of its own, outside Block: inside it
// (whose address reaches the energy calls) GCC leaves scalar copies of the noise loop in HMC, twice as slow.
// The steps are lambdas marked STEP_INLINE: left to itself GCC calls the Langevin step out of line, once per step
// and block, about 6% slower on small blocks (2-D double well).
#define STEP_INLINE __attribute__((always_inline))
template <typename T, int L, typename Step>
void run_blocks(const T *x, T *out, int64_t n, const Energy<T, L> &E, bool metropolis, int64_t n_steps,
                const Recorder<T> &rec, uint64_t seed, const ScreenSpec &screen, Step step) {
  const int64_t d = E.d, n_blocks = (n + L - 1) / L;
  const bool screening = screen.flags != nullptr;
#pragma omp parallel
  {
    Block<T, L> b(d, screening);
    Rng<L> rng;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t c0 = blk * L;
      const int nv = (int)std::min<int64_t>(L, n - c0);
      load_block<L>(x, c0, nv, d, b.x);
      rng.seed(seed, c0);
      E.eval(b.x, b.g, (metropolis || screening) ? b.e : nullptr, b.work);
      if (screening) {
        std::copy(b.x, b.x + d * L, b.x0);
        std::copy(b.e, b.e + L, b.e0);
      }
      for (int j = 0; j < L; ++j) b.acc[j] = true;
      for (int64_t t = 0; t < n_steps; ++t) {
        step(b, rng, t);
        rec.template write<L>(t, blk, c0, nv, b.x, b.e, b.acc);
      }
      if (screening) {
        if (!metropolis) E.eval(b.x, b.g, b.e, b.work);  // ULA's e is stale unless its last step recorded it
        for (int j = 0; j < nv; ++j)
          screen.flags[c0 + j] = screen_chain(b.x + j, b.x0 + j, d, (int64_t)L, metropolis, b.e0[j], b.e[j],
                                              screen.limit, screen.growth);
      }
      store_block<L>(out, c0, nv, d, b.x);
    }
  }
}

// Langevin (ULA) or MALA over all chains from x [n, d], the final states written to out.
template <typename T, int L>
void langevin_run(const T *x, T *out, int64_t n, const Energy<T, L> &E, const double *eta, const double *scale,
                  int64_t n_steps, bool metropolis, const Recorder<T> &rec, uint64_t seed, const ScreenSpec &screen) {
  const int64_t d = E.d;
  run_blocks(x, out, n, E, metropolis, n_steps, rec, seed, screen,
             [&](Block<T, L> &b, Rng<L> &rng, int64_t t) STEP_INLINE {
    // locals, not captures: a store through T* could alias a captured T, which stops the loops vectorising
    T *xb = b.x, *gb = b.g, *z = b.z, *y = b.y, *gy = b.gy;
    const T h = (T)eta[t], c = (T)(std::sqrt(2.0 * eta[t]) * scale[t]);
    if (!metropolis && one_pass_ula_step(E, rng, xb, d, h, c)) {
      if (rec.wants_energy(t)) E.eval(xb, gb, b.e, b.work);
    } else if (!metropolis) {
      fill_normal(rng, z, d);
      for (int64_t i = 0; i < d * L; ++i) xb[i] += -h * gb[i] + c * z[i];
      E.eval(xb, gb, rec.wants_energy(t) ? b.e : nullptr, b.work);
    } else {
      fill_normal(rng, z, d);
      for (int64_t i = 0; i < d * L; ++i) y[i] = xb[i] - h * gb[i] + c * z[i];
      E.eval(y, gy, b.ey, b.work);
      // Target e^{-E / s^2} (transitions.MALA's): log q(y | x) = -|z|^2 / 2 and
      // log q(x | y) = -|x - y + h grad E(y)|^2 / (4 h s^2), up to the same constant.
      T fwd[L] = {}, bwd[L] = {};
      const T inv_temp = (T)(1.0 / (scale[t] * scale[t])), inv = T(0.25) * inv_temp / h;
      for (int64_t i = 0; i < d; ++i) {
#pragma omp simd
        for (int j = 0; j < L; ++j) {
          const int64_t k = i * L + j;
          const T r = xb[k] - y[k] + h * gy[k];
          fwd[j] += z[k] * z[k];
          bwd[j] += r * r;
        }
      }
      b.metropolis(rng, d, [&](int j) { return (b.e[j] - b.ey[j]) * inv_temp - bwd[j] * inv + T(0.5) * fwd[j]; });
    }
  });
}

// HMC with unit-diagonal mass times `mass`: per step, fresh momentum, n_leapfrog leapfrog steps, Metropolis test.
template <typename T, int L>
void hmc_run(const T *x, T *out, int64_t n, const Energy<T, L> &E, const double *eta, int64_t n_steps,
             int64_t n_leapfrog, double mass, const Recorder<T> &rec, uint64_t seed) {
  const int64_t d = E.d;
  const ScreenSpec no_screen{nullptr, 0.0, 0.0};
  run_blocks(x, out, n, E, true, n_steps, rec, seed, no_screen,
             [&](Block<T, L> &b, Rng<L> &rng, int64_t t) STEP_INLINE {
    // locals, not captures: a store through T* could alias a captured T, which stops the loops vectorising
    T *xb = b.x, *gb = b.g, *p = b.z, *y = b.y, *gy = b.gy;
    const T h = (T)eta[t], sqrt_m = (T)std::sqrt(mass), inv_m = (T)(1.0 / mass);
    fill_normal(rng, p, d);
    T k0[L] = {}, k1[L] = {};
    for (int64_t i = 0; i < d; ++i) {
#pragma omp simd
      for (int j = 0; j < L; ++j) {
        const int64_t k = i * L + j;
        p[k] *= sqrt_m;
        k0[j] += p[k] * p[k];
        y[k] = xb[k];
        p[k] -= T(0.5) * h * gb[k];
      }
    }
    for (int64_t l = 0; l < n_leapfrog; ++l) {
      for (int64_t i = 0; i < d * L; ++i) y[i] += h * inv_m * p[i];
      const bool last = l + 1 == n_leapfrog;
      E.eval(y, gy, last ? b.ey : nullptr, b.work);
      const T kick = last ? T(0.5) * h : h;
      for (int64_t i = 0; i < d * L; ++i) p[i] -= kick * gy[i];
    }
    for (int64_t i = 0; i < d; ++i)
      for (int j = 0; j < L; ++j) k1[j] += p[i * L + j] * p[i * L + j];
    b.metropolis(rng, d, [&](int j) { return b.e[j] + T(0.5) * inv_m * k0[j] - b.ey[j] - T(0.5) * inv_m * k1[j]; });
  });
}

}  // namespace tebm

namespace {

using namespace tebm;

template <typename T, int L>
Energy<T, L> make_energy(int64_t kind, const std::vector<double> &params, const torch::Tensor &mean,
                      const torch::Tensor &prec, int64_t d) {
  Energy<T, L> E;
  E.kind = (int)kind; E.d = d;
  E.p0 = params.size() > 0 ? (T)params[0] : T(0);
  E.p1 = params.size() > 1 ? (T)params[1] : T(0);
  E.p2 = params.size() > 2 ? (T)params[2] : T(0);
  if (kind == GAUSSIAN) { E.mean = mean.data_ptr<T>(); E.prec = prec.data_ptr<T>(); }
  return E;
}

void check_inputs(const torch::Tensor &x, int64_t kind, const torch::Tensor &mean, const torch::Tensor &prec) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kFloat64, "x must be float32 or float64");
  TORCH_CHECK(kind >= 0 && kind < N_KINDS, "unknown energy kind ", kind);
  if (kind == GAUSSIAN) {
    const int64_t d = x.size(1);
    TORCH_CHECK(mean.scalar_type() == x.scalar_type() && mean.is_contiguous() && mean.numel() == d, "mean must match x");
    TORCH_CHECK(prec.scalar_type() == x.scalar_type() && prec.is_contiguous() && prec.numel() == d * d, "precision must match x");
  }
}

template <typename T>
Recorder<T> recorder(const Outputs &o, int64_t n, int64_t d, int64_t n_records, int64_t thin) {
  return Recorder<T>{n, d, n_records, thin, Outputs::ptr<T>(o.traj), Outputs::ptr<T>(o.energy),
                     Outputs::ptr<double>(o.stats), Outputs::ptr<T>(o.accepted)};
}

// Whether ULA (not `metropolis`) takes the one-pass step for energy `kind` (then in wide blocks).
bool one_pass_ula(int64_t kind, bool metropolis) {
  if (metropolis) return false;
  switch (kind) {
#define TEBM_ONE_PASS(CODE, Formula) case CODE: return has_one_pass_ula<Formula>();
    TEBM_ENERGIES(TEBM_ONE_PASS)
#undef TEBM_ONE_PASS
  }
  return false;
}

}  // namespace

// Both return [x_final, trajectory, energy, block_stats, accepted, block_size, screen] as tebm_outputs.h describes;
// langevin_chain screens the chains when `energy_limit` > 0 (hmc_chain never does).
std::vector<torch::Tensor> langevin_chain(torch::Tensor x, int64_t kind, std::vector<double> params, torch::Tensor mean,
                                          torch::Tensor prec, torch::Tensor step_sizes, torch::Tensor noise_scales,
                                          bool metropolis, int64_t thin, bool record_traj, bool record_diag, int64_t seed,
                                          std::optional<at::Generator> generator, double energy_limit,
                                          double energy_growth) {
  check_inputs(x, kind, mean, prec);
  pybind11::gil_scoped_release no_gil;  // long pure C++ work: let other Python threads run
  TORCH_CHECK(step_sizes.scalar_type() == torch::kFloat64 && noise_scales.scalar_type() == torch::kFloat64,
              "step_sizes and noise_scales must be float64");
  const int64_t n_steps = step_sizes.numel(), n = x.size(0), d = x.size(1);
  TORCH_CHECK(noise_scales.numel() == n_steps && thin >= 1, "bad schedule lengths or thin");
  const int64_t n_records = n_steps / thin;
  const int block = one_pass_ula(kind, metropolis) ? WIDE : NARROW;
  auto out = torch::empty(x.sizes(), x.options());
  auto eta = step_sizes.contiguous(), scale = noise_scales.contiguous();
  const Outputs o = make_outputs(x, n_records, block, record_traj, record_diag, metropolis, energy_limit > 0);
  const ScreenSpec screen = o.screen(energy_limit, energy_growth);
  const uint64_t seed_value = run_seed(seed, generator);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "langevin_chain", [&] {
    auto rec = recorder<scalar_t>(o, n, d, n_records, thin);
    if (block == WIDE)
      langevin_run<scalar_t, WIDE>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n,
                                   make_energy<scalar_t, WIDE>(kind, params, mean, prec, d), eta.data_ptr<double>(),
                                   scale.data_ptr<double>(), n_steps, metropolis, rec, seed_value, screen);
    else
      langevin_run<scalar_t, NARROW>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n,
                                     make_energy<scalar_t, NARROW>(kind, params, mean, prec, d), eta.data_ptr<double>(),
                                     scale.data_ptr<double>(), n_steps, metropolis, rec, seed_value, screen);
  });
  return o.pack(out);
}

std::vector<torch::Tensor> hmc_chain(torch::Tensor x, int64_t kind, std::vector<double> params, torch::Tensor mean,
                                     torch::Tensor prec, torch::Tensor step_sizes, int64_t n_leapfrog, double mass,
                                     int64_t thin, bool record_traj, bool record_diag, int64_t seed,
                                     std::optional<at::Generator> generator) {
  check_inputs(x, kind, mean, prec);
  pybind11::gil_scoped_release no_gil;
  TORCH_CHECK(step_sizes.scalar_type() == torch::kFloat64, "step_sizes must be float64");
  TORCH_CHECK(n_leapfrog >= 1 && mass > 0 && thin >= 1, "bad n_leapfrog, mass or thin");
  const int64_t n_steps = step_sizes.numel(), n = x.size(0), d = x.size(1), n_records = n_steps / thin;
  auto out = torch::empty(x.sizes(), x.options());
  auto eta = step_sizes.contiguous();
  const Outputs o = make_outputs(x, n_records, NARROW, record_traj, record_diag, true, false);
  const uint64_t seed_value = run_seed(seed, generator);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hmc_chain", [&] {
    hmc_run<scalar_t, NARROW>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n,
                              make_energy<scalar_t, NARROW>(kind, params, mean, prec, d), eta.data_ptr<double>(),
                              n_steps, n_leapfrog, mass, recorder<scalar_t>(o, n, d, n_records, thin), seed_value);
  });
  return o.pack(out);
}

// [E(x), grad E(x)] through the kernels' own code (for testing against the Python models).
std::vector<torch::Tensor> energy_and_gradient(torch::Tensor x, int64_t kind, std::vector<double> params,
                                               torch::Tensor mean, torch::Tensor prec) {
  check_inputs(x, kind, mean, prec);
  const int64_t n = x.size(0), d = x.size(1);
  constexpr int L = NARROW;
  auto energy = torch::empty({n}, x.options());
  auto grad = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "energy_and_gradient", [&] {
    auto E = make_energy<scalar_t, L>(kind, params, mean, prec, d);
    std::vector<scalar_t> xb(d * L), gb(d * L), work(d * L);
    scalar_t eb[L];
    for (int64_t c0 = 0; c0 < n; c0 += L) {
      const int nv = (int)std::min<int64_t>(L, n - c0);
      load_block<L>(x.data_ptr<scalar_t>(), c0, nv, d, xb.data());
      E.eval(xb.data(), gb.data(), eb, work.data());
      store_block<L>(grad.data_ptr<scalar_t>(), c0, nv, d, gb.data());
      for (int j = 0; j < nv; ++j) energy.data_ptr<scalar_t>()[c0 + j] = eb[j];
    }
  });
  return {energy, grad};
}

// The energies' codes in the order of their values (TEBM_ENERGIES): what Python's table is checked against.
std::vector<std::string> energy_kinds() { return {std::begin(KIND_NAMES), std::end(KIND_NAMES)}; }

// Whether every element of x is finite (one pass, no temporaries: the samplers' check of the start points).
bool all_finite(torch::Tensor x) {
  if (!x.device().is_cpu() || !x.is_contiguous() ||
      (x.scalar_type() != torch::kFloat32 && x.scalar_type() != torch::kFloat64))
    return torch::isfinite(x).all().item<bool>();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "all_finite", [&] {
    const scalar_t *p = x.data_ptr<scalar_t>();
    const int64_t m = x.numel();
    for (int64_t i = 0; i < m; ++i) ok &= (bool)std::isfinite(p[i]);
  });
  return ok;
}

// The first n normals of each chain's stream, [n_chains, n] (for testing the generator).
torch::Tensor standard_normal(int64_t n_chains, int64_t n, int64_t seed) {
  constexpr int L = NARROW;
  auto out = torch::empty({n_chains, n}, torch::kFloat64);
  std::vector<double> z(n * L);
  Rng<L> rng;
  for (int64_t c0 = 0; c0 < n_chains; c0 += L) {
    const int nv = (int)std::min<int64_t>(L, n_chains - c0);
    rng.seed((uint64_t)seed, c0);
    fill_normal(rng, z.data(), n);
    store_block<L>(out.data_ptr<double>(), c0, nv, n, z.data());
  }
  return out;
}

int64_t max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
