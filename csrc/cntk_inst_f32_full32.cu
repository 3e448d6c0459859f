// Instantiations: float, the guard-free 32 x 32 fast path (see cntk_impl.cuh).
#include "cntk_impl.cuh"

namespace cntk {
namespace detail {
template <> cudaError_t launch_full32<float>(const Args& a) {
  // two register budgets (measured against each other in bench/bench_cuda.py)
  return a.min_blocks == 2 ? dispatch_r<float, 32, true, 2>(a) : dispatch_r<float, 32, true, 1>(a);
}
}  // namespace detail
}  // namespace cntk
