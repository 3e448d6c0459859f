// A host emulation of the part of the CUDA execution model the kernels of this directory use,
// so that their source runs on a machine without a GPU (csrc/kernel_sim.cpp, tests/cuda_sim.py):
// blocks run one after the other; the threads of a block are ucontext coroutines on one host
// thread, switched at every warp shuffle and __syncthreads.  Not part of the extension.
//
// What it emulates, and how strictly:
// - __shfl_{up,down,xor,}_sync with the full mask: a warp's shuffle completes when all its 32
//   lanes have reached one, each lane's n-th shuffle meeting the others' n-th (a shuffle on a
//   lane-divergent path, which CUDA leaves undefined, is reported and aborts);
// - __syncthreads: completes when every thread of the block has reached it (a thread that has
//   returned, or a warp waiting at a shuffle instead, is reported and aborts);
// - dynamic shared memory (cntk::dynamic_shared<T>()), per block, filled with NaN bytes at the
//   start of each block so that a read before a write shows;
// - atomicAdd, __ldcg: plain host memory operations (threads never run at the same time);
// - the order in which a block's threads run between barriers (simt::Schedule): "forward" runs
//   each ready thread in index order up to its next shuffle or barrier, round after round, so
//   every thread's writes before its first shuffle are done before any thread reads;
//   "warps_reversed" runs, in every phase between barriers, the last warp as far as it can go
//   (to the barrier, or its end) before the one below it, down to warp 0, and "warps_in_order"
//   warp 0 first, up to the last: a write another warp makes before a missing __syncthreads
//   (zeroing shared sums or a stage's input, a round's atomic adds) then lands after this warp's
//   reads or adds in one of the orders, and changes the result.  A kernel whose barriers are all
//   in place gives the same bits under all three.
// Float arithmetic is the host compiler's (build with -ffp-contract=off: no fused multiply-adds
// but the explicit fma calls, as nvcc's are), and the device-only instructions have host
// stand-ins (relu_step.cuh: sqrt.approx is std::sqrt, rsqrtf is 1 / std::sqrt): results agree
// with a GPU's to rounding, not bit for bit.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
// the runtime calls of the launches: one multiprocessor holding two blocks (so a persistent
// kernel's blocks take several items each), host memory filled with NaN bytes
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = 1;
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, K, int, std::size_t) {
  *blocks = 2;
  return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** ptr, std::size_t bytes, cudaStream_t) {
  *ptr = std::malloc(bytes);
  if (*ptr == nullptr) return 2;  // cudaErrorMemoryAllocation
  std::memset(*ptr, 0xff, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) {
  std::free(ptr);
  return cudaSuccess;
}

namespace simt {

constexpr int kWarp = 32;
constexpr std::size_t kStack = 512 * 1024;  // per thread: the kernels keep arrays of <= 32 doubles

enum class State { ready, shuffle, barrier, done };
enum class Schedule { forward, warps_reversed, warps_in_order };

struct Thread {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  dim3 idx;
  State state = State::ready;
  long long shuffles = 0;        // shuffles this thread has entered (the n-th meets the n-th)
  unsigned char give[8] = {};    // the value it offers to the warp's shuffle
  unsigned char take[8] = {};    // the value it receives
  int src = 0;                   // the lane it reads from
};

struct Machine {
  ucontext_t scheduler;
  std::vector<Thread> threads;
  Thread* current = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  std::vector<unsigned char> shared;
  const std::function<void()>* body = nullptr;
  Schedule schedule = Schedule::forward;
};

inline Machine& machine() {
  static Machine m;
  return m;
}

[[noreturn]] inline void fail(const char* what) {
  Machine& m = machine();
  std::fprintf(stderr, "host_simt: %s (block %u, thread %u)\n", what, m.block_idx.x,
               m.current ? m.current->idx.x : 0u);
  std::abort();
}

inline void trampoline() {
  Machine& m = machine();
  (*m.body)();
  m.current->state = State::done;
  swapcontext(&m.current->ctx, &m.scheduler);
}

inline void yield(State s) {
  Machine& m = machine();
  m.current->state = s;
  swapcontext(&m.current->ctx, &m.scheduler);
}

// Complete the shuffle of warp w0 / 32 where all its lanes wait at one.  Returns whether it did.
inline bool release_shuffle(int w0) {
  Machine& m = machine();
  for (int t = w0; t < w0 + kWarp; ++t)
    if (m.threads[t].state != State::shuffle) return false;  // the others may still be on their way
  for (int t = w0; t < w0 + kWarp; ++t)
    if (m.threads[t].shuffles != m.threads[w0].shuffles) fail("lanes of a warp met at different shuffles (divergent shuffle)");
  for (int t = w0; t < w0 + kWarp; ++t) {
    Thread& th = m.threads[t];
    std::memcpy(th.take, m.threads[w0 + th.src].give, sizeof th.take);
    th.state = State::ready;
  }
  return true;
}

// Resolve what can be resolved: warps whose lanes all wait at the same shuffle, the block's
// barrier when every thread waits at it.  Returns whether anything was released.
inline bool release() {
  Machine& m = machine();
  bool any = false;
  const int n = (int)m.threads.size();
  for (int w0 = 0; w0 < n; w0 += kWarp) any = release_shuffle(w0) || any;
  int at_barrier = 0;
  for (auto& th : m.threads) at_barrier += th.state == State::barrier;
  if (at_barrier == n) {
    for (auto& th : m.threads) th.state = State::ready;
    any = true;
  }
  return any;
}

// Run `body` as the kernel of a grid of grid.x blocks of block.x threads (block.x a multiple of
// 32), with `shared_bytes` of dynamic shared memory per block.
inline void launch(dim3 grid, dim3 block, std::size_t shared_bytes, const std::function<void()>& body) {
  Machine& m = machine();
  if (block.x % kWarp != 0 || block.x == 0) fail("block size must be a positive multiple of 32");
  m.threads.resize(block.x);
  for (auto& th : m.threads)
    if (!th.stack) th.stack.reset(new char[kStack]);
  m.grid_dim = grid;
  m.block_dim = block;
  m.body = &body;
  for (unsigned b = 0; b < grid.x; ++b) {
    m.block_idx = dim3(b);
    m.shared.assign(shared_bytes, 0xff);  // NaN bytes
    for (unsigned t = 0; t < block.x; ++t) {
      Thread& th = m.threads[t];
      th.idx = dim3(t);
      th.state = State::ready;
      th.shuffles = 0;
      getcontext(&th.ctx);
      th.ctx.uc_stack.ss_sp = th.stack.get();
      th.ctx.uc_stack.ss_size = kStack;
      th.ctx.uc_link = &m.scheduler;
      makecontext(&th.ctx, trampoline, 0);
    }
    auto run = [&m](Thread& th) {
      m.current = &th;
      swapcontext(&m.scheduler, &th.ctx);
      m.current = nullptr;
    };
    const int n_warps = (int)block.x / kWarp;
    for (;;) {
      bool ran = false, all_done = true;
      if (m.schedule == Schedule::forward) {
        for (auto& th : m.threads) {
          if (th.state == State::ready) {
            run(th);
            ran = true;
          }
        }
      } else {  // each warp as far as it goes (its shuffles met), last or first warp first
        const bool down = m.schedule == Schedule::warps_reversed;
        for (int i = 0; i < n_warps; ++i) {
          const int w = down ? n_warps - 1 - i : i;
          for (bool again = true; again;) {
            again = false;
            for (int t = w * kWarp; t < (w + 1) * kWarp; ++t) {
              if (m.threads[t].state == State::ready) {
                run(m.threads[t]);
                ran = again = true;
              }
            }
            // its shuffles only: the barrier is released below, once every warp is at it, so
            // that every phase between barriers starts again from the same warp
            if (again) release_shuffle(w * kWarp);
          }
        }
      }
      for (auto& th : m.threads) all_done = all_done && th.state == State::done;
      if (all_done) break;
      if (!release() && !ran) {
        bool shuffling = false, barrier = false, done = false;
        for (auto& th : m.threads) {
          shuffling |= th.state == State::shuffle;
          barrier |= th.state == State::barrier;
          done |= th.state == State::done;
        }
        fail(shuffling ? "deadlock: a warp waits at a shuffle that some of its lanes never reach"
             : barrier && done ? "deadlock: __syncthreads after some threads returned"
                               : "deadlock");
      }
    }
  }
}

template <typename T>
T exchange(T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffles move values of at most 8 bytes");
  Thread* me = machine().current;
  std::memcpy(me->give, &v, sizeof(T));
  me->src = src;
  ++me->shuffles;
  yield(State::shuffle);
  T r;
  std::memcpy(&r, machine().current->take, sizeof(T));
  return r;
}

inline int lane() { return (int)(machine().current->idx.x % kWarp); }

}  // namespace simt

#define threadIdx (simt::machine().current->idx)
#define blockIdx (simt::machine().block_idx)
#define blockDim (simt::machine().block_dim)
#define gridDim (simt::machine().grid_dim)

inline void __syncthreads() { simt::yield(simt::State::barrier); }

template <typename T>
T __shfl_up_sync(unsigned mask, T v, int delta) {
  if (mask != 0xffffffffu) simt::fail("only full-warp shuffles are emulated");
  const int l = simt::lane();
  return simt::exchange(v, l - delta >= 0 ? l - delta : l);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, int delta) {
  if (mask != 0xffffffffu) simt::fail("only full-warp shuffles are emulated");
  const int l = simt::lane();
  return simt::exchange(v, l + delta < simt::kWarp ? l + delta : l);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  if (mask != 0xffffffffu) simt::fail("only full-warp shuffles are emulated");
  return simt::exchange(v, (simt::lane() ^ lane_mask) & (simt::kWarp - 1));
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane) {
  if (mask != 0xffffffffu) simt::fail("only full-warp shuffles are emulated");
  return simt::exchange(v, src_lane & (simt::kWarp - 1));
}

template <typename T>
T atomicAdd(T* address, T v) {
  T old = *address;
  *address = old + v;
  return old;
}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
