// Plain C++ interface of the CUDA kernels (no pybind11 here: this header is read by nvcc and
// by the host compiler that builds the binding).
#pragma once

#include <cstdint>

namespace cntk {

enum class Dtype : int { float32 = 0, float64 = 1 };

// A kernel variant compiled into the extension (the table is in cntk_kernels.cu; what each
// computes differently is in relu_step.cuh, Entry<V, T>).
struct KernelVariant {
  const char* name;         // "v3", "v5", "v6", "v7", "v8": the value of CNTK_ENGINE_CUDA_KERNEL
  const char* description;  // one line
  const char* diag;         // layout of the per-image diagonals it reads: "q", "factors" or "sqrt"
  int diag_width;           // values per image, layer and position in that layout (1 or 2)
  bool gpu_measured;        // run and timed on a GPU (docs/cuda_kernels.md)
  bool default_float32;     // the default for float32 / float64: the fastest variant measured
  bool default_float64;     // on a GPU for that dtype (one per dtype, gpu_measured)
  const char* base;         // the variant whose kernels it launches where it compiled none of its
                            // own (kBaseVariant in pair_sums_kernel.cuh): itself, v6 for v7, v3
                            // for v8
};

// The compiled variants.
int kernel_variant_count();
const KernelVariant& kernel_variant(int index);
// The index of the variant called `name`, or -1.
int find_kernel_variant(const char* name);

constexpr int kMaxStages = 8;  // stages of a pooled stack (conv layers between two pools)

// Everything one launch of the pair kernel needs (see cntk_engine/arch.py and
// backends/base.py).  It computes, for p < n_pairs,
//   out[p, t, 0] = sum of K, out[p, t, 1] = sum of G = Theta * Kdot at the ReLU layer l with
//   slot[l] == t, over all entries (gap) or the offset-0 slice (flatten), or (n_grids > 0, the
//   LAP readout) over the entries of the listed packed grids, each grid's sums times its weight,
// of the image pair (A[pair_a[p]], B[pair_b[p]]).  Packed grid g = dy * W + dx (0 <= dy < H,
// 0 <= dx < W) holds the entries (p, p') with p' - p = (dy, dx) modulo (H, W) (the comment on
// top of pair_sums_kernel.cuh).
struct PairSumsParams {
  // Device pointers; T = float (dtype float32) or double (float64), contiguous.
  const void* xa = nullptr;        // (Na, C, H, W) T: images of set A
  const void* da = nullptr;        // (Na, L, 2H, W, diag_width) T: A's diagonals in the
                                   // variant's layout, every image's rows stored twice
                                   // (da[n, l, H + i] = da[n, l, i])
  const void* xb = nullptr;        // the same for set B
  const void* db = nullptr;
  const int32_t* pair_a = nullptr;  // (n_pairs) row indices into A
  const int32_t* pair_b = nullptr;  // (n_pairs) row indices into B
  const int32_t* slot = nullptr;    // (L) readout index of each layer, -1 for none
  double* out = nullptr;            // (n_pairs, n_out, 2) float64
  int64_t n_pairs = 0;
  int C = 0, H = 0, W = 0;
  int L = 0;            // ReLU layers (max depth - 1)
  int filter_size = 0;  // odd, 1..7
  int n_out = 0;        // readouts (depths), 1..64
  double w_first = 0, w = 0, b2 = 0;  // arch.LayerParams
  bool gap = true;       // readout over all entries (gap) or the offset-0 slice (flatten)
  // The listed-grid readout (LAP): n_grids > 0 packed grids `grids` (int32, ascending, each in
  // [0, H W)) with float64 weights `grid_w`; gap is then unused.  0: gap or flatten.
  const int32_t* grids = nullptr;
  const double* grid_w = nullptr;
  int n_grids = 0;
  // A pooled stack (n_stages > 0; cntk_engine/arch.py, "Pooling stacks"; the comment on top of
  // stack_sums_kernel.cuh): stage s runs stage_layers[s] conv layers on stage_h[s] x stage_w[s]
  // maps (stage 0: H x W), then, but after the last, an average pool of window = stride
  // stage_pool[s] to the next stage's size.  The readout runs the last stage's packed grids listed
  // in `grids` (n_grids, ascending), each entry (grid k, row i, column j) weighted by
  // readout_w[k, i, j] (float64, (n_grids, H_last, W_last)), or all by 1 when readout_w is null,
  // and the sums times readout_scale: out[p, 0, :].  n_out = 1; gap and grid_w are unused.  The
  // diagonals da, db keep their shape (N, L, 2H, W[, 2]), layer l's rows at its stage's width:
  // element (l, r * W_s + c) of the flattened (2H, W) for r < 2 H_s, c < W_s.
  int n_stages = 0;
  int stage_h[kMaxStages] = {};
  int stage_w[kMaxStages] = {};
  int stage_layers[kMaxStages] = {};
  int stage_pool[kMaxStages] = {};
  const double* readout_w = nullptr;
  double readout_scale = 1.0;
  // The stack kernel's register budget: 0 or 1 = the default (no spills: one 8-warp block per
  // multiprocessor for 32 x 32 images), 2 = the candidate compiled for two blocks (spills; 32 x 32
  // images in float32 only), to be timed against each other on a GPU (docs/cuda_kernels.md).
  int stack_blocks_per_sm = 0;
  bool fix = false;      // first layer fixed: Theta_1 = 0
  bool same_set = false;  // A and B are the same images: ia == ib is a self pair (c := 1 on
                          // its offset-(0, 0) entries)
  Dtype dtype = Dtype::float32;
  int variant = 0;        // index into kernel_variant()
  int device = 0;         // CUDA device ordinal
  std::uintptr_t stream = 0;  // cudaStream_t (0: the legacy default stream)
};

// Why the fused kernels cannot take images of H x W with this filter and number of readouts,
// or nullptr if they can.
const char* unsupported_shape(int H, int W, int filter_size, int n_out);

// Why the stack kernel cannot take a stack of these stages (heights, widths, conv layers, pool
// windows = strides; the last stage's pool is ignored) with this filter size, or nullptr if it
// can.
const char* unsupported_stack(int n_stages, const int* h, const int* w, const int* layers,
                              const int* pool, int filter_size);

// Launch (asynchronously, on p.stream of the current device) the variant's kernel for `p`, which
// must have passed the binding's check (binding.cpp, check_pair_sums).  Returns the CUDA error of the launch (cudaSuccess = 0).
int launch_pair_sums(const PairSumsParams& p);

const char* error_string(int err);
int set_device(int device);
int device_count(int* n);
int synchronize();

}  // namespace cntk
