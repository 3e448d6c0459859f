// Kernel variant v8: v3 (Entry<8, T> = Entry<3, T>, the same diagonals) with the row seam of the
// box sums tested as one bit of a loop-invariant mask in the guard-free 32 x 32 pair kernel
// (pair_sums_kernel.cuh, kSeamBits, where the comment says why).  Only those kernels are
// compiled here: every other launch of v8 (other image sizes, the LAP readout, pooled stacks)
// runs v3's kernels, compiled in pair_sums_v3.cu (kBaseVariant).
#include "stack_sums_kernel.cuh"

namespace cntk {
namespace detail {
extern template int launch_variant<3>(const PairSumsParams& p);
extern template int launch_stack_variant<3>(const PairSumsParams& p);
template int launch_variant<8>(const PairSumsParams& p);
template int launch_stack_variant<8>(const PairSumsParams& p);
}  // namespace detail
}  // namespace cntk
