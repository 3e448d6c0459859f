// The per-entry ReLU step of the pair kernels, and the two ways the kernel variants feed it the
// per-image diagonals.  Host and device code: the kernels inline it (pair_sums_kernel.cuh), and
// tests/test_cuda.py compiles it with the host C++ compiler (relu_step_check.cpp) and checks it
// against NumPy.  The math is in cntk_engine/arch.py:
//
//   c    = Sigma / sqrt(q_x q_z), taken as +-1 within 8 ulps of +-1 (and beyond); 0 where
//          q_x q_z = 0; 1 on a self pair's offset-(0, 0) entries
//   Kdot = (pi - arccos c) / (2 pi)
//   K    = sqrt(q_x q_z) sqrt(1 - c^2) / (2 pi) + Kdot Sigma,   G = Theta Kdot
//
// float: arccos via Abramowitz-Stegun 4.4.46 (|err| <= 2e-8) with 1/(2 pi) folded into its
// coefficients, square roots by the one-instruction sqrt.approx (relative error ~2^-23);
// double: acos and sqrt.  On the host (the test build) sqrt.approx is std::sqrt and rsqrtf is
// 1 / std::sqrt.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define CNTK_HD __host__ __device__ __forceinline__
#else
#define CNTK_HD inline
#endif

namespace cntk {

#if !defined(__CUDACC__)
// the float overloads (the global ::fma etc. of <math.h> take doubles); on the device CUDA's
// overloads are found unqualified
using std::fma;
using std::fmax;
using std::fmin;
using std::sqrt;
using std::acos;
using std::copysign;
using std::fabs;
#endif

// sqrt.approx.f32: one MUFU instruction.  FTZ selects sqrt.approx.ftz.f32, which flushes a
// subnormal argument to zero and saves the compiler's rescaling of subnormals around the MUFU.
template <bool FTZ>
CNTK_HD float sqrt_approx(float v) {
#if defined(__CUDA_ARCH__)
  float r;
  if constexpr (FTZ) {
    asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  } else {
    asm("sqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(v));
  }
  return r;
#else
  return std::sqrt(v);
#endif
}

// rcp.approx.ftz.f32: one MUFU instruction (relative error <= 1 ulp), no IEEE division sequence.
CNTK_HD float rcp_approx(float v) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#else
  return 1.0f / v;
#endif
}

CNTK_HD float rsqrt_f32(float p) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(p);
#else
  return 1.0f / std::sqrt(p);
#endif
}

template <typename T, bool FTZ> struct Math;
template <bool FTZ> struct Math<float, FTZ> {
  CNTK_HD static float sqrt_(float v) { return sqrt_approx<FTZ>(v); }
  // Kdot = (pi - arccos(c)) / (2 pi) from a = |c| in [0, 1] and the sign of c: t = arccos(a) /
  // (2 pi) by the polynomial; Kdot = 1/2 - t (c >= 0) or t.
  CNTK_HD static float kdot(float a, bool nonnegative) {
    float poly = -2.0093169917e-04f;
    poly = fmaf(poly, a, 1.0615778103e-03f);
    poly = fmaf(poly, a, -2.7196596574e-03f);
    poly = fmaf(poly, a, 4.9165955626e-03f);
    poly = fmaf(poly, a, -7.9854885933e-03f);
    poly = fmaf(poly, a, 1.4161445676e-02f);
    poly = fmaf(poly, a, -3.4154460056e-02f);
    poly = fmaf(poly, a, 2.4999999653e-01f);
    float t = sqrt_approx<FTZ>(1.0f - a) * poly;
    return nonnegative ? 0.5f - t : t;
  }
};
template <bool FTZ> struct Math<double, FTZ> {
  CNTK_HD static double sqrt_(double v) { return sqrt(v); }
  CNTK_HD static double kdot(double a, bool nonnegative) {
    return (3.141592653589793238 - acos(nonnegative ? a : -a)) * 0.15915494309189535;
  }
};

// The step at one entry from Sigma s and Theta th, given rs = 1 / sqrt(q_x q_z) (0 for a
// zero-variance window, which makes c = 0) and nrm() = sqrt(q_x q_z) / (2 pi): K and G.  nrm is
// a callable so that each variant computes it where the step needs it.
//
// c within 8 ulps of +-1 is +-1, as the reference and numba backends take it (cntk_engine/arch.py,
// SNAP_ULPS): where c = +-1 exactly between different images (an image and a multiple of it,
// matching receptive fields, every entry of one-channel images with filter size 1), c lands a
// few ulps off past the first layer, and arccos's infinite slope would turn that into sqrt(eps).
// The step needs c only as |c| and its sign (arccos(-a) = pi - arccos(a), 1 - c^2 = 1 - a^2), so
// the snap is on a = |c|: one compare (a >= snap, or'ed with the self-pair rule by `|`, since
// `||` makes a branch) and a select.  On a self pair's offset-(0, 0) entries c is Sigma / q >= +0,
// so a := 1 there is c := 1.
template <typename T, bool FTZ, typename Nrm>
CNTK_HD void relu_step(T s, T th, T rs, Nrm nrm, bool self_diag, T& k, T& g) {
  constexpr T snap = sizeof(T) == 8 ? T(1.0 - 8 * 2.220446049250313e-16) : T(1.0f - 8 * 1.1920929e-07f);
  const T c = s * rs;
  T a = fabs(c);
  a = (self_diag | (a >= snap)) ? T(1) : a;
  const T kdot = Math<T, FTZ>::kdot(a, c >= T(0));
  const T n = nrm();
  k = fma(n, Math<T, FTZ>::sqrt_(fma(-a, a, T(1))), kdot * s);
  g = th * kdot;
}

template <typename T> struct Pair { T x, y; };
#if defined(__CUDACC__)
template <typename T> struct Vec2;
template <> struct Vec2<float> { using type = float2; };   // one 8-byte load
template <> struct Vec2<double> { using type = double2; }; // one 16-byte load
#else
template <typename T> struct Vec2 { using type = Pair<T>; };
#endif

// Kernel variants: what each reads per image, entry and layer (its `Diag`, stored by
// backends/cuda.py's prepare with every image's rows twice) and how it turns the two images'
// values into rs and nrm for relu_step.  The variant table (name, description, layout) is in
// cntk_kernels.cu.
template <int V, typename T> struct Entry;

// v3 (the float32 default; measured on an H100 and an H200, docs/cuda_kernels.md): reads q
// (layout "q": one T per image, row and column).  Per entry: prod = q_x q_z, rs = rsqrt(prod) (rsqrtf,
// with the compiler's subnormal fix-ups, and a select for prod = 0), nrm = prod rs / (2 pi);
// both square roots by sqrt.approx.f32 (subnormals handled).  3 MUFU per entry-layer.
template <typename T> struct Entry<3, T> {
  using Diag = T;
  static constexpr bool kFtz = false;
  CNTK_HD static void step(Diag dx, Diag dz, T s, T th, bool self_diag, T& k, T& g) {
    const T prod = dx * dz;
    T rs;
    if constexpr (sizeof(T) == 4) {
      rs = prod > T(0) ? rsqrt_f32(prod) : T(0);  // zero variance: c := 0
    } else {
      rs = prod > T(0) ? T(1) / sqrt(prod) : T(0);
    }
    relu_step<T, kFtz>(s, th, rs, [&] {
      const T norm = prod * rs;  // sqrt(q_x q_z)
      return norm * T(0.15915494309189535);
    }, self_diag, k, g);
  }
};

// v5 (the float64 default; measured on an H200, docs/cuda_kernels.md): reads per-image factors
// (layout "factors": one 2-vector (sqrt(q / 2 pi), 1 / sqrt(q)) per image, row and column,
// 1 / sqrt(q) := 0 where q is below the compute dtype's smallest normal number: zero-variance
// windows, and windows so faint that the product of two such factors would overflow, and c be
// 0 * inf = NaN where they share no pixel; backends/cuda.py, _diag_factors).  Per entry two
// multiplications give rs = 1 / sqrt(q_x q_z) and nrm = sqrt(q_x q_z) / (2 pi): no reciprocal
// square root, no subnormal fix-ups, no zero-variance select (the 0 factor makes c = 0).  Both square roots by
// sqrt.approx.ftz.f32: their arguments 1 - |c| and 1 - c^2 are 0 or >= 2^-24 for a float c in
// [-1, 1], never subnormal, so flushing changes no result.  2 MUFU per entry-layer, and the
// diagonal arrays hold twice the values of v3's.
template <typename T> struct Entry<5, T> {
  using Diag = typename Vec2<T>::type;
  static constexpr bool kFtz = true;
  CNTK_HD static void step(Diag dx, Diag dz, T s, T th, bool self_diag, T& k, T& g) {
    relu_step<T, kFtz>(s, th, dx.y * dz.y, [&] { return dx.x * dz.x; }, self_diag, k, g);
  }
};

// v6 (not measured on a GPU yet): v5's arithmetic with v3's footprint.  Reads u = sqrt(q)
// (layout "sqrt": one T per image, row and column, 0 where q = 0), so its diagonal arrays are
// the size of v3's, half of v5's (v5 ran slower than v3 from depth 6 on, on an H200, with 23 %
// fewer issue slots: docs/cuda_kernels.md suspects the per-pair working set of its two-value
// diagonals).  Per entry P = u_x u_z = sqrt(q_x q_z), nrm = P / (2 pi) and rs = 1 / P by one
// rcp.approx.ftz.f32 (float) or a division (double); rs := 0 (c := 0) where P is below the
// smallest normal number: zero-variance windows (P = 0), and products of windows whose variances
// are below ~1e-38, where K <= P is below 1e-38 too (rcp.approx.ftz of a subnormal is infinite).
// Both square roots by sqrt.approx.ftz.f32, as in v5.  3 MUFU per entry-layer, but none of v3's
// subnormal fix-ups around rsqrtf.
template <typename T> struct Entry<6, T> {
  using Diag = T;
  static constexpr bool kFtz = true;
  CNTK_HD static void step(Diag ux, Diag uz, T s, T th, bool self_diag, T& k, T& g) {
    const T P = ux * uz;
    T rs;
    if constexpr (sizeof(T) == 4) {
      rs = P >= T(1.17549435e-38f) ? rcp_approx(P) : T(0);
    } else {
      rs = P >= T(2.2250738585072014e-308) ? T(1) / P : T(0);
    }
    relu_step<T, kFtz>(s, th, rs, [&] { return P * T(0.15915494309189535); }, self_diag, k, g);
  }
};

// v7 (not measured on a GPU yet): v6's step and diagonals; what differs is in the 32 x 32 pair
// kernel, not here (pair_sums_kernel.cuh, kLayerSync).
template <typename T> struct Entry<7, T> : Entry<6, T> {};

// v8 (not measured on a GPU yet): v3's step and diagonals; what differs is the row-seam test of
// the box sums in the 32 x 32 pair kernel (pair_sums_kernel.cuh, kSeamBits).
template <typename T> struct Entry<8, T> : Entry<3, T> {};

}  // namespace cntk
