// Fused kernel of pooled stacks (Myrtle: conv layers at 32 x 32, pool, at 16 x 16, pool, at 8 x 8,
// readout), template over the kernel variant V like the CNN kernel (pair_sums_kernel.cuh, whose
// box sums and per-entry ReLU step it reuses), and its launch.  The math: cntk_engine/arch.py,
// "Pooling stacks"; the numba backend's stack_kernel computes the same sums.
//
// Algorithm (persistent blocks, one pair at a time per block)
// ---------------------------------------------------------
// Within a stage (the conv layers between two pools) every packed offset grid runs through its
// layers on its own, exactly as in the CNN kernel: one warp per grid, lane j = column j, rows in
// registers (HMAX = 32, 16 or 8 per stage), box sums by shuffles and registers, the ReLU step per
// entry with the stage's per-image diagonals.  Only the pooling step exchanges data between
// grids: a pool of window = stride w maps fine entry (p, p') to the coarse entry (p / w, p' / w),
// and fine packed grid (dy, dx) to the coarse packed grids (dy / w + {0, 1}, dx / w + {0, 1})
// modulo the coarse size (Ho, Wo) (proof: i = w P + u, dy = w m + v: (i + dy) / w = P + m +
// [u + v >= w]).  A warp pools its grid's last layer where it holds it: the rows that share a
// coarse row pair (P_y, P'_y) are summed in registers, the lanes that share (P_x, P'_x) by
// shuffles (runs of at most w lanes), and each sum, times 1 / w^4, is added to the next stage's
// input, held in global memory (per block: (Ho Wo)^2 entries of K and of G, 512 KiB in float32
// for Myrtle's 16 x 16 stage; one block per SM of an H100 / H200 holds ~70 MB, about its L2)
// with fire-and-forget atomic adds.  Deterministic: the
// stage's grids are taken in rounds, grids (dy, dx) with dy = a mod P_y, dx = r mod P_x (the
// period P = 2 w where the coarse size is even, else the whole axis), whose coarse targets are
// disjoint, with a block barrier between rounds; so every coarse entry receives its <= 9 * w^4
// contributions in the order of the rounds, whatever the warps' timing (one per round, except
// where a coarse axis has size 1: one lane then adds twice to an entry within a round, in its
// program order, so still deterministic).
// The next stage's grids read their input from there (coalesced rows, through L2: __ldcg, the
// data was written in this launch) and start with the conv's box sum.  The last stage reads out
// the listed grids (those with a nonzero readout weight): per lane row sums in T times the one
// weight (uniform readout, Myrtle: the mean over the 8 x 8 stage), or float64 per-entry weights,
// then the fixed float64 shuffle tree and a fixed order over the warps: no atomics there.
//
// Memory traffic per pair, Myrtle in float32: the 32 x 32 stage pools into 16^4 = 65,536 coarse
// entries of K and G, each the sum of 16 fine entries, arriving in at most 9 adds (the
// register/shuffle sums merge the rest): about 1.2 M atomic adds (4.7 MB) per pair into L2, and
// 0.5 MB read back; the 16 x 16 stage pools into 8^4 entries (1/16 of that).  The images and
// diagonals are read as by the CNN kernel.  Scratch: blocks x (the two largest pooled stages'
// (Ho Wo)^2 x 2 entries), allocated per launch (cudaMallocAsync, stream-ordered).
#pragma once

#include <cstdint>

#include "pair_sums_kernel.cuh"

namespace cntk {
namespace detail {

constexpr int kStackWarps = 8;

template <int V, typename T>
struct StackPair {  // what a block's warps share for the pair being computed
  using D = typename Entry<V, T>::Diag;
  const T* xA;
  const T* xB;
  const D* dA;
  const D* dB;
  bool same_image;  // a self pair of the same set: c := 1 on every stage's offset-(0, 0) entries
};

// One stage of one pair: its packed grids, in rounds, through its conv layers, then the pool
// into `next` (when pw > 0) or the readout (pw == 0) into acc_k, acc_g (per warp, lane 0).
template <int V, typename T, int HMAX, int R, bool FULL>
__device__ __forceinline__ void run_stage(const PairSumsParams& p, const StackPair<V, T>& pr,
                                          int H_, int W_, int layer0, int n_layers, int pw,
                                          const T* in, T* next, double& acc_k, double& acc_g) {
  const int H = FULL ? HMAX : H_;
  const int W = FULL ? 32 : W_;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const bool lane_ok = FULL || lane < W;
  const int HW = H * W;
  const int64_t diag_layer = (int64_t)2 * p.H * p.W;  // D elements per layer (stage 0's size)
  const T w = T(p.w), b2 = T(p.b2);
  const bool first_stage = in == nullptr;

  // the rounds: grids (a + per_y m, r + per_x n); one round of the listed grids at the readout
  int per_y = 1, per_x = 1, Ho = 0, Wo = 0;
  if (pw > 0) {
    Ho = H / pw;
    Wo = W / pw;
    per_y = Ho % 2 == 0 ? 2 * pw : H;
    per_x = Wo % 2 == 0 ? 2 * pw : W;
  }
  const int n_rounds = pw > 0 ? per_y * per_x : 1;
  const int ny = H / per_y, nx = W / per_x;
  const int per_round = pw > 0 ? ny * nx : p.n_grids;
  const T inv_w4 = pw > 0 ? T(1) / T(pw * pw * pw * pw) : T(0);
  const int64_t coarse = (int64_t)Ho * Wo * Ho * Wo;

  for (int round = 0; round < n_rounds; ++round) {
    const int a = round / per_x, r = round - (round / per_x) * per_x;
    for (int k = warp; k < per_round; k += nwarps) {
      int dy, dx;
      if (pw > 0) {
        const int m = k / nx, n = k - (k / nx) * nx;
        dy = a + per_y * m;
        dx = r + per_x * n;
      } else {
        const int g = p.grids[k];
        dy = g / W;
        dx = g - (g / W) * W;
      }
      const int g = dy * W + dx;
      const int seam_r = H - dy, seam_c = W - dx;
      const bool self_diag = pr.same_image && dy == 0 && dx == 0;
      int zc = lane + dx;
      if (zc >= W) zc -= W;

      T sig[HMAX], th[HMAX];
      if (first_stage) {
        first_conv<V, T, HMAX, R, FULL>(sig, th, pr.xA, pr.xB, p.C, H, W, lane, dy, zc, seam_r,
                                     seam_c, T(p.w_first), b2, p.fix);
      } else {  // the pooled K and G of the stage before, then the conv
        const T* ink = in + (int64_t)g * HW + lane;
        const T* ing = ink + (int64_t)HW * HW;
#pragma unroll
        for (int i = 0; i < HMAX; ++i) {
          const bool ok = (FULL || i < H) && lane_ok;
          sig[i] = ok ? __ldcg(ink + i * W) : T(0);
          th[i] = ok ? __ldcg(ing + i * W) : T(0);
        }
        next_conv<V, T, HMAX, R, FULL>(sig, th, lane, H, W, seam_r, seam_c, w, b2);
      }
      for (int li = 0; li < n_layers; ++li) {
        // layer l's diagonals: rows at this stage's width, each image's rows stored twice
        const int64_t l = layer0 + li;
        relu_layer<V, T, HMAX, FULL>(sig, th, pr.dA + l * diag_layer + lane,
                                     pr.dB + l * diag_layer + dy * W + zc, lane, H, W, self_diag);
        if (li + 1 < n_layers) next_conv<V, T, HMAX, R, FULL>(sig, th, lane, H, W, seam_r, seam_c, w, b2);
      }

      if (pw == 0) {  // readout of a listed grid (warp-uniform branch)
        double dk = 0.0, dg = 0.0;
        if (p.readout_w == nullptr) {
          grid_sums<T, HMAX>(sig, th, dk, dg);
        } else {
          if (lane_ok) {
            const double* wt = p.readout_w + (int64_t)k * HW + lane;
#pragma unroll
            for (int i = 0; i < HMAX; ++i) {
              if (FULL || i < H) {
                dk += wt[i * W] * (double)sig[i];
                dg += wt[i * W] * (double)th[i];
              }
            }
          }
          warp_sum(dk, dg);
        }
        acc_k += dk;
        acc_g += dg;
      } else {  // pool into the next stage's input
        // lane j holds x column j, z column zc: coarse columns P_x = j / w, P'_x = zc / w
        const int px = lane / pw;
        int dX = zc / pw - px;
        if (dX < 0) dX += Wo;
        const int key = lane_ok ? px * Wo + dX : -1 - lane;  // lanes with equal keys: one run
        const int key_before = __shfl_up_sync(0xffffffffu, key, 1);
        const bool head = lane_ok && (lane == 0 || key_before != key);
        T* nk = next + px;
        T* ng = nk + coarse;
        T ak = T(0), ag = T(0);
#pragma unroll
        for (int i = 0; i < HMAX; ++i) {
          if (FULL || i < H) {  // warp-uniform
            ak += sig[i];
            ag += th[i];
            int zr = i + dy;
            if (zr >= H) zr -= H;
            const int zr_next = zr + 1 == H ? 0 : zr + 1;
            // the last row of a run of rows with the same (P_y, P'_y)
            if (i + 1 == H || (i + 1) / pw != i / pw || zr_next / pw != zr / pw) {
              T sk = ak, sg = ag;
              for (int o = 1; o < pw; ++o) {
                const T vk = __shfl_down_sync(0xffffffffu, ak, o);
                const T vg = __shfl_down_sync(0xffffffffu, ag, o);
                const int kk = __shfl_down_sync(0xffffffffu, key, o);
                if (lane + o < 32 && kk == key) {
                  sk += vk;
                  sg += vg;
                }
              }
              if (head) {
                const int py = i / pw;
                int dY = zr / pw - py;
                if (dY < 0) dY += Ho;
                const int64_t e = (((int64_t)dY * Wo + dX) * Ho + py) * Wo;
                atomicAdd(nk + e, sk * inv_w4);
                atomicAdd(ng + e, sg * inv_w4);
              }
              ak = T(0);
              ag = T(0);
            }
          }
        }
      }
    }
    if (pw > 0) __syncthreads();  // the next round's grids add to the same coarse entries
  }
}

// One stage, with the row bound of its height.  SQUARE32 (stacks on 32 x 32 images, Myrtle):
// every stage is 32 x 32 (the guard-free instantiation; after pools of window 1) or at most
// 16 x 16, so the guarded HMAX = 32 stage, the one with the most registers, is not compiled into
// that kernel (a kernel's register count is the most any of its stages needs).
template <int V, typename T, int R, bool SQUARE32>
__device__ __forceinline__ void stage(const PairSumsParams& p, const StackPair<V, T>& pr, int H,
                                      int W, int layer0, int n_layers, int pw, const T* in,
                                      T* next, double& acc_k, double& acc_g) {
  if constexpr (SQUARE32) {
    if (H == 32)
      run_stage<V, T, 32, R, true>(p, pr, H, W, layer0, n_layers, pw, in, next, acc_k, acc_g);
    else if (H <= 8)
      run_stage<V, T, 8, R, false>(p, pr, H, W, layer0, n_layers, pw, in, next, acc_k, acc_g);
    else
      run_stage<V, T, 16, R, false>(p, pr, H, W, layer0, n_layers, pw, in, next, acc_k, acc_g);
  } else {
    if (H <= 8)
      run_stage<V, T, 8, R, false>(p, pr, H, W, layer0, n_layers, pw, in, next, acc_k, acc_g);
    else if (H <= 16)
      run_stage<V, T, 16, R, false>(p, pr, H, W, layer0, n_layers, pw, in, next, acc_k, acc_g);
    else
      run_stage<V, T, 32, R, false>(p, pr, H, W, layer0, n_layers, pw, in, next, acc_k, acc_g);
  }
}

// Persistent blocks: block b computes pairs b, b + gridDim.x, ...; `scratch` holds per block
// the pooled inputs of the stages, ping-pong: stage s >= 1 reads part (s - 1) % 2 of the
// block's `per_block` elements (part 1 starts at `part1`).  MINB: blocks per multiprocessor the
// register allocation must allow (__launch_bounds__): 1, or 2 for the candidate of the 32 x 32
// float32 kernel that trades spills for two blocks (PairSumsParams::stack_blocks_per_sm; the
// same instructions in the same order, so the same bits).
template <int V, typename T, int R, bool SQUARE32, int MINB = 1>
__global__ void __launch_bounds__(32 * kStackWarps, MINB)
stack_sums_kernel(const PairSumsParams p, T* __restrict__ scratch, int64_t per_block,
                  int64_t part1) {
  using D = typename Entry<V, T>::Diag;
  double* part = dynamic_shared<double>();  // [warps][2]
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  T* const part0 = scratch + blockIdx.x * per_block;  // the block's two parts of the scratch
  T* const part_1 = part0 + part1;
  const int64_t image = (int64_t)p.C * p.H * p.W;
  const int64_t diag = (int64_t)p.L * 2 * p.H * p.W;
  for (int64_t q = blockIdx.x; q < p.n_pairs; q += gridDim.x) {
    const int ia = p.pair_a[q], ib = p.pair_b[q];
    StackPair<V, T> pr;
    pr.xA = static_cast<const T*>(p.xa) + ia * image;
    pr.xB = static_cast<const T*>(p.xb) + ib * image;
    pr.dA = static_cast<const D*>(p.da) + ia * diag;
    pr.dB = static_cast<const D*>(p.db) + ib * diag;
    pr.same_image = p.same_set && ia == ib;
    double acc_k = 0.0, acc_g = 0.0;
    int layer0 = 0;
    for (int s = 0; s < p.n_stages; ++s) {
      const int H = p.stage_h[s], W = p.stage_w[s];
      const bool last = s + 1 == p.n_stages;
      const int pw = last ? 0 : p.stage_pool[s];
      const T* in = s == 0 ? nullptr : ((s - 1) & 1 ? part_1 : part0);
      T* next = last ? nullptr : (s & 1 ? part_1 : part0);
      if (!last) {  // the next stage's input starts at 0 (its part was read by stage s - 1)
        const int64_t n = 2 * (int64_t)(H / pw) * (W / pw) * (H / pw) * (W / pw);
        for (int64_t e = threadIdx.x; e < n; e += blockDim.x) next[e] = T(0);
        __syncthreads();
      }
      stage<V, T, R, SQUARE32>(p, pr, H, W, layer0, p.stage_layers[s], pw, in, next, acc_k, acc_g);
      layer0 += p.stage_layers[s];
      // orders nothing the others do not (a pooled stage ends with its last round's barrier;
      // after the last stage the barrier before the partial sums are read follows): the host
      // emulation's warp orders give the same bits without it.  Kept: once per stage and pair
      __syncthreads();
    }
    if (lane == 0) {
      part[2 * warp] = acc_k;
      part[2 * warp + 1] = acc_g;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double k = 0.0, g = 0.0;
      for (int i = 0; i < nwarps; ++i) {
        k += part[2 * i];
        g += part[2 * i + 1];
      }
      p.out[2 * q] = k * p.readout_scale;
      p.out[2 * q + 1] = g * p.readout_scale;
    }
    __syncthreads();
  }
}

// The elements of scratch one block needs: (part 0 + part 1, part 1's offset).
inline void stack_scratch(const PairSumsParams& p, int64_t* per_block, int64_t* part1) {
  int64_t size[2] = {0, 0};
  for (int s = 0; s + 1 < p.n_stages; ++s) {
    const int64_t ho = p.stage_h[s] / p.stage_pool[s], wo = p.stage_w[s] / p.stage_pool[s];
    const int64_t n = 2 * ho * wo * ho * wo;
    if (n > size[s & 1]) size[s & 1] = n;
  }
  *part1 = size[0];
  *per_block = size[0] + size[1];
}

template <int V, typename T, int R, bool SQUARE32, int MINB = 1>
int launch_stack(const PairSumsParams& p) {
  auto kernel = stack_sums_kernel<V, T, R, SQUARE32, MINB>;
  const int threads = 32 * kStackWarps;
  const size_t smem = sizeof(double) * kStackWarps * 2;
  int dev = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  if (err != cudaSuccess) return (int)err;
  int64_t blocks = (int64_t)(per_sm > 0 ? per_sm : 1) * (sms > 0 ? sms : 1);
  if (blocks > p.n_pairs) blocks = p.n_pairs;
  int64_t per_block, part1;
  stack_scratch(p, &per_block, &part1);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(p.stream);
  void* scratch = nullptr;
  const size_t bytes = sizeof(T) * (size_t)(per_block > 0 ? per_block : 1) * (size_t)blocks;
  err = cudaMallocAsync(&scratch, bytes, stream);
  if (err != cudaSuccess) return (int)err;
  CNTK_LAUNCH(kernel, (unsigned)blocks, threads, smem, stream, p, static_cast<T*>(scratch),
              per_block, part1);
  err = cudaGetLastError();
  const cudaError_t freed = cudaFreeAsync(scratch, stream);
  return (int)(err != cudaSuccess ? err : freed);
}

// The dispatch over the dtype of one variant's stack kernel, for parameters that passed
// check_pair_sums with n_stages > 0: filter size 3 (R = 1) only (unsupported_stack), as the
// Myrtle networks have, because every R adds about four CNN kernels' compile time
// (docs/cuda_kernels.md).
template <int V>
int launch_stack_variant(const PairSumsParams& p) {
  if constexpr (kBaseVariant<V> != V) {   // v7, v8: their base's stack kernel (pair_sums_kernel.cuh)
    return launch_stack_variant<kBaseVariant<V>>(p);
  } else {
    const bool square32 = p.H == 32 && p.W == 32;
    if (p.stack_blocks_per_sm == 2)  // checked: float32, 32 x 32
      return launch_stack<V, float, 1, true, 2>(p);
    if (p.dtype == Dtype::float64)
      return square32 ? launch_stack<V, double, 1, true>(p) : launch_stack<V, double, 1, false>(p);
    return square32 ? launch_stack<V, float, 1, true>(p) : launch_stack<V, float, 1, false>(p);
  }
}

}  // namespace detail
}  // namespace cntk
