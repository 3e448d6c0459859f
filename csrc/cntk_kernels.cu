// The host side of the CUDA kernels: the table of compiled kernel variants, the shape rule and
// the parameter check (each written once, here), and the launch through the variant table.
// The kernel itself is in pair_sums_kernel.cuh, instantiated by pair_sums_v<N>.cu.
#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <string>

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

// The first entry is the default: only a variant measured on a GPU may be it.
const VariantEntry kVariants[] = {
    {{"v3",
      "reads the diagonals q; per entry rsqrtf(q_x q_z) and sqrt.approx (3 MUFU per entry-layer)",
      "q", 1, true},
     &detail::launch_variant<3>},
    {{"v5",
      "reads per-image factors (sqrt(q/2pi), 1/sqrt(q)); per entry two products and "
      "sqrt.approx.ftz (2 MUFU per entry-layer)",
      "factors", 2, false},
     &detail::launch_variant<5>},
};
constexpr int kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);
static_assert(kNumVariants > 0, "at least one kernel variant");

bool aligned(const void* ptr, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0;
}

}  // namespace

int kernel_variant_count() { return kNumVariants; }
const KernelVariant& kernel_variant(int index) { return kVariants[index].info; }
int find_kernel_variant(const std::string& name) {
  for (int i = 0; i < kNumVariants; ++i)
    if (name == kVariants[i].info.name) return i;
  return -1;
}

const char* unsupported_shape(int H, int W, int filter_size, int n_out) {
  if (H < 1 || W < 1) return "image height and width must be >= 1";
  if (H > 32 || W > 32) return "the CUDA kernels take images of at most 32 x 32 pixels (one warp lane per column, one register per row)";
  if (filter_size < 1 || filter_size % 2 == 0 || filter_size > 7) return "the CUDA kernels take odd filter sizes 1, 3, 5 or 7";
  if (n_out < 1 || n_out > 64) return "the CUDA kernels read out 1 to 64 depths per pass";
  return nullptr;
}

std::string check_pair_sums(const PairSumsParams& p) {
  std::ostringstream why;
  if (p.variant < 0 || p.variant >= kNumVariants) {
    why << "kernel variant index " << p.variant << " is out of range [0, " << kNumVariants << ")";
    return why.str();
  }
  if (p.dtype != Dtype::float32 && p.dtype != Dtype::float64) return "dtype must be float32 or float64";
  if (const char* shape = unsupported_shape(p.H, p.W, p.filter_size, p.n_out)) {
    why << shape << "; got H x W = " << p.H << " x " << p.W << ", filter_size = " << p.filter_size
        << ", n_out = " << p.n_out;
    return why.str();
  }
  if (p.C < 1) {
    why << "C (channels) must be >= 1; got " << p.C;
    return why.str();
  }
  if (p.L < 1 || p.L < p.n_out) {
    why << "L (ReLU layers) must be >= 1 and >= n_out (each readout is at its own layer); got L = "
        << p.L << ", n_out = " << p.n_out;
    return why.str();
  }
  if (p.n_pairs < 0 || p.n_pairs > 2147483647LL) {
    why << "n_pairs must be in [0, 2^31 - 1] (one block per pair in one launch); got " << p.n_pairs;
    return why.str();
  }
  if (p.device < 0) {
    why << "device must be a CUDA device ordinal >= 0; got " << p.device;
    return why.str();
  }
  if (p.n_pairs == 0) return {};  // nothing is read or written
  const std::size_t t = p.dtype == Dtype::float64 ? 8 : 4;
  const std::size_t d = t * kVariants[p.variant].info.diag_width;
  const struct {
    const char* name;
    const void* ptr;
    std::size_t align;
  } ptrs[] = {{"xa", p.xa, t},         {"da", p.da, d},         {"xb", p.xb, t},
              {"db", p.db, d},         {"pair_a", p.pair_a, 4}, {"pair_b", p.pair_b, 4},
              {"slot", p.slot, 4},     {"out", p.out, 8}};
  for (const auto& q : ptrs) {
    if (q.ptr == nullptr) {
      why << q.name << " is a null pointer (a device pointer is needed for " << p.n_pairs << " pairs)";
      return why.str();
    }
    if (!aligned(q.ptr, q.align)) {
      why << q.name << " = 0x" << std::hex << reinterpret_cast<std::uintptr_t>(q.ptr) << std::dec
          << " is not aligned to the " << q.align << " bytes of its elements (kernel "
          << kVariants[p.variant].info.name << ", " << (t == 8 ? "float64" : "float32") << ")";
      return why.str();
    }
  }
  return {};
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
