// Fused per-offset CNTK kernels.  The math is in cntk_engine/arch.py; this file implements it.
//
// Algorithm (one warp = one packed offset grid of one pair, all layers in registers)
// -------------------------------------------------------------------------------
// The 4-D covariance of a pair splits into (2H-1)(2W-1) offset slices that never mix.  The four
// slices of offsets (dy, dx), (dy, dx - W), (dy - H, dx), (dy - H, dx - W), 0 <= dy < H,
// 0 <= dx < W, have sizes (H-dy)(W-dx), (H-dy)dx, dy(W-dx) and dy*dx: together exactly one
// H x W grid, in which entry (i, j) pairs x at (i, j) with z at ((i + dy) mod H,
// (j + dx) mod W).  The box sum of each slice must not cross the seams at row H - dy and
// column W - dx (nor the outer border): neighbour taps across them are masked.  So each pair
// has H*W packed grids of H*W entries (H^2 W^2 in all, no waste); flatten needs grid (0, 0).
//
// A warp owns one packed grid: lane j holds column j, rows 0..HMAX-1 in registers (HMAX a
// compile-time bound >= H, unrolled so the register arrays stay in registers), for W <= 32.
// Per layer and row: the ReLU step (arccos kernel) per entry, then the k x k box sum: the
// horizontal taps come from warp shuffles, the vertical taps from the neighbouring registers.
// Per-image diagonals q are read from global memory (L1-resident: 2 loads per entry-layer);
// nothing 4-D is ever stored.  Readout sums: per lane over rows in T, then in float64 through
// a fixed shuffle tree, per warp into shared memory, and over the block's warps in a fixed
// order: deterministic, no atomics.  One block per pair, its warps stride over the grids.
//
// float: arccos via Abramowitz-Stegun 4.4.46 (|err| <= 2e-8), rsqrtf; double: acos, 1/sqrt.
#include <cuda_runtime.h>

#include "cntk_kernels.cuh"

namespace cntk {
namespace {

constexpr int kMaxWarps = 8;

template <typename T> struct Math;
// sqrt.approx.f32: one MUFU instruction (relative error ~2^-23) instead of the IEEE sqrtf
// sequence; its inputs here are in [0, 2], where it is as accurate as float32 arithmetic needs.
__device__ __forceinline__ float sqrt_approx(float v) {
  float r;
  asm("sqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}

template <> struct Math<float> {
  __device__ static float rsqrt_(float p) { return rsqrtf(p); }
  __device__ static float sqrt_(float v) { return sqrt_approx(v); }
  // Kdot = (pi - arccos(c)) / (2 pi), c in [-1, 1]: Abramowitz-Stegun 4.4.46 with 1/(2 pi)
  // folded into its coefficients: t = arccos(|c|) / (2 pi); Kdot = 1/2 - t (c >= 0) or t.
  __device__ static float kdot(float c) {
    float a = fabsf(c);
    float poly = -2.0093169917e-04f;
    poly = fmaf(poly, a, 1.0615778103e-03f);
    poly = fmaf(poly, a, -2.7196596574e-03f);
    poly = fmaf(poly, a, 4.9165955626e-03f);
    poly = fmaf(poly, a, -7.9854885933e-03f);
    poly = fmaf(poly, a, 1.4161445676e-02f);
    poly = fmaf(poly, a, -3.4154460056e-02f);
    poly = fmaf(poly, a, 2.4999999653e-01f);
    float t = sqrt_approx(1.0f - a) * poly;
    return c >= 0.0f ? 0.5f - t : t;
  }
};
template <> struct Math<double> {
  __device__ static double rsqrt_(double p) { return 1.0 / sqrt(p); }
  __device__ static double sqrt_(double v) { return sqrt(v); }
  __device__ static double kdot(double c) { return (3.141592653589793238 - acos(c)) * 0.15915494309189535; }
};

// Is the tap at offset o from position pos (along one axis of length n, seam at `seam`) part of
// the same slice?  Slices: [0, seam) and [seam, n).
__device__ __forceinline__ bool same_side(int pos, int o, int n, int seam) {
  int q = pos + o;
  return q >= 0 && q < n && ((pos < seam) == (q < seam));
}

// In-place k x k box sums (radius R) of the two packed grids a and b (Sigma's and Theta's
// inputs), held as [0..HMAX) per lane.  Lane taps come from shuffles, row taps from registers;
// a tap is dropped where it crosses the seam (row seam_r, column seam_c) or the border.
template <typename T, int HMAX, int R, bool FULL>
__device__ __forceinline__ void box2(T (&a)[HMAX], T (&b)[HMAX], int lane, int H, int W,
                                     int seam_r, int seam_c) {
  if constexpr (R == 0) return;
  T mask[2 * R + 1];
#pragma unroll
  for (int o = -R; o <= R; ++o) mask[o + R] = same_side(lane, o, W, seam_c) ? T(1) : T(0);
#pragma unroll
  for (int i = 0; i < HMAX; ++i) {
    T sa = a[i], sb = b[i];
#pragma unroll
    for (int o = 1; o <= R; ++o) {
      sa = fma(mask[R - o], __shfl_up_sync(0xffffffffu, a[i], o), sa);
      sa = fma(mask[R + o], __shfl_down_sync(0xffffffffu, a[i], o), sa);
      sb = fma(mask[R - o], __shfl_up_sync(0xffffffffu, b[i], o), sb);
      sb = fma(mask[R + o], __shfl_down_sync(0xffffffffu, b[i], o), sb);
    }
    a[i] = sa;
    b[i] = sb;
  }
  T above_a[R > 0 ? R : 1], above_b[R > 0 ? R : 1];
#pragma unroll
  for (int o = 0; o < R; ++o) above_a[o] = above_b[o] = T(0);
#pragma unroll
  for (int i = 0; i < HMAX; ++i) {
    const T ca = a[i], cb = b[i];
    T sa = ca, sb = cb;
#pragma unroll
    for (int o = 1; o <= R; ++o) {
      // row i - o: in the image, and no seam in (i - o, i]
      if (i - o >= 0 && (FULL || i - o < H) && (unsigned)(i - seam_r) >= (unsigned)o) {
        sa += above_a[o - 1];
        sb += above_b[o - 1];
      }
      // row i + o: in the image, and no seam in (i, i + o]
      if (i + o < HMAX && (FULL || i + o < H) && (unsigned)(seam_r - 1 - i) >= (unsigned)o) {
        sa += a[i + o];
        sb += b[i + o];
      }
    }
#pragma unroll
    for (int o = R - 1; o > 0; --o) {
      above_a[o] = above_a[o - 1];
      above_b[o] = above_b[o - 1];
    }
    above_a[0] = ca;
    above_b[0] = cb;
    a[i] = sa;
    b[i] = sb;
  }
}

template <typename T, int HMAX, int R, bool FULL>
__global__ void __launch_bounds__(32 * kMaxWarps)
pair_sums_kernel(const T* __restrict__ xa, const T* __restrict__ qa, const T* __restrict__ xb,
                 const T* __restrict__ qb, const int32_t* __restrict__ pair_a,
                 const int32_t* __restrict__ pair_b, int C, int H_, int W_, int L, T w_first, T w,
                 T b2, const int32_t* __restrict__ slot, int n_out, bool gap, bool fix,
                 bool same_set, double* __restrict__ out) {
  // FULL: H == HMAX and W == 32 at compile time, so no row or lane guards remain.
  const int H = FULL ? HMAX : H_;
  const int W = FULL ? 32 : W_;
  extern __shared__ double part[];  // [warps][n_out][2]
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int64_t p = blockIdx.x;
  const int ia = pair_a[p], ib = pair_b[p];
  const int HW = H * W;
  const T* xA = xa + (int64_t)ia * C * HW;
  const T* xB = xb + (int64_t)ib * C * HW;
  // q is stored with its rows twice, (N, L, 2H, W), so z's rotated row i + dy needs no wrap
  const T* qA = qa + (int64_t)ia * L * 2 * HW;
  const T* qB = qb + (int64_t)ib * L * 2 * HW;
  const bool lane_ok = FULL || lane < W;
  const T inv2pi = T(0.15915494309189535);

  for (int t = threadIdx.x; t < nwarps * n_out * 2; t += blockDim.x) part[t] = 0.0;
  __syncthreads();
  double* mypart = part + warp * n_out * 2;

  const int n_grids = gap ? HW : 1;
  for (int g = warp; g < n_grids; g += nwarps) {
    const int dy = g / W, dx = g - (g / W) * W;
    const int seam_r = H - dy, seam_c = W - dx;
    const bool self_diag = same_set && ia == ib && dy == 0 && dx == 0;
    int zc = lane + dx;
    if (zc >= W) zc -= W;

    T sig[HMAX], th[HMAX];
    // layer 1 input: channel sum of x(i, j) z((i + dy) mod H, (j + dx) mod W)
#pragma unroll
    for (int i = 0; i < HMAX; ++i) {
      T s = T(0);
      if ((FULL || i < H) && lane_ok) {
        int zr = i + dy;
        if (zr >= H) zr -= H;
        for (int c = 0; c < C; ++c) s = fma(xA[c * HW + i * W + lane], xB[c * HW + zr * W + zc], s);
      }
      sig[i] = s;
      th[i] = T(0);
    }
    box2<T, HMAX, R, FULL>(sig, th, lane, H, W, seam_r, seam_c);
#pragma unroll
    for (int i = 0; i < HMAX; ++i) {
      const bool ok = (FULL || i < H) && lane_ok;
      sig[i] = ok ? fma(w_first, sig[i], b2) : T(0);
      th[i] = fix ? T(0) : sig[i];
    }

    for (int l = 0; l < L; ++l) {
      const T* qx = qA + l * 2 * HW + lane;
      const T* qz = qB + l * 2 * HW + dy * W + zc;
#pragma unroll
      for (int i = 0; i < HMAX; ++i) {
        T kk = T(0), gg = T(0);
        if ((FULL || i < H) && lane_ok) {
          const T prod = qx[i * W] * qz[i * W];
          const T s = sig[i];
          const T rs = prod > T(0) ? Math<T>::rsqrt_(prod) : T(0);  // zero variance: c := 0
          T c = s * rs;
          c = fmin(fmax(c, T(-1)), T(1));
          if (self_diag) c = T(1);
          const T kdot = Math<T>::kdot(c);
          const T norm = prod * rs;  // sqrt(q_x q_z)
          kk = fma(norm * inv2pi, Math<T>::sqrt_(fma(-c, c, T(1))), kdot * s);
          gg = th[i] * kdot;
        }
        sig[i] = kk;
        th[i] = gg;
      }
      const int t_out = slot[l];
      if (t_out >= 0) {  // warp-uniform: row sums, then a fixed shuffle tree in float64
        T rk = T(0), rg = T(0);
#pragma unroll
        for (int i = 0; i < HMAX; ++i) {
          rk += sig[i];
          rg += th[i];
        }
        double dk = (double)rk, dg = (double)rg;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          dk += __shfl_xor_sync(0xffffffffu, dk, o);
          dg += __shfl_xor_sync(0xffffffffu, dg, o);
        }
        if (lane == 0) {
          mypart[2 * t_out] += dk;
          mypart[2 * t_out + 1] += dg;
        }
      }
      if (l + 1 < L) {
        box2<T, HMAX, R, FULL>(sig, th, lane, H, W, seam_r, seam_c);
#pragma unroll
        for (int i = 0; i < HMAX; ++i) {
          const bool ok = (FULL || i < H) && lane_ok;
          sig[i] = ok ? fma(w, sig[i], b2) : T(0);
          th[i] = ok ? fma(w, th[i], sig[i]) : T(0);
        }
      }
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < n_out * 2; t += blockDim.x) {
    double acc = 0.0;
    for (int k = 0; k < nwarps; ++k) acc += part[k * n_out * 2 + t];
    out[p * n_out * 2 + t] = acc;
  }
}

template <typename T, int HMAX, int R>
cudaError_t launch_t(const void* xa, const void* qa, const void* xb, const void* qb,
                     const int32_t* pa, const int32_t* pb, int64_t n_pairs, int C, int H, int W,
                     int L, LayerScalars s, const int32_t* slot, int n_out, bool gap, bool fix,
                     bool same_set, double* out, cudaStream_t stream) {
  const int n_grids = gap ? H * W : 1;
  const int warps = n_grids < kMaxWarps ? n_grids : kMaxWarps;
  const size_t smem = sizeof(double) * warps * n_out * 2;
  // grid.x holds up to 2^31 - 1 blocks: one per pair
  if constexpr (HMAX == 32) {
    if (H == 32 && W == 32) {  // the CIFAR-sized fast path: no guards at all
      pair_sums_kernel<T, 32, R, true><<<(unsigned)n_pairs, 32 * warps, smem, stream>>>(
          static_cast<const T*>(xa), static_cast<const T*>(qa), static_cast<const T*>(xb),
          static_cast<const T*>(qb), pa, pb, C, H, W, L, T(s.w_first), T(s.w), T(s.b2), slot,
          n_out, gap, fix, same_set, out);
      return cudaGetLastError();
    }
  }
    pair_sums_kernel<T, HMAX, R, false><<<(unsigned)n_pairs, 32 * warps, smem, stream>>>(
        static_cast<const T*>(xa), static_cast<const T*>(qa), static_cast<const T*>(xb),
        static_cast<const T*>(qb), pa, pb, C, H, W, L, T(s.w_first), T(s.w), T(s.b2), slot, n_out,
        gap, fix, same_set, out);
  return cudaGetLastError();
}

template <typename T, int HMAX>
cudaError_t dispatch_r(int R, const void* xa, const void* qa, const void* xb, const void* qb,
                       const int32_t* pa, const int32_t* pb, int64_t n, int C, int H, int W, int L,
                       LayerScalars s, const int32_t* slot, int n_out, bool gap, bool fix,
                       bool same, double* out, cudaStream_t st) {
  switch (R) {
    case 0: return launch_t<T, HMAX, 0>(xa, qa, xb, qb, pa, pb, n, C, H, W, L, s, slot, n_out, gap, fix, same, out, st);
    case 1: return launch_t<T, HMAX, 1>(xa, qa, xb, qb, pa, pb, n, C, H, W, L, s, slot, n_out, gap, fix, same, out, st);
    case 2: return launch_t<T, HMAX, 2>(xa, qa, xb, qb, pa, pb, n, C, H, W, L, s, slot, n_out, gap, fix, same, out, st);
    default: return launch_t<T, HMAX, 3>(xa, qa, xb, qb, pa, pb, n, C, H, W, L, s, slot, n_out, gap, fix, same, out, st);
  }
}

template <typename T>
cudaError_t dispatch_h(const void* xa, const void* qa, const void* xb, const void* qb,
                       const int32_t* pa, const int32_t* pb, int64_t n, int C, int H, int W, int L,
                       int R, LayerScalars s, const int32_t* slot, int n_out, bool gap, bool fix,
                       bool same, double* out, cudaStream_t st) {
  if (H <= 8) return dispatch_r<T, 8>(R, xa, qa, xb, qb, pa, pb, n, C, H, W, L, s, slot, n_out, gap, fix, same, out, st);
  if (H <= 16) return dispatch_r<T, 16>(R, xa, qa, xb, qb, pa, pb, n, C, H, W, L, s, slot, n_out, gap, fix, same, out, st);
  return dispatch_r<T, 32>(R, xa, qa, xb, qb, pa, pb, n, C, H, W, L, s, slot, n_out, gap, fix, same, out, st);
}

}  // namespace

const char* unsupported_shape(int H, int W, int filter_size, int n_out) {
  if (H < 1 || W < 1) return "image height and width must be >= 1";
  if (H > 32 || W > 32) return "the CUDA kernels take images of at most 32 x 32 pixels (one warp lane per column, one register per row)";
  if (filter_size < 1 || filter_size % 2 == 0 || filter_size > 7) return "the CUDA kernels take odd filter sizes 1, 3, 5 or 7";
  if (n_out < 1 || n_out > 64) return "the CUDA kernels read out 1 to 64 depths per pass";
  return nullptr;
}

int launch_pair_sums(const void* xa, const void* qa, const void* xb, const void* qb,
                     const int32_t* pair_a, const int32_t* pair_b, int64_t n_pairs, int C, int H,
                     int W, int L, int filter_size, LayerScalars s, const int32_t* slot, int n_out,
                     bool gap, bool fix, bool same_set, bool is_double, double* out,
                     std::uintptr_t stream) {
  if (n_pairs <= 0) return (int)cudaSuccess;
  if (unsupported_shape(H, W, filter_size, n_out) != nullptr) return (int)cudaErrorInvalidValue;
  if (n_pairs > 2147483647LL) return (int)cudaErrorInvalidConfiguration;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int R = filter_size / 2;
  cudaError_t e = is_double
      ? dispatch_h<double>(xa, qa, xb, qb, pair_a, pair_b, n_pairs, C, H, W, L, R, s, slot, n_out, gap, fix, same_set, out, st)
      : dispatch_h<float>(xa, qa, xb, qb, pair_a, pair_b, n_pairs, C, H, W, L, R, s, slot, n_out, gap, fix, same_set, out, st);
  return (int)e;
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
int set_device(int device) { return (int)cudaSetDevice(device); }
int device_count(int* n) { return (int)cudaGetDeviceCount(n); }
int synchronize() { return (int)cudaDeviceSynchronize(); }

}  // namespace cntk
