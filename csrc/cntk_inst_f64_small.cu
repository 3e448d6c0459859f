// Instantiations: double, general shapes with H <= 8 and H <= 16 (see cntk_impl.cuh).
#include "cntk_impl.cuh"

namespace cntk {
namespace detail {
template <> cudaError_t launch_h8<double>(const Args& a) { return dispatch_r<double, 8, false>(a); }
template <> cudaError_t launch_h16<double>(const Args& a) { return dispatch_r<double, 16, false>(a); }
}  // namespace detail
}  // namespace cntk
