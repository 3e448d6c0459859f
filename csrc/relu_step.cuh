// The per-entry ReLU step of the CNTK recursion (cntk_engine/arch.py), shared by the CUDA
// kernels and by a host test harness (tests/test_cuda.py compiles csrc/host_check.cu as host
// code and compares it with NumPy in float64), so it is __host__ __device__ and has no CUDA-only
// dependencies.
//
// Inputs of one entry (p, p') of a pair (x, z) at layer l:
//   s  = Sigma_l(p, p'),  th = Theta_l(p, p')
//   nx = sqrt(q_x(l, p) / (2 pi)), ix = 1 / sqrt(q_x(l, p))  (0 where q_x == 0), same for z
//   lo = 1 on the offset-0 slice of a self pair (c := 1 exactly there), else 0
// Outputs: K = E[relu(u) relu(v)], G = Theta_l * Kdot (see arch.py):
//   c = s ix iz (0 on zero-variance entries), a = clamp(|c|, lo, 1)
//   Kdot = (pi - arccos c) / (2 pi) = 1/2 - arccos(a) / (2 pi)  (c >= 0),  arccos(a) / (2 pi)  (c < 0)
//   K    = sqrt(q_x q_z) sin(theta) / (2 pi) + Kdot s = nx nz sqrt(1 - a^2) + Kdot s
// float: arccos(a) / (2 pi) = sqrt(1 - a) P(a) / (2 pi), P of Abramowitz-Stegun 4.4.46
// (|err(arccos)| <= 2e-8) with its coefficients divided by 2 pi; sqrt.approx.ftz (one MUFU op,
// no denormal fix-ups: its arguments are in [0, 1]).  double: acos and sqrt of libdevice.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define CNTK_HD __host__ __device__ __forceinline__
#else
#define CNTK_HD inline
#endif

namespace cntk {

CNTK_HD float fast_sqrt(float v) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#else
  return std::sqrt(v);
#endif
}

template <typename T> struct Relu;

template <> struct Relu<float> {
  // (pi - arccos c) / (2 pi), given a = |c| clamped to [0, 1]
  CNTK_HD static float kdot(float c, float a) {
    float p = -0.00020093169917452435f;
    p = fmaf(p, a, 0.0010615778102833144f);
    p = fmaf(p, a, -0.0027196596574151598f);
    p = fmaf(p, a, 0.004916595562556603f);
    p = fmaf(p, a, -0.007985488593288423f);
    p = fmaf(p, a, 0.014161445676021473f);
    p = fmaf(p, a, -0.034154460056236936f);
    p = fmaf(p, a, 0.24999999653123448f);
    const float t = fast_sqrt(1.0f - a) * p;  // arccos(a) / (2 pi)
    return c >= 0.0f ? 0.5f - t : t;
  }
  CNTK_HD static float root(float v) { return fast_sqrt(v); }
};

template <> struct Relu<double> {
  CNTK_HD static double kdot(double c, double a) {
    return 0.5 - acos(c >= 0.0 ? a : -a) * 0.15915494309189533577;
  }
  CNTK_HD static double root(double v) { return sqrt(v); }
};

template <typename T>
CNTK_HD void relu_step(T s, T th, T nx, T ix, T nz, T iz, T lo, T& k_out, T& g_out) {
  const T c = s * (ix * iz);
  const T a = fmax(fmin(fabs(c), T(1)), lo);
  const T kd = Relu<T>::kdot(c, a);
  k_out = fma(nx * nz, Relu<T>::root(fma(-a, a, T(1))), kd * s);
  g_out = th * kd;
}

}  // namespace cntk
