// Kernel variant v7: v6 (Entry<7, T> = Entry<6, T>, the same diagonals) with a barrier among the
// block's warps after every layer in the guard-free 32 x 32 pair kernel (pair_sums_kernel.cuh,
// kLayerSync, where the comment says why).  Only those kernels are compiled here: every other
// launch of v7 (other image sizes, the LAP readout, pooled stacks) runs v6's kernels, compiled
// in pair_sums_v6.cu (kBaseVariant).
#include "stack_sums_kernel.cuh"

namespace cntk {
namespace detail {
extern template int launch_variant<6>(const PairSumsParams& p);
extern template int launch_stack_variant<6>(const PairSumsParams& p);
template int launch_variant<7>(const PairSumsParams& p);
template int launch_stack_variant<7>(const PairSumsParams& p);
}  // namespace detail
}  // namespace cntk
