// Launchers of the fused per-offset CNTK kernels (the algorithm: cntk_impl.cuh; the per-entry
// math: relu_step.cuh; the interface: cntk_kernels.cuh).
#include <cuda_runtime.h>

#include "cntk_impl.cuh"
#include "cntk_kernels.cuh"

namespace cntk {
namespace {

template <typename T>
cudaError_t dispatch_h(const detail::Args& a) {
  if (a.H == 32 && a.W == 32) return detail::launch_full32<T>(a);  // CIFAR-sized fast path
  if (a.H <= 8) return detail::launch_h8<T>(a);
  if (a.H <= 16) return detail::launch_h16<T>(a);
  return detail::launch_h32<T>(a);
}

}  // namespace

const char* unsupported_shape(int H, int W, int filter_size, int n_out) {
  if (H < 1 || W < 1) return "image height and width must be >= 1";
  if (H > 32 || W > 32) return "the CUDA kernels take images of at most 32 x 32 pixels (one warp lane per column, one register per row)";
  if (filter_size < 1 || filter_size % 2 == 0 || filter_size > 7) return "the CUDA kernels take odd filter sizes 1, 3, 5 or 7";
  if (n_out < 1 || n_out > 64) return "the CUDA kernels read out 1 to 64 depths per pass";
  return nullptr;
}

int launch_pair_sums(const void* xa, const void* da, const void* xb, const void* db,
                     const int32_t* pair_a, const int32_t* pair_b, int64_t n_pairs, int C, int H,
                     int W, int L, int filter_size, LayerScalars s, const int32_t* slot, int n_out,
                     bool gap, bool fix, bool same_set, bool is_double, double* out,
                     std::uintptr_t stream, int warps_per_block, int min_blocks) {
  if (n_pairs <= 0) return (int)cudaSuccess;
  if (unsupported_shape(H, W, filter_size, n_out) != nullptr || C < 1 || L < 1)
    return (int)cudaErrorInvalidValue;
  detail::Args a{xa, da, xb, db, pair_a, pair_b, 0, C, H, W, L, filter_size / 2, s, slot, n_out,
                 gap, fix, same_set, out, reinterpret_cast<cudaStream_t>(stream),
                 warps_per_block, min_blocks};
  // one block per pair; grid.x is limited to 2^31 - 1, so split very long pair lists
  constexpr int64_t kChunk = 1LL << 30;
  for (int64_t first = 0; first < n_pairs; first += kChunk) {
    a.pa = pair_a + first;
    a.pb = pair_b + first;
    a.out = out + first * n_out * 2;
    a.n_pairs = n_pairs - first < kChunk ? n_pairs - first : kChunk;
    cudaError_t e = is_double ? dispatch_h<double>(a) : dispatch_h<float>(a);
    if (e != cudaSuccess) return (int)e;
  }
  return (int)cudaSuccess;
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
int set_device(int device) { return (int)cudaSetDevice(device); }
int device_count(int* n) { return (int)cudaGetDeviceCount(n); }
int synchronize() { return (int)cudaDeviceSynchronize(); }

}  // namespace cntk
