// What the kernels need from CUDA beyond the language, in one place, so that the same kernel
// source also builds for the host emulation (CNTK_HOST_SIM: host_simt.h, csrc/kernel_sim.cpp):
// the runtime header, the block's dynamic shared memory, and the launch.
#pragma once

#if defined(CNTK_HOST_SIM)
#include "host_simt.h"

namespace cntk {
template <typename T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(simt::machine().shared.data());
}
}  // namespace cntk

// kernel: a function (pointer) of the kernel's signature; the arguments follow the stream
#define CNTK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  simt::launch(grid, block, smem, [&] { kernel(__VA_ARGS__); })

#else
#include <cuda_runtime.h>

namespace cntk {
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ double cntk_dynamic_shared[];  // double: 8-byte aligned for every T used
  return reinterpret_cast<T*>(cntk_dynamic_shared);
}
}  // namespace cntk

#define CNTK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif
