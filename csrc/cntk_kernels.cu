// The host side of the CUDA kernels: the table of compiled kernel variants and the shape rule
// (each written once, here), and the launch through the variant table.  The parameter check is
// in binding.cpp: this file, compiled by nvcc, exchanges only C types with the host-compiled
// binding (no std::string or iostreams across the two compilers).
// The kernel itself is in pair_sums_kernel.cuh, instantiated by pair_sums_v<N>.cu.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "cntk_kernels.cuh"

namespace cntk {
namespace detail {
template <int V> int launch_variant(const PairSumsParams& p);
extern template int launch_variant<3>(const PairSumsParams& p);
extern template int launch_variant<5>(const PairSumsParams& p);
}  // namespace detail

namespace {

struct VariantEntry {
  KernelVariant info;
  int (*launch)(const PairSumsParams&);
};

// One default per dtype: the fastest variant measured on a GPU for it (docs/cuda_kernels.md).
const VariantEntry kVariants[] = {
    {{"v3",
      "reads the diagonals q; per entry rsqrtf(q_x q_z) and sqrt.approx (3 MUFU per entry-layer)",
      "q", 1, /*gpu_measured=*/true, /*default_float32=*/true, /*default_float64=*/false},
     &detail::launch_variant<3>},
    {{"v5",
      "reads per-image factors (sqrt(q/2pi), 1/sqrt(q)); per entry two products and "
      "sqrt.approx.ftz (2 MUFU per entry-layer)",
      "factors", 2, /*gpu_measured=*/true, /*default_float32=*/false, /*default_float64=*/true},
     &detail::launch_variant<5>},
};
constexpr int kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);
static_assert(kNumVariants > 0, "at least one kernel variant");

}  // namespace

int kernel_variant_count() { return kNumVariants; }
const KernelVariant& kernel_variant(int index) { return kVariants[index].info; }
int find_kernel_variant(const char* name) {
  for (int i = 0; i < kNumVariants; ++i)
    if (std::strcmp(name, kVariants[i].info.name) == 0) return i;
  return -1;
}

const char* unsupported_shape(int H, int W, int filter_size, int n_out) {
  if (H < 1 || W < 1) return "image height and width must be >= 1";
  if (H > 32 || W > 32) return "the CUDA kernels take images of at most 32 x 32 pixels (one warp lane per column, one register per row)";
  if (filter_size < 1 || filter_size % 2 == 0 || filter_size > 7) return "the CUDA kernels take odd filter sizes 1, 3, 5 or 7";
  if (n_out < 1 || n_out > 64) return "the CUDA kernels read out 1 to 64 depths per pass";
  return nullptr;
}

int launch_pair_sums(const PairSumsParams& p) {
  if (p.n_pairs == 0) return (int)cudaSuccess;
  return kVariants[p.variant].launch(p);
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
int set_device(int device) { return (int)cudaSetDevice(device); }
int device_count(int* n) { return (int)cudaGetDeviceCount(n); }
int synchronize() { return (int)cudaDeviceSynchronize(); }

}  // namespace cntk
