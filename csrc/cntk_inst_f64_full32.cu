// Instantiations: double, the guard-free 32 x 32 fast path (see cntk_impl.cuh).
#include "cntk_impl.cuh"

namespace cntk {
namespace detail {
template <> cudaError_t launch_full32<double>(const Args& a) { return dispatch_r<double, 32, true>(a); }
}  // namespace detail
}  // namespace cntk
