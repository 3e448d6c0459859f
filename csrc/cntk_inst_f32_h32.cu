// Instantiations: float, general shapes with 16 < H <= 32 (see cntk_impl.cuh).
#include "cntk_impl.cuh"

namespace cntk {
namespace detail {
template <> cudaError_t launch_h32<float>(const Args& a) { return dispatch_r<float, 32, false>(a); }
}  // namespace detail
}  // namespace cntk
