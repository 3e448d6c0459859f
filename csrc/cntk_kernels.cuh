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
// Device pointers: xa (Na, C, H, W) images and qa (Na, L, 2H, W) diagonals of set A with
// every image's rows stored twice (q[..., H + i, :] = q[..., i, :]), the
// same for B; pair_a / pair_b (n_pairs) int32 row indices into A and B; slot (L) int32;
// out (n_pairs, n_out, 2) float64.  is_double selects the float64 kernels (all T pointers are
// then double*, else float*).  same_set: A and B are the same images (self pairs get c = 1 on
// their diagonal).  Returns the CUDA error of the launch (cudaSuccess = 0).
int launch_pair_sums(const void* xa, const void* qa, const void* xb, const void* qb,
                     const int32_t* pair_a, const int32_t* pair_b, int64_t n_pairs,
                     int C, int H, int W, int L, int filter_size, LayerScalars s,
                     const int32_t* slot, int n_out, bool gap, bool fix, bool same_set,
                     bool is_double, double* out, std::uintptr_t stream);

// Why the fused kernels cannot take this shape, or nullptr if they can.
const char* unsupported_shape(int H, int W, int filter_size, int n_out);

const char* error_string(int err);
int set_device(int device);
int device_count(int* n);
int synchronize();

}  // namespace cntk
