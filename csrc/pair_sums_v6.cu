// Kernel variant v6: the pair kernel (pair_sums_kernel.cuh) and the stack kernel
// (stack_sums_kernel.cuh) with the per-entry step and diagonal
// layout of Entry<6, T> (relu_step.cuh, where the comment says what v6 computes differently).
// One translation unit per variant, so that the variants compile in parallel.
#include "stack_sums_kernel.cuh"

namespace cntk {
namespace detail {
template int launch_variant<6>(const PairSumsParams& p);
template int launch_stack_variant<6>(const PairSumsParams& p);
}  // namespace detail
}  // namespace cntk
