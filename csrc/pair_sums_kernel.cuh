// Fused per-offset CNTK pair kernel (template over the kernel variant V), its launch, and the
// one dispatch over (dtype, row bound HMAX, filter radius R, 32 x 32 fast path).  Included by
// one translation unit per variant (pair_sums_v3.cu, _v5.cu, ...), so the variants compile in
// parallel.  The math is in cntk_engine/arch.py; the per-entry ReLU step and what differs
// between the variants in relu_step.cuh (Entry<V, T>) and below (kSeamBits, kLayerSync,
// kBaseVariant).
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
// Per layer and row: the ReLU step (relu_step.cuh) per entry, then the k x k box sum: the
// horizontal taps come from warp shuffles, the vertical taps from the neighbouring registers.
// The per-image diagonal values the variant reads (Entry<V, T>::Diag: q for v3, the factors
// (sqrt(q / 2 pi), 1 / sqrt(q)) for v5, sqrt(q) for v6) come from global memory, stored with every image's rows
// twice (N, L, 2H, W) so that z's rotated row i + dy needs no wrap (L1-resident: 2 loads per
// entry-layer); nothing 4-D is ever stored.  Readout sums: per lane over rows in T, then in
// float64 through a fixed shuffle tree, per warp into shared memory, and over the block's warps
// in a fixed order: deterministic, no atomics.  One block per pair, its warps stride over the
// grids.
//
// Readouts: gap runs all H W grids, flatten grid 0 (its offset-(0, 0) slice is the diagonal);
// the LAP readout (LISTED = true, its own instantiations) runs the grids listed by the launch,
// those with a nonzero weight n_H(dy) n_W(dx) / c^4, each grid's float64 sums times its weight
// (every entry of packed grid (dy, dx) has the circular offset (dy, dx), so the weight is one
// number per grid: cntk_engine/arch.py, CudaBackend.listed_grids).  Flip-symmetrised kernels
// need no kernel of their own: the pairs with the flipped images are a second pair list
// (backends/base.py, Backend.pair_sums).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cntk_kernels.cuh"
#include "device_compat.cuh"
#include "relu_step.cuh"

namespace cntk {
namespace detail {

constexpr int kMaxWarps = 8;

// Is the tap at offset o from position pos (along one axis of length n, seam at `seam`) part of
// the same slice?  Slices: [0, seam) and [seam, n).
__device__ __forceinline__ bool same_side(int pos, int o, int n, int seam) {
  int q = pos + o;
  return q >= 0 && q < n && ((pos < seam) == (q < seam));
}

// Variants v6, v7 and v8 test the row seam as one bit of a loop-invariant mask in their float32
// kernels (box2 below).  Why: with the per-row test (unsigned)(i - seam_r) >= o, ptxas rebuilds
// the 2 x HMAX predicates every layer although seam_r is the same for all layers of a grid; with
// the mask it turns several bits into predicates at once (docs/cuda_kernels.md, "The row seam as
// a mask bit", has the counts).  Not in float64, where the mask makes ptxas spill in the layer
// loop.  v3 and v5 keep the test they were measured with.
template <int V, typename T>
constexpr bool kSeamBits = (V == 6 || V == 7 || V == 8) && sizeof(T) == 4;

// The last R rows' values, newest first: ring[0] = v after ring[o] = ring[o - 1].
template <typename T, int R>
__device__ __forceinline__ void push_front(T (&ring)[R], T v) {
#pragma unroll
  for (int o = R - 1; o > 0; --o) ring[o] = ring[o - 1];
  ring[0] = v;
}

// In-place k x k box sums (radius R) of the two packed grids a and b (Sigma's and Theta's
// inputs), held as [0..HMAX) per lane.  Lane taps come from shuffles, row taps from registers;
// a tap is dropped where it crosses the seam (row seam_r, column seam_c) or the border.  Rows
// i >= H (FULL false) may hold anything afterwards: the callers zero them.
template <int V, typename T, int HMAX, int R, bool FULL>
__device__ __forceinline__ void box2(T (&a)[HMAX], T (&b)[HMAX], int lane, int H, int W,
                                     int seam_r, int seam_c) {
  if constexpr (R > 0) {  // R = 0 (filter_size 1): nothing to add
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
    if constexpr (kSeamBits<V, T>) {
      // Bit r of seam_bit: the seam lies between rows r - 1 and r (none inside when dy = 0,
      // seam_r = H; rows r - 1 and r with 1 <= r < HMAX <= 32 are all that is ever tested).
      // Rows i - o and i add each other's value before this pass when both are in the image
      // and no seam lies in (i - o, i]: one test per pair of rows, with a constant mask.
      // For R = 1 each row sums (centre + above) + below, in the older test's order, so the
      // same bits; for R > 1 the above taps come before the below ones.
      const uint32_t seam_bit = seam_r < 32 ? 1u << seam_r : 0u;
      // rows i - 1 .. i - R as they were before this pass; zeroed only so that the host build's
      // -Wall cannot see a read before the first writes (row i reads orig[o - 1] only for
      // i - o >= 0, written by then): dead stores in the unrolled device code
      T orig_a[R] = {}, orig_b[R] = {};
#pragma unroll
      for (int i = 0; i < HMAX; ++i) {
        const T ca = a[i], cb = b[i];
#pragma unroll
        for (int o = 1; o <= R; ++o) {
          if (i - o >= 0 && (FULL || i < H) && !(seam_bit & (((1u << o) - 1u) << (i - o + 1)))) {
            a[i] += orig_a[o - 1];
            b[i] += orig_b[o - 1];
            a[i - o] += ca;
            b[i - o] += cb;
          }
        }
        push_front(orig_a, ca);
        push_front(orig_b, cb);
      }
    } else {
      T above_a[R], above_b[R];
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
        push_front(above_a, ca);
        push_front(above_b, cb);
        a[i] = sa;
        b[i] = sb;
      }
    }
  }
}

// Sum over the warp's lanes in float64 through a fixed shuffle tree (every lane gets the sums).
__device__ __forceinline__ void warp_sum(double& dk, double& dg) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    dk += __shfl_xor_sync(0xffffffffu, dk, o);
    dg += __shfl_xor_sync(0xffffffffu, dg, o);
  }
}

// The per-grid steps of a layer, shared by the CNN kernel and the stack kernel
// (stack_sums_kernel.cuh).  A warp holds one packed grid: lane = column, rows 0..HMAX-1 in
// sig (Sigma, then K) and th (Theta, then G); H, W are the grid's (compile-time under FULL),
// entries outside it are kept at 0.

// The first conv layer: Sigma_1 = w_first box(sum_c x_c(i, j) z_c((i + dy) mod H, zc)) + b2
// (zc: the lane's z column, (lane + dx) mod W), Theta_1 = Sigma_1, or 0 with fix.
template <int V, typename T, int HMAX, int R, bool FULL>
__device__ __forceinline__ void first_conv(T (&sig)[HMAX], T (&th)[HMAX], const T* xA, const T* xB,
                                           int C, int H, int W, int lane, int dy, int zc,
                                           int seam_r, int seam_c, T w_first, T b2, bool fix) {
  const int HW = H * W;
  const bool lane_ok = FULL || lane < W;
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
  box2<V, T, HMAX, R, FULL>(sig, th, lane, H, W, seam_r, seam_c);
#pragma unroll
  for (int i = 0; i < HMAX; ++i) {
    const bool ok = (FULL || i < H) && lane_ok;
    sig[i] = ok ? fma(w_first, sig[i], b2) : T(0);
    th[i] = fix ? T(0) : sig[i];
  }
}

// A later conv layer, in place from the ReLU's K (sig) and G (th): Sigma = w box(K) + b2,
// Theta = Sigma + w box(G).
template <int V, typename T, int HMAX, int R, bool FULL>
__device__ __forceinline__ void next_conv(T (&sig)[HMAX], T (&th)[HMAX], int lane, int H, int W,
                                          int seam_r, int seam_c, T w, T b2) {
  const bool lane_ok = FULL || lane < W;
  box2<V, T, HMAX, R, FULL>(sig, th, lane, H, W, seam_r, seam_c);
#pragma unroll
  for (int i = 0; i < HMAX; ++i) {
    const bool ok = (FULL || i < H) && lane_ok;
    sig[i] = ok ? fma(w, sig[i], b2) : T(0);
    th[i] = ok ? fma(w, th[i], sig[i]) : T(0);
  }
}

// The ReLU of a layer, in place: K into sig, G into th (relu_step.cuh), with the layer's
// diagonals fx (x's, at the lane's column) and fz (z's, at row dy and column zc), rows W apart.
template <int V, typename T, int HMAX, bool FULL>
__device__ __forceinline__ void relu_layer(T (&sig)[HMAX], T (&th)[HMAX],
                                           const typename Entry<V, T>::Diag* fx,
                                           const typename Entry<V, T>::Diag* fz, int lane, int H,
                                           int W, bool self_diag) {
  const bool lane_ok = FULL || lane < W;
#pragma unroll
  for (int i = 0; i < HMAX; ++i) {
    T kk = T(0), gg = T(0);
    if ((FULL || i < H) && lane_ok) {
      Entry<V, T>::step(fx[i * W], fz[i * W], sig[i], th[i], self_diag, kk, gg);
    }
    sig[i] = kk;
    th[i] = gg;
  }
}

// The sums of K and G over the grid: per lane over rows in T, then in float64 through a fixed
// shuffle tree (every lane ends with the warp's sums).
template <typename T, int HMAX>
__device__ __forceinline__ void grid_sums(const T (&sig)[HMAX], const T (&th)[HMAX], double& dk,
                                          double& dg) {
  T rk = T(0), rg = T(0);
#pragma unroll
  for (int i = 0; i < HMAX; ++i) {
    rk += sig[i];
    rg += th[i];
  }
  dk = (double)rk;
  dg = (double)rg;
  warp_sum(dk, dg);
}

// Variant v7: the block's warps pass a barrier after every layer, in the guard-free 32 x 32 kernel
// (FULL), where every warp of a block runs the same number of grids (gap: 1024 grids over 8
// warps; flatten: one warp), so no warp skips a barrier.  Why: without it a warp runs all layers
// of its grid before taking the next one, so the 16 warps of an SM drift apart by up to L layers,
// and the diagonals they read at once grow with the drift (two pairs' x and z diagonals are
// 24 KB per layer in float32: 480 KB over the 20 layers of depth 21, against 256 KB of L1 and
// shared memory per SM).  In step, a block reads one layer's 12 KB.  The cost: the warps of a
// block wait for the slowest at every layer.  A compile-time flag: as a runtime one, off, it took
// every CNN kernel from 128 to 180-216 registers (docs/cuda_kernels.md).  Everything else of v7
// (other sizes, LAP, pooled stacks) runs v6's kernels: kBaseVariant.
template <int V> constexpr bool kLayerSync = V == 7;

// A variant whose kernels differ from another's only in the guard-free 32 x 32 pair kernel
// compiles only those and launches its base variant's everywhere else (the same Entry, so the
// same diagonals): v7 -> v6, v8 -> v3.  Others are their own base.
template <int V> constexpr int kBaseVariant = V == 7 ? 6 : V == 8 ? 3 : V;

// V: the kernel variant (relu_step.cuh, Entry<V, T>); D its per-image diagonal element.
// LISTED (the LAP readout): the warps stride over the n_listed packed grids listed in `grids`
// (ascending), each grid's readout sums times its weight grid_w (float64) instead of over all
// grids (gap) or grid 0 (flatten).  Compile-time, so that the gap / flatten instantiations
// (LISTED = false) compile to the code they had before LAP (the two pointers and the count are
// the last parameters: the others keep their places).
template <int V, typename T, int HMAX, int R, bool FULL, bool LISTED = false>
__global__ void __launch_bounds__(32 * kMaxWarps)
pair_sums_kernel(const T* __restrict__ xa, const typename Entry<V, T>::Diag* __restrict__ da,
                 const T* __restrict__ xb, const typename Entry<V, T>::Diag* __restrict__ db,
                 const int32_t* __restrict__ pair_a, const int32_t* __restrict__ pair_b, int C,
                 int H_, int W_, int L, T w_first, T w, T b2, const int32_t* __restrict__ slot,
                 int n_out, bool gap, bool fix, bool same_set, double* __restrict__ out,
                 const int32_t* __restrict__ grids, const double* __restrict__ grid_w,
                 int n_listed) {
  using D = typename Entry<V, T>::Diag;
  // FULL: H == HMAX and W == 32 at compile time, so no row or lane guards remain.
  const int H = FULL ? HMAX : H_;
  const int W = FULL ? 32 : W_;
  double* part = dynamic_shared<double>();  // [warps][n_out][2]
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int64_t p = blockIdx.x;
  const int ia = pair_a[p], ib = pair_b[p];
  const int HW = H * W;
  const T* xA = xa + (int64_t)ia * C * HW;
  const T* xB = xb + (int64_t)ib * C * HW;
  // diagonals stored with their rows twice, (N, L, 2H, W), so z's rotated row i + dy needs no wrap
  const D* dA = da + (int64_t)ia * L * 2 * HW;
  const D* dB = db + (int64_t)ib * L * 2 * HW;

  for (int t = threadIdx.x; t < nwarps * n_out * 2; t += blockDim.x) part[t] = 0.0;
  __syncthreads();
  double* mypart = part + warp * n_out * 2;

  int n_grids;
  if constexpr (LISTED) {
    n_grids = n_listed;
  } else {
    n_grids = gap ? HW : 1;
  }
  for (int k = warp; k < n_grids; k += nwarps) {
    int g;
    if constexpr (LISTED) {
      g = grids[k];
    } else {
      g = k;
    }
    const int dy = g / W, dx = g - (g / W) * W;
    const int seam_r = H - dy, seam_c = W - dx;
    const bool self_diag = same_set && ia == ib && dy == 0 && dx == 0;
    int zc = lane + dx;
    if (zc >= W) zc -= W;

    T sig[HMAX], th[HMAX];
    first_conv<V, T, HMAX, R, FULL>(sig, th, xA, xB, C, H, W, lane, dy, zc, seam_r, seam_c, w_first,
                                 b2, fix);
    for (int l = 0; l < L; ++l) {
      relu_layer<V, T, HMAX, FULL>(sig, th, dA + l * 2 * HW + lane, dB + l * 2 * HW + dy * W + zc,
                                   lane, H, W, self_diag);
      const int t_out = slot[l];
      if (t_out >= 0) {  // warp-uniform: row sums, then a fixed shuffle tree in float64
        double dk, dg;
        grid_sums<T, HMAX>(sig, th, dk, dg);
        if constexpr (LISTED) {
          const double wg = grid_w[k];
          dk *= wg;
          dg *= wg;
        }
        if (lane == 0) {
          mypart[2 * t_out] += dk;
          mypart[2 * t_out + 1] += dg;
        }
      }
      if (l + 1 < L) next_conv<V, T, HMAX, R, FULL>(sig, th, lane, H, W, seam_r, seam_c, w, b2);
      if constexpr (kLayerSync<V> && FULL && !LISTED) __syncthreads();
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < n_out * 2; t += blockDim.x) {
    double acc = 0.0;
    for (int k = 0; k < nwarps; ++k) acc += part[k * n_out * 2 + t];
    out[p * n_out * 2 + t] = acc;
  }
}

// The one launch: one block per pair (grid.x holds up to 2^31 - 1 blocks; check_pair_sums
// refuses more), up to kMaxWarps warps striding over the pair's grids.
template <int V, typename T, int HMAX, int R, bool FULL, bool LISTED = false>
int launch(const PairSumsParams& p) {
  using D = typename Entry<V, T>::Diag;
  const int n_grids = LISTED ? p.n_grids : p.gap ? p.H * p.W : 1;
  const int warps = n_grids < kMaxWarps ? n_grids : kMaxWarps;
  const size_t smem = sizeof(double) * warps * p.n_out * 2;
  auto kernel = pair_sums_kernel<V, T, HMAX, R, FULL, LISTED>;
  CNTK_LAUNCH(kernel, (unsigned)p.n_pairs, 32 * warps, smem,
              reinterpret_cast<cudaStream_t>(p.stream), static_cast<const T*>(p.xa),
              static_cast<const D*>(p.da), static_cast<const T*>(p.xb),
              static_cast<const D*>(p.db), p.pair_a, p.pair_b, p.C, p.H, p.W, p.L, T(p.w_first),
              T(p.w), T(p.b2), p.slot, p.n_out, p.gap, p.fix, p.same_set, p.out, p.grids,
              p.grid_w, p.n_grids);
  return (int)cudaGetLastError();
}

template <typename T> struct Type { using type = T; };
template <int N> using Int = std::integral_constant<int, N>;

// The dispatch over (dtype, HMAX in {8, 16, 32}, R in {0..3}, the guard-free 32 x 32 kernel) of
// one variant, for parameters that passed check_pair_sums.  The listed-grid readout (LAP,
// p.n_grids > 0) has one row bound, HMAX = 32 with guards, whatever the image size: 8
// instantiations per variant instead of 32 (compile time; LAP has not been timed on a GPU yet).
template <int V>
int launch_every_kernel(const PairSumsParams& p) {
  if (p.n_grids > 0) {
    auto listed = [&](auto t) -> int {
      using T = typename decltype(t)::type;
      switch (p.filter_size / 2) {
        case 0: return launch<V, T, 32, 0, false, true>(p);
        case 1: return launch<V, T, 32, 1, false, true>(p);
        case 2: return launch<V, T, 32, 2, false, true>(p);
        default: return launch<V, T, 32, 3, false, true>(p);
      }
    };
    return p.dtype == Dtype::float64 ? listed(Type<double>{}) : listed(Type<float>{});
  }
  auto with_radius = [&](auto t, auto hmax) -> int {
    using T = typename decltype(t)::type;
    constexpr int HMAX = decltype(hmax)::value;
    auto go = [&](auto r) -> int {
      constexpr int R = decltype(r)::value;
      if constexpr (HMAX == 32) {
        if (p.H == 32 && p.W == 32) return launch<V, T, 32, R, true>(p);  // no guards at all
      }
      return launch<V, T, HMAX, R, false>(p);
    };
    switch (p.filter_size / 2) {
      case 0: return go(Int<0>{});
      case 1: return go(Int<1>{});
      case 2: return go(Int<2>{});
      default: return go(Int<3>{});
    }
  };
  auto with_rows = [&](auto t) -> int {
    if (p.H <= 8) return with_radius(t, Int<8>{});
    if (p.H <= 16) return with_radius(t, Int<16>{});
    return with_radius(t, Int<32>{});
  };
  return p.dtype == Dtype::float64 ? with_rows(Type<double>{}) : with_rows(Type<float>{});
}

// The launch of variant V for parameters that passed check_pair_sums: all its own kernels, or
// (kBaseVariant) its guard-free 32 x 32 kernels and its base variant's for everything else.
template <int V>
int launch_variant(const PairSumsParams& p) {
  if constexpr (kBaseVariant<V> != V) {
    if (p.n_grids > 0 || p.H != 32 || p.W != 32) return launch_variant<kBaseVariant<V>>(p);
    auto full = [&](auto t) -> int {
      using T = typename decltype(t)::type;
      switch (p.filter_size / 2) {
        case 0: return launch<V, T, 32, 0, true>(p);
        case 1: return launch<V, T, 32, 1, true>(p);
        case 2: return launch<V, T, 32, 2, true>(p);
        default: return launch<V, T, 32, 3, true>(p);
      }
    };
    return p.dtype == Dtype::float64 ? full(Type<double>{}) : full(Type<float>{});
  } else {
    return launch_every_kernel<V>(p);
  }
}

}  // namespace detail
}  // namespace cntk
