// torchebm fused samplers: what the CPU (kernels.cpp) and CUDA (kernels.cu) builds share.
// - the random streams: splitmix64 seeding per (seed, chain), xoshiro128+, float32 Box-Muller;
// - the analytic energies: each one's formulas and the one list of them, TEBM_ENERGIES, from which the energy codes
//   (Kind) and both devices' dispatch switches are generated;
// - the screening rule that flags a chain for the samplers' checks (screen_chain).
// Everything here is TEBM_HD: plain always-inline host code for the C++ build, __host__ __device__ under nvcc.
// Adding an energy of a known shape: its struct in section "Energies" and one line in TEBM_ENERGIES, here; in Python,
// one entry in `_ENERGIES` of nbs/41_kernels.ipynb. Neither device file changes (a new shape needs a loop in each).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define TEBM_HD __host__ __device__ __forceinline__
#else
#define TEBM_HD inline __attribute__((always_inline))
#endif

namespace tebm {

constexpr double TWO_PI = 6.283185307179586;

// ---- Random numbers ----------------------------------------------------------------------------------------

TEBM_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The xoshiro128+ state of chain `chain` for `seed`: depends on nothing else (not threads, not blocks).
TEBM_HD void seed_chain(uint64_t seed, int64_t chain, uint32_t &s0, uint32_t &s1, uint32_t &s2, uint32_t &s3) {
  const uint64_t key = mix64(seed + 0x9E3779B97F4A7C15ULL);
  const uint64_t a = mix64(key ^ mix64(2 * (uint64_t)chain + 1));
  const uint64_t b = mix64(a + 0x9E3779B97F4A7C15ULL);
  s0 = (uint32_t)a; s1 = (uint32_t)(a >> 32);
  s2 = (uint32_t)b; s3 = (uint32_t)(b >> 32) | 1u;  // never the all-zero state
}

// One xoshiro128+ step.
TEBM_HD uint32_t next_u32(uint32_t &a0, uint32_t &a1, uint32_t &a2, uint32_t &a3) {
  const uint32_t out = a0 + a3, t = a1 << 9;
  a2 ^= a0; a3 ^= a1; a1 ^= a2; a0 ^= a3; a2 ^= t;
  a3 = (a3 << 11) | (a3 >> 21);
  return out;
}

// u in (0, 1] from the top 24 bits of a word.
TEBM_HD float unit_float(uint32_t r) { return ((float)(r >> 8) + 1.0f) * (1.0f / 16777216.0f); }

TEBM_HD float bits_to_float(uint32_t i) { float f; memcpy(&f, &i, 4); return f; }
TEBM_HD uint32_t float_to_bits(float f) { uint32_t i; memcpy(&i, &f, 4); return i; }

// log(u) for u in (0, 1]: exponent from the bits, atanh series on the mantissa (abs. error < 3e-7).
TEBM_HD float log_unit(float u) {
  const uint32_t i = float_to_bits(u);
  int32_t e = (int32_t)((i >> 23) & 0xff) - 127;
  float m = bits_to_float((i & 0x007fffffu) | 0x3f800000u);
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  const float p = 1.0f + s2 * (1.0f / 3.0f + s2 * (1.0f / 5.0f + s2 * (1.0f / 7.0f + s2 * (1.0f / 9.0f))));
  return 2.0f * s * p + (float)e * 0.693147180559945f;
}

// Two independent N(0, 1) from two 32-bit words (Box-Muller; the angle is split into a quadrant
// from the top two bits and a polynomial sin/cos on [-pi/4, pi/4], so a SIMD loop stays branch-free).
TEBM_HD void box_muller(uint32_t r1, uint32_t r2, float &z0, float &z1) {
  const float u1 = unit_float(r1);
  const uint32_t q = r2 >> 30;
  const float f = ((float)((r2 >> 8) & 0x3fffffu) + 0.5f) * (1.0f / 4194304.0f);
  const float y = (f - 0.5f) * 1.5707963267949f, y2 = y * y;
  const float sy = y * (1.0f + y2 * (-1.0f / 6.0f + y2 * (1.0f / 120.0f + y2 * (-1.0f / 5040.0f))));
  const float cy = 1.0f + y2 * (-0.5f + y2 * (1.0f / 24.0f + y2 * (-1.0f / 720.0f + y2 * (1.0f / 40320.0f))));
  const float h = 0.7071067811865476f, ca = h * (cy - sy), sa = h * (cy + sy);
  const float c = (q == 0) ? ca : (q == 1) ? -sa : (q == 2) ? -ca : sa;
  const float s = (q == 0) ? sa : (q == 1) ? ca : (q == 2) ? -sa : -ca;
  const float r = sqrtf(-2.0f * log_unit(u1));
  z0 = r * c; z1 = r * s;
}

// ---- Energies ----------------------------------------------------------------------------------------------
// One struct of static formulas per energy, on its scalar parameters p0, p1, p2 (as the Python table `_ENERGIES` reads
// them from a model), deriving from its shape. The shape says which loop of each device file applies the formulas
// (kernels.cpp: over a block's lanes; kernels.cu: over one chain's coordinates); the loops sum the terms in
// coordinate order. An unused parameter is left unnamed.

// E = base(d) + sum_i term(x_i), grad_i = grad(x_i). `simd`: the CPU's lane loop is marked `#pragma omp simd`, and ULA
// takes its one-pass step (noise, gradient and update fused); false for formulas that call sin or cos, which GCC
// keeps scalar without -ffast-math (every marked loop must vectorise: test_every_lane_loop_vectorizes_on_avx2...).
struct Separable {
  static constexpr bool simd = true;
  template <typename T> TEBM_HD static T base(int64_t, T, T, T) { return T(0); }
};
// E = sum_{i<d-1} term(x_i, x_{i+1}); the pair adds `own` to grad_i and `next` to grad_{i+1} (needs d >= 2).
struct Chained {};
// E = energy(S1, S2, d) of two sums over coordinates, S1 = sum_i sum1(x_i), S2 = sum_i sum2(x_i); energy also gives
// two factors fa, fc of grad_i = grad(x_i, fa, fc).
struct OfTwoSums {};
// E = (x - mean)^T P (x - mean) / 2, grad = P (x - mean), from the tensors mean [d] and P [d, d] (no scalars).
struct Quadratic {};

// E = h * sum (x_i^2 - c)^2, grad = 4 h x (x^2 - c); p0 = h, p1 = c.
struct DoubleWell : Separable {
  template <typename T> TEBM_HD static T grad(T v, T h, T c, T) { return 4 * h * v * (v * v - c); }
  template <typename T> TEBM_HD static T term(T v, T h, T c, T) { const T q = v * v - c; return h * q * q; }
};

// E = k/2 * |x|^2, grad = k x; p0 = k.
struct Harmonic : Separable {
  template <typename T> TEBM_HD static T grad(T v, T k, T, T) { return k * v; }
  template <typename T> TEBM_HD static T term(T v, T k, T, T) { return T(0.5) * k * v * v; }
};

// The multivariate normal with mean `mean` and precision P.
struct Gaussian : Quadratic {};

// E = sum_{i<d-1} (a - x_i)^2 + b (x_{i+1} - x_i^2)^2; p0 = a, p1 = b. `term` kept apart from `grad`: fusing them
// changes the rounding.
struct Rosenbrock : Chained {
  template <typename T> TEBM_HD static void grad(T xi, T xn, T a, T b, T, T &own, T &next) {
    const T t = xn - xi * xi, u = a - xi;
    own = -2 * u - 4 * b * xi * t;
    next = 2 * b * t;
  }
  template <typename T> TEBM_HD static T term(T xi, T xn, T a, T b, T) {
    const T t = xn - xi * xi, u = a - xi;
    return u * u + b * t * t;
  }
};

// E = a d + sum x_i^2 - a cos(2 pi x_i); p0 = a.
struct Rastrigin : Separable {
  static constexpr bool simd = false;
  template <typename T> TEBM_HD static T base(int64_t d, T a, T, T) { return a * (T)d; }
  template <typename T> TEBM_HD static T grad(T v, T a, T, T) {
    using std::sin;
    const T w = T(TWO_PI);
    return 2 * v + a * w * sin(w * v);
  }
  template <typename T> TEBM_HD static T term(T v, T a, T, T) {
    using std::cos;
    const T w = T(TWO_PI);
    return v * v - a * cos(w * v);
  }
};

// E = -a exp(-b sqrt(S1 / d)) - exp(S2 / d) + a + e, S1 = sum x^2, S2 = sum cos(c x); p0..p2 = a, b, c.
// grad_i = fa x_i + fc sin(c x_i). At x = 0 the first term has no gradient (a cone tip); we use 0 there.
struct Ackley : OfTwoSums {
  template <typename T> TEBM_HD static T sum1(T v, T, T, T) { return v * v; }
  template <typename T> TEBM_HD static T sum2(T v, T, T, T c) { using std::cos; return cos(c * v); }
  template <typename T> TEBM_HD static T energy(T s1, T s2, T n, T a, T b, T c, T &fa, T &fc) {
    using std::exp; using std::sqrt;
    const T r = sqrt(s1 / n), ea = exp(-b * r), ec = exp(s2 / n);
    fa = r > 0 ? a * b * ea / (n * r) : T(0);
    fc = ec * c / n;
    return -a * ea - ec + a + T(2.718281828459045);
  }
  template <typename T> TEBM_HD static T grad(T v, T fa, T fc, T, T, T c) { using std::sin; return fa * v + fc * sin(c * v); }
};

// The energies, X(CODE, Formula) each: CODE names the energy in enum Kind (its value, the code Python passes, is its
// position here) and in Python's `_ENERGIES`; Formula is its struct above. Both devices' Energy::eval switch over
// this list, so a new line here reaches both builds.
#define TEBM_ENERGIES(X) \
  X(DOUBLE_WELL, DoubleWell) \
  X(HARMONIC, Harmonic) \
  X(GAUSSIAN, Gaussian) \
  X(ROSENBROCK, Rosenbrock) \
  X(RASTRIGIN, Rastrigin) \
  X(ACKLEY, Ackley)

#define TEBM_KIND_CODE(CODE, Formula) CODE,
enum Kind { TEBM_ENERGIES(TEBM_KIND_CODE) N_KINDS };
#undef TEBM_KIND_CODE

#define TEBM_KIND_NAME(CODE, Formula) #CODE,
constexpr const char *KIND_NAMES[N_KINDS] = {TEBM_ENERGIES(TEBM_KIND_NAME)};  // for the extension to report
#undef TEBM_KIND_NAME

// ---- Screening ----------------------------------------------------------------------------------------------
// What a run tells the sampler's checks, per chain (a superset of what they flag: the sampler runs its exact checks
// only on a run with a flag set): the start or the final state is not finite; the energy at the start or the end is
// not finite or within a factor 2 of the runaway limits (`limit`, `growth` times the start's magnitude floored at 1);
// the final state equals the start (a Metropolis chain that never accepted).
enum Screen : uint8_t { NOT_FINITE = 1, RUNAWAY = 2, NOT_MOVED = 4 };  // NOT_FINITE: the start or the final state

struct ScreenSpec {
  uint8_t *flags;  // [n], or null: no screening
  double limit, growth;
};

// The Screen flags of one chain: final state x, coordinate i at x[i * stride]; x0 the start in the same layout;
// `metropolis` whether the chain can fail to move; e0, e1 the energies at the start and the end.
template <typename T>
TEBM_HD uint8_t screen_chain(const T *x, const T *x0, int64_t d, int64_t stride, bool metropolis, T e0, T e1,
                             double limit, double growth) {
  using std::fabs; using std::isfinite;
  bool finite = true, same = metropolis;
  for (int64_t i = 0; i < d; ++i) {
    const T v = x[i * stride], v0 = x0[i * stride];
    finite = finite && isfinite(v) && isfinite(v0);
    same = same && v == v0;
  }
  const double a0 = fabs((double)e0), a1 = fabs((double)e1);
  const bool runaway = !isfinite(a0) || !isfinite(a1) || a0 > 0.5 * limit || a1 > 0.5 * limit ||
                       a1 > 0.5 * growth * (a0 < 1.0 ? 1.0 : a0);
  return (uint8_t)((finite ? 0 : NOT_FINITE) | (runaway ? RUNAWAY : 0) | (same ? NOT_MOVED : 0));
}

}  // namespace tebm
