// torchebm fused samplers, CUDA build: one thread per chain, per-chain work arrays laid out [d, n_chains] so
// neighbouring threads touch neighbouring addresses. Seeding, xoshiro128+, the energies' formulas and the screening
// rule come from tebm_common.h, the outputs from tebm_outputs.h (both shared with kernels.cpp); entry points
// `tebm_cuda::langevin_chain`, `tebm_cuda::hmc_chain` and `tebm_cuda::energy_kinds`, declared for the C++ side in
// kernels_cuda.h, which binds them under the CPU build's names: the same arguments and outputs on both devices.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <cstdint>
#include <iterator>
#include <string>
#include <type_traits>
#include <vector>

#include "tebm_common.h"
#include "tebm_outputs.h"
#include "kernels_cuda.h"

namespace tebm_cuda {

using namespace tebm;

struct Rng {
  uint32_t s0, s1, s2, s3;
  __device__ void seed(uint64_t seed, int64_t chain) { seed_chain(seed, chain, s0, s1, s2, s3); }
  __device__ uint32_t next() { return next_u32(s0, s1, s2, s3); }
  __device__ float uniform() { return unit_float(next()); }
  // Box-Muller with the device's own logf and sincosf (the CPU build uses tebm::box_muller, whose polynomial
  // form vectorises): the same streams, normals equal to within float rounding, not bit for bit.
  __device__ void normal_pair(float &z0, float &z1) {
    const float u1 = uniform();
    const uint32_t r2 = next();
    const float angle = 6.283185307179586f * ((float)(r2 >> 8) + 0.5f) * (1.0f / 16777216.0f);
    const float r = sqrtf(-2.0f * logf(u1));
    float s, c;
    sincosf(angle, &s, &c);
    z0 = r * c; z1 = r * s;
  }
};

template <typename T>
struct Energy {
  int kind;
  int64_t d, stride;  // coordinate i of this chain lives at x[i * stride]
  T p0, p1, p2;
  const T *mean, *prec;

  __device__ T at(const T *x, int64_t i) const { return x[i * stride]; }

  // g <- grad E(x); returns E(x). `work` is a per-chain [d] scratch (Gaussian only).
  __device__ T eval(const T *x, T *g, T *work) const {
    switch (kind) {
#define TEBM_EVAL(CODE, Formula) case CODE: return eval_as<Formula>(x, g, work);
      TEBM_ENERGIES(TEBM_EVAL)
#undef TEBM_EVAL
    }
    return 0;
  }

  // The loop of F's shape (tebm_common.h) applied to F's formulas.
  template <typename F>
  __device__ __forceinline__ T eval_as(const T *x, T *g, T *work) const {
    T e = 0;
    if constexpr (std::is_base_of<Separable, F>::value) {
      e = F::base(d, p0, p1, p2);
      for (int64_t i = 0; i < d; ++i) { const T v = at(x, i); g[i * stride] = F::grad(v, p0, p1, p2); e += F::term(v, p0, p1, p2); }
    } else if constexpr (std::is_base_of<Chained, F>::value) {
      for (int64_t i = 0; i < d; ++i) g[i * stride] = 0;
      for (int64_t i = 0; i + 1 < d; ++i) {
        T own, next;
        F::grad(at(x, i), at(x, i + 1), p0, p1, p2, own, next);
        g[i * stride] += own;
        g[(i + 1) * stride] += next;
        e += F::term(at(x, i), at(x, i + 1), p0, p1, p2);
      }
    } else if constexpr (std::is_base_of<OfTwoSums, F>::value) {
      T s1 = 0, s2 = 0, fa, fc;
      for (int64_t i = 0; i < d; ++i) { const T v = at(x, i); s1 += F::sum1(v, p0, p1, p2); s2 += F::sum2(v, p0, p1, p2); }
      e = F::energy(s1, s2, (T)d, p0, p1, p2, fa, fc);
      for (int64_t i = 0; i < d; ++i) g[i * stride] = F::grad(at(x, i), fa, fc, p0, p1, p2);
    } else {
      static_assert(std::is_base_of<Quadratic, F>::value, "an energy derives from one of the shapes of tebm_common.h");
      for (int64_t i = 0; i < d; ++i) work[i * stride] = at(x, i) - mean[i];
      for (int64_t i = 0; i < d; ++i) {
        T acc = 0;
        for (int64_t k = 0; k < d; ++k) acc += prec[i * d + k] * work[k * stride];
        g[i * stride] = acc;
        e += T(0.5) * work[i * stride] * acc;
      }
    }
    return e;
  }
};

constexpr int THREADS = 128;
constexpr int BLOCK = 32;  // chains per block of statistics: one warp (THREADS is a multiple of it)

// The sum of v over the lanes of a warp, all of which must call it: a butterfly, so every lane adds the same two
// numbers at each stage (in either order) and ends with the same bits.
__device__ double warp_sum(double v) {
  for (int m = BLOCK / 2; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// What a chain records every `thin`-th step; null pointers mean "not asked for".
template <typename T>
struct Record {
  int64_t n, d, n_records, thin;
  T *traj, *energy, *accepted;  // [n, T, d], [T, n], [T, n]
  double *stats;                // [n_blocks, T, 2, d]: each warp's mean and sum of squared deviations

  // Chain c's state x (coordinate i at x[i * stride]) after `step`. Every lane of a warp calls this, `live` false
  // for the lanes past the last chain: the statistics are a warp reduction.
  __device__ void write(int64_t step, int64_t c, bool live, const T *x, int64_t stride, T e, bool acc) const {
    if ((step + 1) % thin != 0) return;
    const int64_t k = (step + 1) / thin - 1;
    if (k >= n_records) return;
    if (live) {
      if (traj) for (int64_t i = 0; i < d; ++i) traj[(c * n_records + k) * d + i] = x[i * stride];
      if (energy) energy[k * n + c] = e;
      if (accepted) accepted[k * n + c] = acc ? T(1) : T(0);
    }
    if (!stats) return;
    const int64_t blk = c / BLOCK, rest = n - blk * BLOCK;
    const double nv = (double)(rest < BLOCK ? rest : BLOCK);
    double *s = stats + (blk * n_records + k) * 2 * d;
    for (int64_t i = 0; i < d; ++i) {  // two passes, as the CPU build: the mean, then the squared deviations
      const double v = live ? (double)x[i * stride] : 0.0;
      const double m = warp_sum(v) / nv, u = live ? v - m : 0.0, m2 = warp_sum(u * u);
      if (c % BLOCK == 0) { s[i] = m; s[d + i] = m2; }
    }
  }
};

template <typename T>
__device__ void fill_normal(Rng &rng, T *z, int64_t d, int64_t stride) {
  for (int64_t i = 0; i < d; i += 2) {
    float a, b;
    rng.normal_pair(a, b);
    z[i * stride] = (T)a;
    if (i + 1 < d) z[(i + 1) * stride] = (T)b;
  }
}

// One thread's chain c of n, its per-chain arrays laid out [d, n] (coordinate i at [i * s]): the state x with
// g = grad E(x) and energy e, z (the noise, or HMC's momentum), the proposal y with gy = grad E(y), the
// energy's workspace and, when screening, the start x0 with its energy e0; the generator seeded from (seed, c).
// Default-made (nothing loaded) for the lanes past the last chain.
template <typename T>
struct Chain {
  int64_t d = 0, s = 0;
  T *x = nullptr, *g = nullptr, *z = nullptr, *y = nullptr, *gy = nullptr, *work = nullptr, *x0 = nullptr;
  T e = 0, e0 = 0;
  Rng rng;

  __device__ Chain() {}

  // Loads chain c of xs [n, d] into the workspace ws [6, d, n] ([7, d, n] when screening).
  __device__ Chain(const T *xs, T *ws, int64_t c, int64_t n, const Energy<T> &E, uint64_t seed, bool screening)
      : d(E.d), s(n) {
    x = ws + c; g = x + d * n; z = g + d * n; y = z + d * n; gy = y + d * n; work = gy + d * n;
    for (int64_t i = 0; i < d; ++i) x[i * s] = xs[c * d + i];
    rng.seed(seed, c);
    e = E.eval(x, g, work);
    if (screening) {
      x0 = work + d * n;
      for (int64_t i = 0; i < d; ++i) x0[i * s] = x[i * s];
      e0 = e;
    }
  }

  // The Metropolis test log u < log_alpha: if accepted, the chain takes the proposal (y, gy, ey).
  __device__ bool metropolis(T log_alpha, T ey) {
    const bool acc = (T)logf(rng.uniform()) < log_alpha;
    if (acc) {
      for (int64_t i = 0; i < d; ++i) { x[i * s] = y[i * s]; g[i * s] = gy[i * s]; }
      e = ey;
    }
    return acc;
  }
};

// Langevin (ULA) or, if `metropolis`, MALA: one step of a chain; returns whether it moved (always, for ULA).
template <typename T>
struct LangevinMove {
  const double *eta, *scale;
  bool metropolis;

  __device__ bool step(Chain<T> &ch, const Energy<T> &E, int64_t t) const {
    const int64_t d = ch.d, s = ch.s;
    T *xb = ch.x, *gb = ch.g, *z = ch.z, *y = ch.y, *gy = ch.gy;
    const T h = (T)eta[t], cn = (T)(sqrt(2.0 * eta[t]) * scale[t]);
    fill_normal(ch.rng, z, d, s);
    if (!metropolis) {
      for (int64_t i = 0; i < d; ++i) xb[i * s] += -h * gb[i * s] + cn * z[i * s];
      ch.e = E.eval(xb, gb, ch.work);
      return true;
    }
    for (int64_t i = 0; i < d; ++i) y[i * s] = xb[i * s] - h * gb[i * s] + cn * z[i * s];
    const T ey = E.eval(y, gy, ch.work);
    T fwd = 0, bwd = 0;
    for (int64_t i = 0; i < d; ++i) {
      const T r = xb[i * s] - y[i * s] + h * gy[i * s];
      fwd += z[i * s] * z[i * s];
      bwd += r * r;
    }
    // target e^{-E / s^2}, as transitions.MALA
    const T inv_temp = (T)(1.0 / (scale[t] * scale[t]));
    return ch.metropolis((ch.e - ey) * inv_temp - bwd * (T(0.25) * inv_temp / h) + T(0.5) * fwd, ey);
  }
};

// HMC with unit-diagonal mass times `mass`: fresh momentum, n_leapfrog leapfrog steps, the Metropolis test.
template <typename T>
struct HmcMove {
  static constexpr bool metropolis = true;
  const double *eta;
  int64_t n_leapfrog;
  T sqrt_m, inv_m;

  __device__ bool step(Chain<T> &ch, const Energy<T> &E, int64_t t) const {
    const int64_t d = ch.d, s = ch.s;
    T *xb = ch.x, *gb = ch.g, *p = ch.z, *y = ch.y, *gy = ch.gy;
    const T h = (T)eta[t];
    fill_normal(ch.rng, p, d, s);
    T k0 = 0, k1 = 0, ey = 0;
    for (int64_t i = 0; i < d; ++i) {
      p[i * s] *= sqrt_m;
      k0 += p[i * s] * p[i * s];
      y[i * s] = xb[i * s];
      p[i * s] -= T(0.5) * h * gb[i * s];
    }
    for (int64_t l = 0; l < n_leapfrog; ++l) {
      for (int64_t i = 0; i < d; ++i) y[i * s] += h * inv_m * p[i * s];
      ey = E.eval(y, gy, ch.work);
      const T kick = (l + 1 == n_leapfrog) ? T(0.5) * h : h;
      for (int64_t i = 0; i < d; ++i) p[i * s] -= kick * gy[i * s];
    }
    for (int64_t i = 0; i < d; ++i) k1 += p[i * s] * p[i * s];
    return ch.metropolis(ch.e + T(0.5) * inv_m * k0 - ey - T(0.5) * inv_m * k1, ey);
  }
};

// One thread per chain of x [n, d] (updated in place): n_steps moves, each recorded, then screened if `screen` asks
// (screen_chain; only a Metropolis chain can fail to move). The lanes past the last chain in its warp stay for the
// warp's statistics.
template <typename T, typename Move>
__global__ void chain_kernel(T *x, int64_t n, Energy<T> E, Move move, int64_t n_steps, Record<T> rec,
                             ScreenSpec screen, T *ws, uint64_t seed) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c - c % BLOCK >= n) return;  // a whole warp past the last chain
  const bool live = c < n;
  Chain<T> ch = live ? Chain<T>(x, ws, c, n, E, seed, screen.flags != nullptr) : Chain<T>();
  for (int64_t t = 0; t < n_steps; ++t) {
    const bool acc = live && move.step(ch, E, t);
    rec.write(t, c, live, ch.x, ch.s, ch.e, acc);
  }
  if (!live) return;
  if (screen.flags)
    screen.flags[c] = screen_chain(ch.x, ch.x0, ch.d, ch.s, move.metropolis, ch.e0, ch.e, screen.limit,
                                   screen.growth);
  for (int64_t i = 0; i < ch.d; ++i) x[c * ch.d + i] = ch.x[i * ch.s];
}

template <typename T>
Energy<T> make_energy(int64_t kind, const std::vector<double> &params, const torch::Tensor &mean,
                      const torch::Tensor &prec, int64_t d, int64_t stride) {
  Energy<T> E;
  E.kind = (int)kind; E.d = d; E.stride = stride;
  E.p0 = params.size() > 0 ? (T)params[0] : T(0);
  E.p1 = params.size() > 1 ? (T)params[1] : T(0);
  E.p2 = params.size() > 2 ? (T)params[2] : T(0);
  E.mean = kind == GAUSSIAN ? mean.data_ptr<T>() : nullptr;
  E.prec = kind == GAUSSIAN ? prec.data_ptr<T>() : nullptr;
  return E;
}

void check_inputs(const torch::Tensor &x, int64_t kind, const torch::Tensor &mean, const torch::Tensor &prec) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kFloat64, "x must be float32 or float64");
  TORCH_CHECK(kind >= 0 && kind < N_KINDS, "unknown energy kind ", kind);
  if (kind == GAUSSIAN) {
    TORCH_CHECK(mean.device() == x.device() && mean.scalar_type() == x.scalar_type() && mean.is_contiguous(), "mean must match x");
    TORCH_CHECK(prec.device() == x.device() && prec.scalar_type() == x.scalar_type() && prec.is_contiguous(), "precision must match x");
  }
}

// Runs `make_move(T())`'s moves (T the dtype of x) on a copy of x, screening when energy_limit > 0; returns the outputs
// of tebm_outputs.h, the statistics in blocks of one warp.
template <typename MakeMove>
std::vector<torch::Tensor> run_chains(const torch::Tensor &x, int64_t kind, const std::vector<double> &params,
                                      const torch::Tensor &mean, const torch::Tensor &prec, int64_t n_steps,
                                      int64_t thin, bool record_traj, bool record_diag, bool record_accept,
                                      uint64_t seed, double energy_limit, double energy_growth, MakeMove make_move) {
  const int64_t n = x.size(0), d = x.size(1), n_records = n_steps / thin;
  const bool screening = energy_limit > 0;
  auto out = x.clone();
  const Outputs o = make_outputs(x, n_records, BLOCK, record_traj, record_diag, record_accept, screening);
  auto ws = torch::empty({(screening ? 7 : 6) * d * n}, x.options());
  const int blocks = (int)((n + THREADS - 1) / THREADS);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "run_chains", [&] {
    using T = scalar_t;
    const Record<T> rec{n, d, n_records, thin, Outputs::ptr<T>(o.traj), Outputs::ptr<T>(o.energy),
                        Outputs::ptr<T>(o.accepted), Outputs::ptr<double>(o.stats)};
    chain_kernel<T><<<blocks, THREADS, 0, stream>>>(out.data_ptr<T>(), n, make_energy<T>(kind, params, mean, prec, d, n),
                                                    make_move(T()), n_steps, rec, o.screen(energy_limit, energy_growth),
                                                    ws.data_ptr<T>(), seed);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return o.pack(out);
}

// The entry points (kernels_cuda.h): kernels.cpp's langevin_chain and hmc_chain for CUDA tensors.
std::vector<torch::Tensor> langevin_chain(torch::Tensor x, int64_t kind, std::vector<double> params, torch::Tensor mean,
                                          torch::Tensor prec, torch::Tensor step_sizes, torch::Tensor noise_scales,
                                          bool metropolis, int64_t thin, bool record_traj, bool record_diag, int64_t seed,
                                          std::optional<at::Generator> generator, double energy_limit,
                                          double energy_growth) {
  check_inputs(x, kind, mean, prec);
  auto eta = step_sizes.to(x.device(), torch::kFloat64).contiguous();
  auto scale = noise_scales.to(x.device(), torch::kFloat64).contiguous();
  TORCH_CHECK(scale.numel() == eta.numel() && thin >= 1, "bad schedule lengths or thin");
  return run_chains(x, kind, params, mean, prec, eta.numel(), thin, record_traj, record_diag, metropolis,
                    run_seed(seed, generator), energy_limit, energy_growth, [&](auto zero) {
                      using T = decltype(zero);
                      return LangevinMove<T>{eta.data_ptr<double>(), scale.data_ptr<double>(), metropolis};
                    });
}

std::vector<torch::Tensor> hmc_chain(torch::Tensor x, int64_t kind, std::vector<double> params, torch::Tensor mean,
                                     torch::Tensor prec, torch::Tensor step_sizes, int64_t n_leapfrog, double mass,
                                     int64_t thin, bool record_traj, bool record_diag, int64_t seed,
                                     std::optional<at::Generator> generator) {
  check_inputs(x, kind, mean, prec);
  TORCH_CHECK(n_leapfrog >= 1 && mass > 0 && thin >= 1, "bad n_leapfrog, mass or thin");
  auto eta = step_sizes.to(x.device(), torch::kFloat64).contiguous();
  return run_chains(x, kind, params, mean, prec, eta.numel(), thin, record_traj, record_diag, true,
                    run_seed(seed, generator), 0.0, 0.0,
                    [&](auto zero) {
                      using T = decltype(zero);
                      return HmcMove<T>{eta.data_ptr<double>(), n_leapfrog, (T)sqrt(mass), (T)(1.0 / mass)};
                    });
}

// The energies' codes in the order of their values (TEBM_ENERGIES), as kernels.cpp reports them.
std::vector<std::string> energy_kinds() { return {std::begin(KIND_NAMES), std::end(KIND_NAMES)}; }

}  // namespace tebm_cuda
