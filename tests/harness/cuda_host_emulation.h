// Host execution of CUDA kernels: just enough of the CUDA execution model to run the query kernels of
// csrc/cuda/liif_query_kernel.cuh, compiled from that very file by the host compiler, on a machine
// without a GPU.
//
// Model
//   - A block's threads are cooperative fibers (ucontext) on one OS thread. Each runs until it
//     reaches __syncthreads() or returns; when every thread of the block has done so, the next phase
//     starts. Between two barriers threads therefore run one after the other, in thread order or, if
//     asked, in reverse order (alternating phase by phase): a read of shared memory that another
//     thread writes in the same phase sees the other value in one of the two orders, so a missing
//     barrier shows up as a wrong result.
//   - Blocks run one at a time per OS thread; several OS threads run different blocks.
//   - Dynamic shared memory (LIIF_DYNAMIC_SHARED) is a per-block buffer of exactly the launch's size,
//     filled with NaN bytes (0xFF) before each block, so that reading what no thread wrote poisons
//     the output.
//   - threadIdx, blockIdx, blockDim and gridDim are x-only (y = z = 1).
//   - __syncthreads() reached by some threads of a block while others have returned (undefined on
//     the GPU) raises an error, as does a launch without a kernel's required grid.
//
// Limits (what the harness does not model)
//   - no warps: no warp primitives (__shfl_*, __ballot_*, ...), no warp-synchronous code, no
//     divergence or occupancy effects; timing means nothing;
//   - no atomics, no __threadfence, no static __shared__ arrays, no asynchronous copies, no tensor
//     core fragments, no texture or constant memory;
//   - memory is the host's: sequentially consistent, with no bounds checks of global memory (the
//     harness tests compare results; out-of-range shared-memory reads stay inside the NaN-filled
//     buffer only if they are small);
//   - floating point is the host's: no FMA contraction (built with -ffp-contract=off), so float32
//     results differ from the GPU's in the last bits of the MLP sums, never in the geometry.
#pragma once

#define LIIF_HOST_EXECUTION_HARNESS 1

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// CUDA's keywords: plain host code.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

// Per OS thread; the fibers of a block share their OS thread and the scheduler sets threadIdx
// before resuming each of them.
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace liif_harness {

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool finished = false;
  int64_t barriers = 0;
};

// Runs the blocks one OS thread is given.
class BlockRunner {
 public:
  BlockRunner(unsigned threads, size_t shared_bytes) : fibers_(threads), shared_(shared_bytes) {
    for (Fiber& f : fibers_) f.stack.resize(kStackBytes);
  }

  void run_block(const std::function<void()>& kernel, bool reverse_order) {
    kernel_ = &kernel;
    std::memset(shared_.data(), 0xFF, shared_.size());
    for (Fiber& f : fibers_) {
      f.finished = false;
      f.barriers = 0;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.data();
      f.context.uc_stack.ss_size = f.stack.size();
      f.context.uc_link = &scheduler_;
      makecontext(&f.context, &BlockRunner::fiber_main, 0);
    }
    current_runner() = this;
    const unsigned n = static_cast<unsigned>(fibers_.size());
    for (int64_t phase = 0;; ++phase) {
      const bool reverse = reverse_order && (phase % 2 == 1);
      for (unsigned i = 0; i < n; ++i) {
        const unsigned t = reverse ? n - 1 - i : i;
        if (fibers_[t].finished) continue;
        current_ = t;
        threadIdx.x = t;
        swapcontext(&scheduler_, &fibers_[t].context);
      }
      unsigned finished = 0;
      for (const Fiber& f : fibers_) finished += f.finished ? 1 : 0;
      if (finished == n) break;
      if (finished != 0) {
        throw std::runtime_error("host harness: __syncthreads() reached by " +
                                 std::to_string(n - finished) + " of " + std::to_string(n) +
                                 " threads while the others returned (block " +
                                 std::to_string(blockIdx.x) + ")");
      }
    }
    current_runner() = nullptr;
  }

  unsigned char* shared_memory() { return shared_.data(); }

  void sync() {
    Fiber& f = fibers_[current_];
    ++f.barriers;
    swapcontext(&f.context, &scheduler_);
  }

  static BlockRunner*& current_runner() {
    static thread_local BlockRunner* runner = nullptr;
    return runner;
  }

 private:
  static constexpr size_t kStackBytes = 256 * 1024;

  static void fiber_main() {
    BlockRunner* self = current_runner();
    (*self->kernel_)();
    self->fibers_[self->current_].finished = true;
    // Returning resumes uc_link, the scheduler.
  }

  std::vector<Fiber> fibers_;
  std::vector<unsigned char> shared_;
  ucontext_t scheduler_{};
  const std::function<void()>* kernel_ = nullptr;
  unsigned current_ = 0;
};

// Runs `kernel` (a call of the __global__ function with its arguments) on a grid of `blocks` blocks
// of `threads` threads with `shared_bytes` of dynamic shared memory, on up to `workers` OS threads.
inline void launch(unsigned blocks, unsigned threads, size_t shared_bytes,
                   const std::function<void()>& kernel, bool reverse_order, unsigned workers) {
  if (blocks == 0) return;
  if (threads == 0 || threads > 1024) throw std::invalid_argument("host harness: bad block size");
  workers = std::max(1u, std::min(workers, blocks));
  std::atomic<unsigned> next{0};
  std::vector<std::exception_ptr> errors(workers);
  auto work = [&](unsigned w) {
    try {
      BlockRunner runner(threads, shared_bytes);
      blockDim.x = threads;
      gridDim.x = blocks;
      for (unsigned b = next++; b < blocks; b = next++) {
        blockIdx.x = b;
        runner.run_block(kernel, reverse_order);
      }
    } catch (...) {
      errors[w] = std::current_exception();
      next = blocks;
    }
  };
  std::vector<std::thread> pool;
  for (unsigned w = 1; w < workers; ++w) pool.emplace_back(work, w);
  work(0);
  for (std::thread& t : pool) t.join();
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace liif_harness

inline void __syncthreads() { liif_harness::BlockRunner::current_runner()->sync(); }

#define LIIF_DYNAMIC_SHARED(name) \
  unsigned char* name = liif_harness::BlockRunner::current_runner()->shared_memory()
