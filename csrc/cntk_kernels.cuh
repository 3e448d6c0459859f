// Plain C++ interface of the CUDA kernels (no pybind11 here: this header is read by nvcc and
// by the host compiler that builds the binding).
#pragma once

#include <cstdint>

namespace cntk {

struct LayerScalars {
  double w_first;  // multiplies box(x . z) in the first layer
  double w;        // multiplies box(.) in layers 2..L
  double b2;       // bias variance added to every Sigma
};

// Readout sums of n_pairs image pairs (see cntk_engine/arch.py and backends/base.py):
//   out[p, t, 0] = sum of K, out[p, t, 1] = sum of G = Theta * Kdot at the ReLU layer l with
//   slot[l] == t, over all entries (gap) or the offset-0 slice (flatten).
// Device pointers: xa (Na, C, H, W) images of set A; da (Na, L, H, W, 2) their per-layer
// diagonals as interleaved pairs (sqrt(q / (2 pi)), 1 / sqrt(q)), 1 / sqrt(q) := 0 where q == 0;
// the same for B; pair_a / pair_b (n_pairs) int32 row indices into A and B; slot (L) int32
// (-1: no readout at that layer); out (n_pairs, n_out, 2) float64.  is_double selects the
// float64 kernels (xa, da, xb, db then hold doubles, else floats).  same_set: A and B are the
// same images (self pairs get c = 1 exactly on their offset-0 slice).  Asynchronous on `stream`;
// returns the CUDA error of the launch (cudaSuccess = 0).  Tuning knobs (results do not depend
// on them): warps_per_block (0: 8; each block is one pair) and min_blocks (1 or 2: the register
// budget of the 32x32 float kernels, 2 = at most 128 registers per thread).
int launch_pair_sums(const void* xa, const void* da, const void* xb, const void* db,
                     const int32_t* pair_a, const int32_t* pair_b, int64_t n_pairs,
                     int C, int H, int W, int L, int filter_size, LayerScalars s,
                     const int32_t* slot, int n_out, bool gap, bool fix, bool same_set,
                     bool is_double, double* out, std::uintptr_t stream,
                     int warps_per_block = 0, int min_blocks = 1);

// Why the fused kernels cannot take this shape, or nullptr if they can.
const char* unsupported_shape(int H, int W, int filter_size, int n_out);

const char* error_string(int err);
int set_device(int device);
int device_count(int* n);
int synchronize();

}  // namespace cntk
