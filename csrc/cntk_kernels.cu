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
template <int V> int launch_stack_variant(const PairSumsParams& p);
extern template int launch_variant<3>(const PairSumsParams& p);
extern template int launch_variant<5>(const PairSumsParams& p);
extern template int launch_variant<6>(const PairSumsParams& p);
extern template int launch_variant<7>(const PairSumsParams& p);
extern template int launch_variant<8>(const PairSumsParams& p);
extern template int launch_stack_variant<3>(const PairSumsParams& p);
extern template int launch_stack_variant<5>(const PairSumsParams& p);
extern template int launch_stack_variant<6>(const PairSumsParams& p);
extern template int launch_stack_variant<7>(const PairSumsParams& p);
extern template int launch_stack_variant<8>(const PairSumsParams& p);
}  // namespace detail

namespace {

struct VariantEntry {
  KernelVariant info;
  int (*launch)(const PairSumsParams&);        // the CNN kernel
  int (*launch_stack)(const PairSumsParams&);  // the pooled-stack kernel
};

// One default per dtype: the fastest variant measured on a GPU for it (docs/cuda_kernels.md).
// The last field, the base variant, must be kBaseVariant's (pair_sums_kernel.cuh): the benches
// read it to time each stack kernel once (tests/test_cuda.py checks the table).
const VariantEntry kVariants[] = {
    {{"v3",
      "reads the diagonals q; per entry rsqrtf(q_x q_z) and sqrt.approx (3 MUFU per entry-layer)",
      "q", 1, /*gpu_measured=*/true, /*default_float32=*/true, /*default_float64=*/false, "v3"},
     &detail::launch_variant<3>, &detail::launch_stack_variant<3>},
    {{"v5",
      "reads per-image factors (sqrt(q/2pi), 1/sqrt(q)); per entry two products and "
      "sqrt.approx.ftz (2 MUFU per entry-layer)",
      "factors", 2, /*gpu_measured=*/true, /*default_float32=*/false, /*default_float64=*/true, "v5"},
     &detail::launch_variant<5>, &detail::launch_stack_variant<5>},
    {{"v6",
      "reads sqrt(q) (v3's footprint); per entry a product, rcp.approx.ftz and sqrt.approx.ftz "
      "(3 MUFU per entry-layer, no subnormal fix-ups); the row seam as one bit of a mask (v8's)",
      "sqrt", 1, /*gpu_measured=*/false, /*default_float32=*/false, /*default_float64=*/false, "v6"},
     &detail::launch_variant<6>, &detail::launch_stack_variant<6>},
    {{"v7",
      "v6 with a barrier among a block's warps after every layer (32x32 kernels; v6's elsewhere): "
      "one layer's diagonals in L1 at a time",
      "sqrt", 1, /*gpu_measured=*/false, /*default_float32=*/false, /*default_float64=*/false, "v6"},
     &detail::launch_variant<7>, &detail::launch_stack_variant<7>},
    {{"v8",
      "v3 with the row seam of the box sums tested as one bit of a loop-invariant mask (32x32 "
      "kernels; v3's elsewhere): fewer integer instructions per entry",
      "q", 1, /*gpu_measured=*/false, /*default_float32=*/false, /*default_float64=*/false, "v3"},
     &detail::launch_variant<8>, &detail::launch_stack_variant<8>},
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

const char* unsupported_stack(int n_stages, const int* h, const int* w, const int* layers,
                              const int* pool, int filter_size) {
  if (filter_size != 3) return "the CUDA stack kernel takes filter size 3 (the Myrtle networks'; other sizes are not compiled)";
  if (n_stages < 1 || n_stages > kMaxStages) return "the CUDA stack kernel takes 1 to 8 stages (conv layers between two pools)";
  for (int s = 0; s < n_stages; ++s) {
    if (h[s] < 1 || w[s] < 1 || h[s] > 32 || w[s] > 32) return "every stage of a stack must be 1 to 32 pixels high and wide";
    if (layers[s] < 1) return "every stage of a stack has at least one conv layer";
    if (s + 1 < n_stages) {
      if (pool[s] < 1 || h[s] % pool[s] != 0 || w[s] % pool[s] != 0)
        return "the pool after a stage must be a window (= stride) >= 1 that divides the stage's height and width";
      if (h[s + 1] != h[s] / pool[s] || w[s + 1] != w[s] / pool[s])
        return "a stage's size must be the size of the stage before divided by that stage's pool";
    }
  }
  return nullptr;
}

int launch_pair_sums(const PairSumsParams& p) {
  if (p.n_pairs == 0) return (int)cudaSuccess;
  return p.n_stages > 0 ? kVariants[p.variant].launch_stack(p) : kVariants[p.variant].launch(p);
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
int set_device(int device) { return (int)cudaSetDevice(device); }
int device_count(int* n) { return (int)cudaGetDeviceCount(n); }
int synchronize() { return (int)cudaDeviceSynchronize(); }

}  // namespace cntk
