// Fused per-offset CNTK kernels (templates).  The math is in cntk_engine/arch.py; the per-entry
// ReLU step in relu_step.cuh.  Instantiated by the cntk_inst_*.cu files (one per dtype and row
// bound, so the build compiles them in parallel); launched by cntk_kernels.cu.
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
// Per layer and row: the ReLU step (relu_step.cuh) per entry, then the k x k box sum of K and
// G together: horizontal taps from warp shuffles (seam/border masks per lane, computed once per
// box), vertical taps from the neighbouring registers (seam predicates per row).  Per-image
// diagonals come precomputed as interleaved pairs (sqrt(q / 2 pi), 1 / sqrt(q)) per layer and
// pixel: one 8-byte (float) load per image side per entry-layer, L1-resident; the x side is
// addressed with immediates (row i = constant offset), the z side as
// ((dy*W + zc) + W*i) mod (H*W) for 32x32 (two integer ops + one address op).  Nothing 4-D is
// ever stored.  Readout sums (only at readout layers): per lane over rows in T, then in float64
// through a fixed shuffle tree, per warp into shared memory, and over the block's warps in a
// fixed order: deterministic, no atomics.  One block per pair, its warps stride over the grids.
//
// Count per entry and layer (32x32, k = 3, float; see bench/NOTES.md): 2 loads, 3 integer,
// 2 MUFU (sqrt), 7 FFMA for arccos, ~10 other FP32 for the ReLU step, 4 SHFL + 4 FFMA + 4 FADD
// + 2 ISETP for the box sums, 2 FFMA for the layer scalars: ~40 issue slots.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cntk_kernels.cuh"
#include "relu_step.cuh"

namespace cntk {
namespace detail {

constexpr int kMaxWarps = 8;

template <typename T> struct Vec2;
template <> struct Vec2<float> { using type = float2; };
template <> struct Vec2<double> { using type = double2; };

// An opaque copy of a pointer (see its use in the layer loop).
template <typename P>
__device__ __forceinline__ const P* launder(const P* p) {
  unsigned long long v = reinterpret_cast<unsigned long long>(p);
  asm("mov.b64 %0, %0;" : "+l"(v));
  return reinterpret_cast<const P*>(v);
}

// Is the tap at offset o from position pos (along one axis of length n, seam at `seam`) part of
// the same slice?  Slices: [0, seam) and [seam, n).
__device__ __forceinline__ bool same_side(int pos, int o, int n, int seam) {
  int q = pos + o;
  return q >= 0 && q < n && ((pos < seam) == (q < seam));
}

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

// MINB: minimum resident blocks per SM asked of ptxas (2 caps registers at 128 per thread).
template <typename T, int HMAX, int R, bool FULL, int MINB>
__global__ void __launch_bounds__(32 * kMaxWarps, MINB)
pair_sums_kernel(const T* __restrict__ xa, const typename Vec2<T>::type* __restrict__ da,
                 const T* __restrict__ xb, const typename Vec2<T>::type* __restrict__ db,
                 const int32_t* __restrict__ pair_a, const int32_t* __restrict__ pair_b, int C,
                 int H_, int W_, int L, T w_first, T w, T b2, const int32_t* __restrict__ slot,
                 int n_out, bool gap, bool fix, bool same_set, double* __restrict__ out) {
  using V = typename Vec2<T>::type;
  // FULL: H == HMAX == 32 and W == 32 at compile time, so no row or lane guards remain.
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
  const V* dA = da + (int64_t)ia * L * HW;
  const V* dB = db + (int64_t)ib * L * HW;
  const bool lane_ok = FULL || lane < W;

  for (int t = threadIdx.x; t < nwarps * n_out * 2; t += blockDim.x) part[t] = 0.0;
  __syncthreads();
  double* mypart = part + warp * n_out * 2;

  const int n_grids = gap ? HW : 1;
  for (int g = warp; g < n_grids; g += nwarps) {
    const int dy = g / W, dx = g - (g / W) * W;
    const int seam_r = H - dy, seam_c = W - dx;
    const T lo = (same_set && ia == ib && g == 0) ? T(1) : T(0);  // self pair, offset 0: c := 1
    int zc = lane + dx;
    if (zc >= W) zc -= W;
    const unsigned zoff = (unsigned)(dy * W + zc);
    // offset of z's pixel ((i + dy) mod H, zc) in an (H, W) plane
    auto zpix = [&](int i) -> unsigned {
      if constexpr (FULL) {
        return (zoff + 32u * (unsigned)i) & 1023u;
      } else {
        int zr = i + dy;
        if (zr >= H) zr -= H;
        return (unsigned)(zr * W + zc);
      }
    };

    T sig[HMAX], th[HMAX];
    // layer 1 input: channel sum of x(i, j) z((i + dy) mod H, (j + dx) mod W)
#pragma unroll
    for (int i = 0; i < HMAX; ++i) {
      T s = T(0);
      if ((FULL || i < H) && lane_ok) {
        const unsigned zp = zpix(i);
        for (int c = 0; c < C; ++c) s = fma(xA[c * HW + i * W + lane], xB[c * HW + zp], s);
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
      const V* dx_l = dA + l * HW + lane;
      const V* dz_l = dB + l * HW;
      // z rows (i + dy) mod H: rows i < seam_r read z_lo + i W, the others z_hi + i W
      // (laundered so that the compiler keeps two pointers + immediates instead of rebuilding
      // a 64-bit address from the kernel parameter and an index per row)
      const V* z_lo = launder(dz_l + zoff);
      const V* z_hi = launder(z_lo - HW);
#pragma unroll
      for (int i = 0; i < HMAX; ++i) {
        T kk = T(0), gg = T(0);
        if ((FULL || i < H) && lane_ok) {
          const V vx = dx_l[i * W];
          const V vz = FULL ? __ldg((i < seam_r ? z_lo : z_hi) + i * W) : dz_l[zpix(i)];
          relu_step<T>(sig[i], th[i], vx.x, vx.y, vz.x, vz.y, lo, kk, gg);
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

struct Args {
  const void* xa; const void* da; const void* xb; const void* db;
  const int32_t* pa; const int32_t* pb; int64_t n_pairs;
  int C, H, W, L, R;
  LayerScalars s;
  const int32_t* slot; int n_out; bool gap, fix, same_set;
  double* out; cudaStream_t stream;
  int warps_per_block;  // 1..kMaxWarps (blocks are one pair each)
  int min_blocks;       // 1 or 2: __launch_bounds__ variant of the 32x32 float kernels
};

template <typename T, int HMAX, int R, bool FULL, int MINB>
cudaError_t launch_t(const Args& a) {
  using V = typename Vec2<T>::type;
  const int n_grids = a.gap ? a.H * a.W : 1;
  const int want = a.warps_per_block < 1 || a.warps_per_block > kMaxWarps ? kMaxWarps : a.warps_per_block;
  const int warps = n_grids < want ? n_grids : want;
  const size_t smem = sizeof(double) * warps * a.n_out * 2;
  // grid.x holds up to 2^31 - 1 blocks: one per pair (the caller splits larger launches)
  pair_sums_kernel<T, HMAX, R, FULL, MINB><<<(unsigned)a.n_pairs, 32 * warps, smem, a.stream>>>(
      static_cast<const T*>(a.xa), static_cast<const V*>(a.da), static_cast<const T*>(a.xb),
      static_cast<const V*>(a.db), a.pa, a.pb, a.C, a.H, a.W, a.L, T(a.s.w_first), T(a.s.w),
      T(a.s.b2), a.slot, a.n_out, a.gap, a.fix, a.same_set, a.out);
  return cudaGetLastError();
}

template <typename T, int HMAX, bool FULL, int MINB = 1>
cudaError_t dispatch_r(const Args& a) {
  switch (a.R) {
    case 0: return launch_t<T, HMAX, 0, FULL, MINB>(a);
    case 1: return launch_t<T, HMAX, 1, FULL, MINB>(a);
    case 2: return launch_t<T, HMAX, 2, FULL, MINB>(a);
    case 3: return launch_t<T, HMAX, 3, FULL, MINB>(a);
    default: return cudaErrorInvalidValue;
  }
}

// Defined in cntk_inst_*.cu: HMAX = 8, 16, 32 (general shapes) and the 32x32 fast path.
template <typename T> cudaError_t launch_h8(const Args& a);
template <typename T> cudaError_t launch_h16(const Args& a);
template <typename T> cudaError_t launch_h32(const Args& a);
template <typename T> cudaError_t launch_full32(const Args& a);

}  // namespace detail
}  // namespace cntk
