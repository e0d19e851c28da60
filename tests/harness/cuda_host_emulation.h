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
//     the output. A guard zone of 64 KiB follows it, filled with 0xFFFE (NaN as fp16, bf16 and
//     float32, but not the all-ones bytes of a -1 or of the buffer's own fill): a read past the end
//     poisons the output too, a write past the end is an error when the block ends (a kernel whose
//     layout outgrew its launch's plan, which the GPU may let pass silently), an asynchronous copy
//     or an ldmatrix / wgmma operand there an error at once.
//   - threadIdx, blockIdx, blockDim and gridDim are x-only (y = z = 1).
//   - __syncthreads() reached by some threads of a block while others have returned (undefined on
//     the GPU) raises an error, as does a launch without a kernel's required grid.
//   - Tensor cores (the subset of nvcuda::wmma the kernels use): a fragment holds its whole tile in
//     every lane (CUDA leaves the element positions unspecified, so a kernel cannot tell), loads and
//     stores move the whole tile, mma_sync multiplies in float32 (the products of fp16, bf16 and
//     tf32 operands are exact in float32) and accumulates in float32. Fragment pointers must be
//     32-byte aligned and leading dimensions multiples of 16 bytes, as on the GPU; a tf32 operand
//     that was not rounded to tf32 (low 13 mantissa bits set) is an error.
//   - __half, __nv_bfloat16 and __float_to_tf32: bit-exact storage and round-to-nearest conversions
//     (ties to even for fp16 and bf16, c10's conversions; away from zero for tf32, as
//     cvt.rna.tf32.f32).
//   - Asynchronous copies (async_copy_16 / _commit / _wait): a copy reads its source when issued and
//     lands in shared memory only when its thread waits for its group, so a read before the wait,
//     or by another thread before the barrier after the wait, sees stale or NaN bytes. Both
//     addresses must be 16-byte aligned.
//   - An exception thrown inside a thread (the checks above) fails the launch with its message.
//
//   - Warpgroup-wide instructions (wgmma and its fence, commit and wait, what the wgmma kernel
//     uses): threads 128 v .. 128 v + 127 form warpgroup v; like warp-wide ones, each runs once
//     when the last of its 128 threads arrives. wgmma is asynchronous as on the GPU: issuing it
//     records the lanes' A registers and where their accumulators are; the product runs when a
//     wgmma_wait retires its group, reading the accumulators and the shared-memory operand then
//     (so a read of the accumulators before the wait, or an overwrite of the operand, gives a wrong
//     result) and refusing A registers changed since the issue. A wgmma issued while any thread of
//     the block has cp.async data landed since its last fence_proxy_async is refused (the GPU's
//     tensor cores read shared memory through the async proxy). The shared-memory descriptor is
//     decoded from its bits (start, leading and stride byte offsets; only the layout without
//     swizzling is emulated), and the fragments follow liif_tensor_core.cuh's per-lane layouts.
//     With A in shared memory too (wgmma_m64n256k16_ss), A's descriptor is decoded the same way
//     and A read at retirement. setmaxnreg is a warpgroup-wide instruction that checks its count;
//     registers are not modelled.
//
//   - Named barriers (bar.sync / bar.arrive with an id of 1 .. 15 and a thread count, what the
//     warp-specialised wgmma kernel hands tiles over with): each arrival counts; the one that
//     makes the count completes the barrier's generation and releases the threads waiting at it
//     (bar.sync). A thread that arrives (bar.arrive) goes on only once no other thread can run, so
//     that what it writes after arriving is missing for the threads it released; in reversed
//     order it goes on at once, so that what it reads after arriving is not yet written by the
//     threads still to arrive. A thread that waits at a barrier nobody completes, a block that
//     ends with arrivals nobody waited for, and counts that differ within a generation are errors.
//
//   - Warp-wide instructions (ldmatrix, mma.sync and __shfl_xor_sync, what the mma.sync kernel
//     uses): lanes 32w .. 32w+31 form warp w. Each lane hands in its own registers and yields; when
//     the last lane of the warp has arrived, the instruction runs once on all lanes' registers with
//     PTX's documented per-lane layouts (the fragment layouts of liif_tensor_core.cuh) and each lane
//     resumes with its own result. Lanes of one warp in different instructions, or some at a
//     barrier or returned while others wait in one, raise an error. ldmatrix addresses must be
//     16-byte aligned rows inside the block's shared memory; tf32 operands must be rounded.
//
//   - Clusters (a launch with `cluster` > 1, what the multicast wgmma kernel runs in): a cluster's
//     blocks run together on one OS thread, each with its own shared memory, __syncthreads() and
//     named barriers; barrier.cluster (cluster_sync) waits for every thread of every block. The
//     blocks run one at a time, each as far as it can before the next (the first first, or in
//     reversed order the last), so that one runs ahead of another as far as their mbarriers let
//     it. mbarriers (mbarrier_init, mbarrier_arrive with its expect_tx bytes, also on a peer
//     block's mbarrier at the same offset, and mbarrier_wait for a phase's parity) count arrivals
//     and transaction bytes; a phase completes when both are in. A bulk copy (cp.async.bulk,
//     multicast to the blocks of a mask) reads its source when issued and lands at the latest
//     moment (once no thread can run, a thread waits for its mbarrier and its arrivals are all
//     in), or in reversed order at once: a read before the wait sees stale bytes, and a slot refilled while a
//     block may still read it is overwritten early. Errors: an mbarrier used before mbarrier_init
//     or whose 8 bytes were overwritten, more arrivals than its count in one phase, a wait that
//     never completes, a bulk copy nobody waited for when the cluster ends, and an arrival or a
//     copy that reaches a block whose threads have all returned.
//
// Limits (what the harness does not model)
//   - warps only as above: no other warp primitives (__ballot_*, ...) and no warp-level ordering of
//     ordinary memory accesses: __syncwarp() does nothing (each lane's WMMA fragment store writes the
//     whole tile, so a missing __syncwarp() goes unnoticed); no divergence or occupancy effects;
//     timing means nothing;
//   - wgmma.fence is a warpgroup-wide no-op: a register written between it and the wgmma that uses
//     it goes unnoticed (the compiler's placement, which the kernel pins with fence_register, is
//     checked in the PTX, not here); the A registers are compared at retirement only;
//   - cp.async copies land at the latest moment (the wait), never earlier: a ring slot refilled
//     while a wgmma or another warp may still read it is not caught (bulk copies do land early in
//     reversed order);
//   - mbarrier operations' memory semantics and scopes (release, acquire, cta, cluster) are not
//     modelled, only their counts and phases;
//   - a wgmma is issued once all 128 threads of its warpgroup have reached it, which orders their
//     earlier stores before it: a missing barrier between the warps of a warpgroup that wrote a
//     shared-memory operand and the wgmma that reads it is not caught, nor a missing
//     fence.proxy.async after ordinary stores (only cp.async landings are tracked);
//   - no atomics, no __threadfence, no static __shared__ arrays, no texture or constant memory;
//   - memory is the host's: sequentially consistent, with no bounds checks of global memory (the
//     harness tests compare results) and none of shared memory beyond the guard zone (nor a write
//     of the guard's own pattern into it);
//   - floating point is the host's: no FMA contraction (built with -ffp-contract=off), so float32
//     results differ from the GPU's in the last bits of the MLP sums, never in the geometry.
#pragma once

#define LIIF_HOST_EXECUTION_HARNESS 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
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

struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
};

// Where a fiber stands in the current phase.
enum class FiberState {
  kRunnable,
  kAtBarrier,
  kAtNamedBarrier,
  kArrived,  // after bar.arrive: resumed once no other thread can run
  kInWarpInstruction,
  kInWarpgroupInstruction,
  kAtMbarrier,
  kFinished
};

// A named barrier (bar.sync / bar.arrive with an id and a thread count): arrivals in the current
// generation, and the generations completed. Also a cluster's __syncthreads() (id 0 of each of its
// blocks) and its barrier.cluster.
struct NamedBarrier {
  int count = 0;  // of the current generation (set by its first arrival)
  int arrived = 0;
  int64_t completed = 0;
};
constexpr int kNamedBarriers = 16;

// An mbarrier object (mbarrier.init / arrive / expect_tx / try_wait.parity): the arrivals each
// phase expects and those still missing, the transaction bytes expected minus those landed, and
// the phases completed. A phase completes when both reach 0.
struct Mbarrier {
  int count = 0;
  int pending = 0;
  int64_t tx = 0;
  int64_t completed = 0;
};

// A bulk copy (cp.async.bulk) into one block of the cluster, not yet landed: its bytes (read when
// issued), where they go and the mbarrier whose transaction count their landing completes.
struct BulkCopy {
  unsigned block;  // in the cluster
  uint32_t dst;
  uint32_t barrier;
  std::vector<unsigned char> bytes;
};

// The warp-wide instruction the lanes of one warp are in: each lane's input registers, and the
// outputs once the last lane has arrived.
struct WarpExchange {
  static constexpr size_t kBytes = 64;
  const char* instruction = nullptr;
  unsigned arrived = 0;
  int64_t completed = 0;  // instructions this warp has completed
  unsigned char in[32][kBytes];
  unsigned char out[32][kBytes];
};

// The warpgroup-wide instruction the threads of one warpgroup are in (each thread's input bytes),
// and the warpgroup's asynchronous operations: issued and not committed, committed groups in
// issue order, each run when a wait retires it.
struct WarpgroupExchange {
  static constexpr size_t kBytes = 64;
  const char* instruction = nullptr;
  unsigned arrived = 0;
  int64_t completed = 0;
  unsigned char in[128][kBytes];
  std::vector<std::function<void()>> open;
  std::vector<std::vector<std::function<void()>>> committed;
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  FiberState state = FiberState::kRunnable;
  bool finished = false;
  int64_t barriers = 0;
  int64_t warp_instructions = 0;  // warp-wide instructions this lane has completed
  int64_t warpgroup_instructions = 0;
  int named_barrier = 0;             // the one this thread waits at (kAtNamedBarrier; -1: cluster)
  NamedBarrier* waiting_at = nullptr;
  int64_t named_barrier_generation = 0;  // and the generation it waits to complete
  uint32_t mbarrier = 0;  // the mbarrier this thread waits at (kAtMbarrier), in its block
  uint32_t mbarrier_parity = 0;  // and the parity of the phase it waits to complete
  // cp.async data landed since this thread's last fence_proxy_async (a wgmma may not read it yet).
  bool unfenced_async_writes = false;
  std::exception_ptr error;
  // Asynchronous copies issued and not yet committed, and committed groups not yet waited for.
  std::vector<PendingCopy> open_copies;
  std::vector<std::vector<PendingCopy>> committed_copies;
};

// Bytes after a block's dynamic shared memory that are checked for writes (see the header), and
// their fill: 0xFFFE at even addresses (the buffer is 128-byte aligned), that is bytes FE FF.
constexpr size_t kSharedGuardBytes = 64 * 1024;
inline unsigned char guard_byte(size_t offset) { return offset % 2 == 0 ? 0xFE : 0xFF; }

// Shared memory of one block, aligned as the GPU aligns dynamic shared memory, and its guard zone:
// [data, data + size) is the block's, [data + size, data + capacity) the guard. The guard is filled
// once: every block checks it when it ends, and one that changed it ends the launch.
struct AlignedBuffer {
  explicit AlignedBuffer(size_t bytes)
      : size(bytes),
        capacity((bytes + 127) / 128 * 128 + kSharedGuardBytes),
        data(static_cast<unsigned char*>(std::aligned_alloc(128, capacity))) {
    if (data == nullptr) throw std::bad_alloc();
    for (size_t i = size; i < capacity; ++i) data[i] = guard_byte(i);
  }
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  size_t size;
  size_t capacity;
  unsigned char* data;
};

// Runs the blocks one OS thread is given, a cluster of them at a time (one block unless the launch
// has clusters). The fibers of all the cluster's blocks share one scheduler: fiber t is thread
// t % threads of the cluster's block t / threads.
class BlockRunner {
 public:
  BlockRunner(unsigned threads, size_t shared_bytes, unsigned cluster = 1)
      : threads_(threads),
        cluster_(cluster),
        fibers_(static_cast<size_t>(threads) * cluster),
        warps_((fibers_.size() + 31) / 32),
        warpgroups_((fibers_.size() + 127) / 128),
        named_(cluster),
        finished_(cluster) {
    if (cluster > 1 && threads % 128 != 0) {
      throw std::invalid_argument("host harness: the blocks of a cluster must be whole warpgroups");
    }
    for (unsigned b = 0; b < cluster; ++b) {
      shared_.push_back(std::make_unique<AlignedBuffer>(shared_bytes));
    }
    for (Fiber& f : fibers_) f.stack.resize(kStackBytes);
  }

  // Runs the cluster whose first block is `first_block` (blocks first_block .. + cluster - 1).
  void run_block(const std::function<void()>& kernel, bool reverse_order, unsigned first_block = 0) {
    kernel_ = &kernel;
    reverse_order_ = reverse_order;
    first_block_ = first_block;
    for (auto& buffer : shared_) std::memset(buffer->data, 0xFF, buffer->size);
    for (WarpExchange& w : warps_) {
      w.instruction = nullptr;
      w.arrived = 0;
      w.completed = 0;
    }
    for (WarpgroupExchange& w : warpgroups_) {
      w.instruction = nullptr;
      w.arrived = 0;
      w.completed = 0;
      w.open.clear();
      w.committed.clear();
    }
    for (auto& block : named_) {
      for (NamedBarrier& b : block) b = NamedBarrier{};
    }
    cluster_barrier_ = NamedBarrier{};
    mbarriers_.clear();
    bulk_copies_.clear();
    std::fill(finished_.begin(), finished_.end(), 0u);
    for (Fiber& f : fibers_) {
      f.state = FiberState::kRunnable;
      f.finished = false;
      f.barriers = 0;
      f.warp_instructions = 0;
      f.warpgroup_instructions = 0;
      f.unfenced_async_writes = false;
      f.error = nullptr;
      f.open_copies.clear();
      f.committed_copies.clear();
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.data();
      f.context.uc_stack.ss_size = f.stack.size();
      f.context.uc_link = &scheduler_;
      makecontext(&f.context, &BlockRunner::fiber_main, 0);
    }
    current_runner() = this;
    const unsigned n = static_cast<unsigned>(fibers_.size());
    for (int64_t phase = 0;; ++phase) {
      // Passes over the threads until each is at the barrier or has returned: a lane waiting in a
      // warp-wide instruction resumes in a later pass, once the last lane of its warp has arrived
      // (a thread at a named barrier once it completes, at an mbarrier once its phase does).
      // Reversed order alternates by phase and by pass (a kernel of named barriers only, or a
      // cluster, has one phase).
      // A cluster's blocks run one at a time, each as far as it can before the next (the first
      // first, or in reversed order the last): so that one block runs ahead of another as far as
      // their mbarriers let it, and a block that exits while a peer may still copy into it or
      // arrive on its barriers is caught.
      bool resumed = true;
      for (int64_t pass = 0; resumed; ++pass) {
        resumed = false;
        const bool reverse = reverse_order && ((phase + pass) % 2 == 1);
        for (unsigned k = 0; k < cluster_; ++k) {
          const unsigned block = reverse ? cluster_ - 1 - k : k;
          for (bool block_resumed = true; block_resumed;) {
            block_resumed = false;
            for (unsigned i = 0; i < threads_; ++i) {
              const unsigned t = block * threads_ + (reverse ? threads_ - 1 - i : i);
              Fiber& f = fibers_[t];
              current_ = t;
              const bool ready =
                  f.state == FiberState::kRunnable ||
                  (f.state == FiberState::kInWarpInstruction &&
                   warps_[t / 32].completed > f.warp_instructions) ||
                  (f.state == FiberState::kInWarpgroupInstruction &&
                   warpgroups_[t / 128].completed > f.warpgroup_instructions) ||
                  (f.state == FiberState::kAtNamedBarrier &&
                   f.waiting_at->completed > f.named_barrier_generation) ||
                  (f.state == FiberState::kAtMbarrier && mbarrier_phase_done(f));
              if (!ready) continue;
              threadIdx.x = t % threads_;
              blockIdx.x = first_block_ + block;
              f.state = FiberState::kRunnable;
              swapcontext(&scheduler_, &f.context);
              block_resumed = resumed = true;
              if (f.error) {
                current_runner() = nullptr;
                std::rethrow_exception(f.error);
              }
            }
            if (cluster_ == 1) break;  // one pass over the threads of a lone block
          }
        }
        if (!resumed) resumed = land_awaited_copies();
        if (!resumed) {
          for (Fiber& f : fibers_) {
            if (f.state == FiberState::kArrived) {
              f.state = FiberState::kRunnable;
              resumed = true;
            }
          }
        }
      }
      for (unsigned w = 0; w < warps_.size(); ++w) {
        if (warps_[w].arrived != 0) {
          fail(std::string(warps_[w].instruction) + " reached by " +
               std::to_string(warps_[w].arrived) + " lanes of warp " + std::to_string(w) +
               " while the others wait at a barrier or returned (block " +
               std::to_string(first_block_ + w * 32 / threads_) + ")");
        }
      }
      for (unsigned v = 0; v < warpgroups_.size(); ++v) {
        if (warpgroups_[v].arrived != 0) {
          fail(std::string(warpgroups_[v].instruction) + " reached by " +
               std::to_string(warpgroups_[v].arrived) + " threads of warpgroup " +
               std::to_string(v) + " while the others wait at a barrier or returned (block " +
               std::to_string(first_block_ + v * 128 / threads_) + ")");
        }
      }
      for (unsigned t = 0; t < n; ++t) {
        const Fiber& f = fibers_[t];
        if (f.state == FiberState::kAtNamedBarrier) {
          const NamedBarrier& b = *f.waiting_at;
          fail("thread " + std::to_string(t % threads_) + " waits forever at " +
               (f.named_barrier < 0  ? std::string("the cluster barrier")
                : f.named_barrier == 0 ? std::string("__syncthreads()")
                                       : "named barrier " + std::to_string(f.named_barrier)) +
               " (" + std::to_string(b.arrived) + " of " + std::to_string(b.count) +
               " threads arrived; the others wait elsewhere or returned, block " +
               std::to_string(first_block_ + t / threads_) + ")");
        }
        if (f.state == FiberState::kAtMbarrier) {
          const Mbarrier& b = mbarriers_.at({t / threads_, f.mbarrier});
          fail("thread " + std::to_string(t % threads_) + " waits forever at the mbarrier at byte " +
               std::to_string(f.mbarrier) + " for phase parity " +
               std::to_string(f.mbarrier_parity) + " (" + std::to_string(b.pending) + " of " +
               std::to_string(b.count) + " arrivals and " + std::to_string(b.tx) +
               " transaction bytes missing, block " + std::to_string(first_block_ + t / threads_) +
               ")");
        }
      }
      for (Fiber& f : fibers_) {
        if (f.state == FiberState::kAtBarrier) f.state = FiberState::kRunnable;
      }
      unsigned finished = 0;
      for (const Fiber& f : fibers_) finished += f.finished ? 1 : 0;
      if (finished == n) {
        for (unsigned b = 0; b < cluster_; ++b) {
          for (int id = 0; id < kNamedBarriers; ++id) {
            if (named_[b][id].arrived != 0) {
              fail("the block ended with " + std::to_string(named_[b][id].arrived) + " of " +
                   std::to_string(named_[b][id].count) + " threads arrived at named barrier " +
                   std::to_string(id) + " (an arrival nobody waited for; block " +
                   std::to_string(first_block_ + b) + ")");
            }
          }
        }
        if (!bulk_copies_.empty()) {
          fail("the cluster ended with " + std::to_string(bulk_copies_.size()) +
               " bulk copies that no thread waited for (block " +
               std::to_string(first_block_ + bulk_copies_.front().block) + ")");
        }
        check_guard_zone();
        break;
      }
      if (finished != 0) {
        fail("__syncthreads() reached by " + std::to_string(n - finished) + " of " +
             std::to_string(n) + " threads while the others returned (block " +
             std::to_string(first_block_) + ")");
      }
    }
    current_runner() = nullptr;
  }

  // The current thread's block: its index in the cluster, its shared memory.
  unsigned block_in_cluster() const { return current_ / threads_; }
  unsigned char* shared_memory() { return shared_[block_in_cluster()]->data; }
  size_t shared_size() const { return shared_[block_in_cluster()]->size; }

  void sync() {
    Fiber& f = fibers_[current_];
    ++f.barriers;
    if (cluster_ > 1) {
      // In a cluster each block's __syncthreads() is its own: a barrier of the block's threads
      // (the others may wait for something else meanwhile, such as an mbarrier).
      barrier_arrive(named_[block_in_cluster()][0], 0, static_cast<int>(threads_), true);
      return;
    }
    f.state = FiberState::kAtBarrier;
    swapcontext(&f.context, &scheduler_);
  }

  // barrier.cluster.arrive + barrier.cluster.wait: every thread of every block of the cluster.
  void cluster_sync() {
    barrier_arrive(cluster_barrier_, -1, static_cast<int>(fibers_.size()), true);
  }

  // bar.sync (`wait`) or bar.arrive on named barrier `id` (1 .. 15) of `count` threads (a multiple
  // of 32): the arrival that makes `count` completes the generation; sync returns once its
  // generation has completed.
  void named_barrier(int id, int count, bool wait) {
    if (id < 1 || id >= kNamedBarriers) {
      throw std::runtime_error("host harness: named barrier id " + std::to_string(id) +
                               " outside 1 .. 15 (0 is __syncthreads())");
    }
    if (count <= 0 || count % 32 != 0 || static_cast<unsigned>(count) > threads_) {
      throw std::runtime_error("host harness: named barrier " + std::to_string(id) + " count " +
                               std::to_string(count) + " is not a multiple of 32 up to the block size");
    }
    barrier_arrive(named_[block_in_cluster()][id], id, count, wait);
  }

  // mbarrier.init: the mbarrier at `bar` (8 bytes of this block's shared memory) expects `count`
  // arrivals per phase. Its bytes hold a pattern from then on: a kernel that overwrites them
  // (placing data over its barriers) fails at the barrier's next use.
  void mbarrier_init(const void* bar, int count) {
    const uint32_t at = mbarrier_offset(bar, "mbarrier.init");
    if (count < 1 || count >= (1 << 20)) {
      throw std::runtime_error("host harness: mbarrier.init count " + std::to_string(count) +
                               " outside 1 .. 2^20 - 1");
    }
    Mbarrier& b = mbarriers_[{block_in_cluster(), at}];
    b = Mbarrier{count, count, 0, 0};
    std::memcpy(shared_memory() + at, &kMbarrierPattern, 8);
  }

  // mbarrier.arrive (with expect_tx `bytes` first) on the mbarrier at `bar`'s offset in block
  // `block` of the cluster (mapa; this thread's own block included).
  void mbarrier_arrive(const void* bar, unsigned block, uint32_t bytes) {
    const uint32_t at = mbarrier_offset(bar, "mbarrier.arrive");
    if (block >= cluster_) {
      throw std::runtime_error("host harness: mbarrier.arrive on block " + std::to_string(block) +
                               " of a cluster of " + std::to_string(cluster_));
    }
    if (finished_[block] == threads_) {
      throw std::runtime_error("host harness: an mbarrier.arrive reaches block " +
                               std::to_string(first_block_ + block) +
                               " of the cluster after all its threads returned (a block must not "
                               "exit while others may still arrive on its barriers)");
    }
    Mbarrier& b = initialized(block, at);
    b.tx += bytes;
    if (--b.pending < 0) {
      throw std::runtime_error("host harness: more arrivals on the mbarrier at byte " +
                               std::to_string(at) + " than its count " + std::to_string(b.count) +
                               " in one phase");
    }
    complete_phase_if_done(b);
  }

  // mbarrier.try_wait.parity in a loop: returns once the phase of parity `parity` of the mbarrier
  // at `bar` (this block's) has completed, that is once the current phase's parity differs.
  void mbarrier_wait(const void* bar, uint32_t parity) {
    Fiber& f = fibers_[current_];
    f.mbarrier = mbarrier_offset(bar, "mbarrier.try_wait");
    f.mbarrier_parity = parity & 1;
    initialized(block_in_cluster(), f.mbarrier);
    if (mbarrier_phase_done(f)) return;
    f.state = FiberState::kAtMbarrier;
    swapcontext(&f.context, &scheduler_);
  }

  // cp.async.bulk (multicast to the blocks of `mask`, or this block alone): `bytes` from global
  // memory at `src` to `dst` (this block's shared memory; the same offset in each block of the
  // mask), completing that many transaction bytes on the mbarrier at `bar`'s offset in each. The
  // source is read now; the data lands at the latest moment (once no thread can run, a thread
  // waits for the mbarrier and its arrivals are all in), or in reversed order at once: so that a
  // read before the wait sees stale bytes, and a slot refilled while it may still be read is
  // overwritten early.
  void bulk_copy(void* dst, const void* src, uint32_t bytes, const void* bar, unsigned mask) {
    if (bytes == 0 || bytes % 16 != 0 || reinterpret_cast<uintptr_t>(dst) % 16 != 0 ||
        reinterpret_cast<uintptr_t>(src) % 16 != 0) {
      throw std::runtime_error("host harness: cp.async.bulk needs 16-byte aligned addresses and a "
                               "size that is a multiple of 16");
    }
    if (!in_shared_memory(dst, bytes)) {
      throw std::runtime_error("host harness: cp.async.bulk to bytes outside the block's shared "
                               "memory");
    }
    if (mask == 0 || mask >= (1u << cluster_)) {
      throw std::runtime_error("host harness: cp.async.bulk multicast mask " + std::to_string(mask) +
                               " names no block or one outside the cluster of " +
                               std::to_string(cluster_));
    }
    const uint32_t dst_at = static_cast<uint32_t>(static_cast<unsigned char*>(dst) - shared_memory());
    const uint32_t bar_at = mbarrier_offset(bar, "cp.async.bulk");
    const unsigned char* from = static_cast<const unsigned char*>(src);
    for (unsigned block = 0; block < cluster_; ++block) {
      if ((mask >> block & 1u) == 0) continue;
      initialized(block, bar_at);
      bulk_copies_.push_back({block, dst_at, bar_at, std::vector<unsigned char>(from, from + bytes)});
      if (reverse_order_) land(bulk_copies_.size() - 1);
    }
  }

  // A warp-wide instruction: this lane's `in_bytes` of input registers go in; when the last lane of
  // the warp arrives, compute(in, out) runs once over all lanes' registers; this lane's `out_bytes`
  // come back.
  template <typename Compute>
  void warp_instruction(const char* name, const void* in, size_t in_bytes, void* out,
                        size_t out_bytes, Compute&& compute) {
    const unsigned t = current_;
    Fiber& f = fibers_[t];
    WarpExchange& w = warps_[t / 32];
    const unsigned lanes = std::min(32u, threads_ - t % threads_ / 32 * 32);
    if (w.arrived == 0) {
      w.instruction = name;
    } else if (std::strcmp(w.instruction, name) != 0) {
      throw std::runtime_error(std::string("host harness: lanes of warp ") + std::to_string(t / 32) +
                               " in different warp-wide instructions: " + w.instruction + " and " +
                               name);
    }
    std::memcpy(w.in[t % 32], in, in_bytes);
    if (++w.arrived == lanes) {
      compute(w.in, w.out, lanes);
      w.arrived = 0;
      ++w.completed;
    } else {
      f.state = FiberState::kInWarpInstruction;
      swapcontext(&f.context, &scheduler_);
    }
    std::memcpy(out, w.out[t % 32], out_bytes);
    ++f.warp_instructions;
  }

  // A warpgroup-wide instruction: this thread's `in_bytes` go in; when the last of the warpgroup's
  // 128 threads arrives, compute(in, warpgroup) runs once.
  template <typename Compute>
  void warpgroup_instruction(const char* name, const void* in, size_t in_bytes, Compute&& compute) {
    const unsigned t = current_;
    Fiber& f = fibers_[t];
    WarpgroupExchange& w = warpgroups_[t / 128];
    if (threads_ < (t % threads_ / 128 + 1) * 128) {
      throw std::runtime_error(std::string("host harness: ") + name +
                               " needs a whole warpgroup of 128 threads");
    }
    if (w.arrived == 0) {
      w.instruction = name;
    } else if (std::strcmp(w.instruction, name) != 0) {
      throw std::runtime_error(std::string("host harness: threads of warpgroup ") +
                               std::to_string(t / 128) + " in different warpgroup-wide "
                               "instructions: " + w.instruction + " and " + name);
    }
    std::memcpy(w.in[t % 128], in, in_bytes);
    if (++w.arrived == 128) {
      compute(w.in, w);
      w.arrived = 0;
      ++w.completed;
    } else {
      f.state = FiberState::kInWarpgroupInstruction;
      swapcontext(&f.context, &scheduler_);
    }
    ++f.warpgroup_instructions;
  }

  // Whether some thread of this block has cp.async data landed since its last fence_proxy_async.
  bool any_unfenced_async_writes() const {
    const unsigned first = block_in_cluster() * threads_;
    for (unsigned t = first; t < first + threads_; ++t) {
      if (fibers_[t].unfenced_async_writes) return true;
    }
    return false;
  }

  // A write past the end of a block's shared memory, into the guard zone: an error.
  void check_guard_zone() const {
    for (unsigned b = 0; b < cluster_; ++b) {
      const AlignedBuffer& buffer = *shared_[b];
      for (size_t i = buffer.size; i < buffer.capacity; ++i) {
        if (buffer.data[i] == guard_byte(i)) continue;
        current_runner() = nullptr;
        throw std::runtime_error(
            "host harness: block " + std::to_string(first_block_ + b) + " wrote past the end of its " +
            std::to_string(buffer.size) + " bytes of dynamic shared memory (at byte " +
            std::to_string(i) + ")");
      }
    }
  }

  // Whether [p, p + bytes) lies inside this block's shared memory.
  bool in_shared_memory(const void* p, size_t bytes) const {
    const AlignedBuffer& buffer = *shared_[block_in_cluster()];
    const unsigned char* c = static_cast<const unsigned char*>(p);
    return c >= buffer.data && c + bytes <= buffer.data + buffer.size;
  }

  Fiber& current_fiber() { return fibers_[current_]; }

  static BlockRunner*& current_runner() {
    static thread_local BlockRunner* runner = nullptr;
    return runner;
  }

 private:
  static constexpr size_t kStackBytes = 256 * 1024;
  static constexpr uint64_t kMbarrierPattern = 0x4D42415252494552ull;  // "MBARRIER"

  static void fiber_main() {
    BlockRunner* self = current_runner();
    try {
      (*self->kernel_)();
    } catch (...) {
      self->fibers_[self->current_].error = std::current_exception();
    }
    self->fibers_[self->current_].finished = true;
    self->fibers_[self->current_].state = FiberState::kFinished;
    ++self->finished_[self->block_in_cluster()];
    // Returning resumes uc_link, the scheduler.
  }

  [[noreturn]] void fail(const std::string& what) {
    current_runner() = nullptr;
    throw std::runtime_error("host harness: " + what);
  }

  // An arrival at barrier `b` (named barrier `id`; 0: a cluster block's __syncthreads(); -1: the
  // cluster barrier) of `count` threads; waits for its generation to complete if `wait`.
  void barrier_arrive(NamedBarrier& b, int id, int count, bool wait) {
    if (b.arrived == 0) {
      b.count = count;
    } else if (b.count != count) {
      throw std::runtime_error("host harness: named barrier " + std::to_string(id) + " reached with " +
                               std::to_string(count) + " and " + std::to_string(b.count) +
                               " threads in one generation");
    }
    const int64_t generation = b.completed;
    Fiber& f = fibers_[current_];
    if (++b.arrived == count) {
      b.arrived = 0;
      ++b.completed;
    } else if (wait) {
      f.named_barrier = id;
      f.waiting_at = &b;
      f.named_barrier_generation = generation;
      f.state = FiberState::kAtNamedBarrier;
      swapcontext(&f.context, &scheduler_);
      return;
    }
    // A thread that arrived goes on at once in reversed order (so that what it reads after
    // arriving is not yet written by the threads that wait at the barrier, if nothing else made
    // it wait for them), and otherwise only once every other thread has run as far as it can (the
    // ones it released included: what it writes after arriving is missing when they read it).
    if (!wait && !reverse_order_) {
      f.state = FiberState::kArrived;
      swapcontext(&f.context, &scheduler_);
    }
  }

  uint32_t mbarrier_offset(const void* bar, const char* what) const {
    if (reinterpret_cast<uintptr_t>(bar) % 8 != 0 || !in_shared_memory(bar, 8)) {
      throw std::runtime_error(std::string("host harness: ") + what +
                               ": the mbarrier is not 8 bytes aligned inside the block's shared "
                               "memory");
    }
    return static_cast<uint32_t>(static_cast<const unsigned char*>(bar) -
                                 shared_[block_in_cluster()]->data);
  }

  // The mbarrier at byte `at` of block `block`: initialised, its bytes unchanged since.
  Mbarrier& initialized(unsigned block, uint32_t at) {
    auto found = mbarriers_.find({block, at});
    if (found == mbarriers_.end()) {
      throw std::runtime_error("host harness: an mbarrier at byte " + std::to_string(at) +
                               " of block " + std::to_string(first_block_ + block) +
                               " used before mbarrier.init");
    }
    if (std::memcmp(shared_[block]->data + at, &kMbarrierPattern, 8) != 0) {
      throw std::runtime_error("host harness: the mbarrier at byte " + std::to_string(at) +
                               " of block " + std::to_string(first_block_ + block) +
                               " was overwritten by ordinary stores or copies");
    }
    return found->second;
  }

  static void complete_phase_if_done(Mbarrier& b) {
    if (b.pending == 0 && b.tx == 0) {
      ++b.completed;
      b.pending = b.count;
    }
  }

  // Lands bulk copy i: its bytes into its block's shared memory, its transaction bytes completed.
  void land(size_t i) {
    BulkCopy copy = std::move(bulk_copies_[i]);
    bulk_copies_.erase(bulk_copies_.begin() + static_cast<std::ptrdiff_t>(i));
    if (finished_[copy.block] == threads_) {
      throw std::runtime_error("host harness: a bulk copy lands in block " +
                               std::to_string(first_block_ + copy.block) +
                               " of the cluster after all its threads returned");
    }
    std::memcpy(shared_[copy.block]->data + copy.dst, copy.bytes.data(), copy.bytes.size());
    Mbarrier& b = initialized(copy.block, copy.barrier);
    b.tx -= static_cast<int64_t>(copy.bytes.size());
    complete_phase_if_done(b);
  }

  // Whether the phase fiber f waits for has completed.
  bool mbarrier_phase_done(const Fiber& f) {
    const unsigned block = static_cast<unsigned>(&f - fibers_.data()) / threads_;
    return (initialized(block, f.mbarrier).completed & 1) != f.mbarrier_parity;
  }

  // The latest moment, when no thread can run: the bulk copies into each mbarrier that a thread
  // waits at and whose arrivals are all in land. Whether any did.
  bool land_awaited_copies() {
    bool landed = false;
    for (size_t i = 0; i < bulk_copies_.size();) {
      const BulkCopy& copy = bulk_copies_[i];
      const auto first = fibers_.begin() + static_cast<std::ptrdiff_t>(copy.block * threads_);
      const bool awaited = std::any_of(first, first + threads_, [&](const Fiber& f) {
        return f.state == FiberState::kAtMbarrier && f.mbarrier == copy.barrier;
      });
      if (awaited && initialized(copy.block, copy.barrier).pending == 0) {
        land(i);
        landed = true;
      } else {
        ++i;
      }
    }
    return landed;
  }

  unsigned threads_;
  unsigned cluster_;
  std::vector<Fiber> fibers_;
  std::vector<WarpExchange> warps_;
  std::vector<WarpgroupExchange> warpgroups_;
  std::vector<std::array<NamedBarrier, kNamedBarriers>> named_;  // per block of the cluster
  NamedBarrier cluster_barrier_;
  std::map<std::pair<unsigned, uint32_t>, Mbarrier> mbarriers_;  // by block and byte
  std::vector<BulkCopy> bulk_copies_;
  std::vector<unsigned> finished_;  // threads returned, per block
  std::vector<std::unique_ptr<AlignedBuffer>> shared_;
  ucontext_t scheduler_{};
  const std::function<void()>* kernel_ = nullptr;
  bool reverse_order_ = false;
  unsigned first_block_ = 0;
  unsigned current_ = 0;
};

// Runs `kernel` (a call of the __global__ function with its arguments) on a grid of `blocks` blocks
// of `threads` threads with `shared_bytes` of dynamic shared memory, on up to `workers` OS threads;
// in clusters of `cluster` blocks (blocks a multiple of it), each cluster's blocks run together.
inline void launch(unsigned blocks, unsigned threads, size_t shared_bytes,
                   const std::function<void()>& kernel, bool reverse_order, unsigned workers,
                   unsigned cluster = 1) {
  if (blocks == 0) return;
  if (threads == 0 || threads > 1024) throw std::invalid_argument("host harness: bad block size");
  if (cluster == 0 || cluster > 8 || blocks % cluster != 0) {
    throw std::invalid_argument("host harness: a grid of " + std::to_string(blocks) +
                                " blocks is not whole clusters of " + std::to_string(cluster));
  }
  const unsigned clusters = blocks / cluster;
  workers = std::max(1u, std::min(workers, clusters));
  std::atomic<unsigned> next{0};
  std::vector<std::exception_ptr> errors(workers);
  auto work = [&](unsigned w) {
    try {
      BlockRunner runner(threads, shared_bytes, cluster);
      blockDim.x = threads;
      gridDim.x = blocks;
      for (unsigned c = next++; c < clusters; c = next++) {
        runner.run_block(kernel, reverse_order, c * cluster);
      }
    } catch (...) {
      errors[w] = std::current_exception();
      next = clusters;
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

// Warp-level ordering is not modelled (see the header).
inline void __syncwarp(unsigned = 0xFFFFFFFFu) {}

// The SM's cycle counter (the phase-clocks timing probe): here the steady clock's nanoseconds,
// which increase as the GPU's cycles do and are never 0.
inline long long clock64() {
  return static_cast<long long>(std::chrono::steady_clock::now().time_since_epoch().count());
}

// ---------------------------------------------------------------------------------------------
// Reduced-precision operand types, bit-exact.

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace liif_harness {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace liif_harness

// c10's conversions: round to nearest, ties to even; overflow to infinity; NaN stays NaN.
inline __half __float2half_rn(float f) { return {c10::Half(f).x}; }
inline float __half2float(__half h) { return c10::Half(h.bits, c10::Half::from_bits()); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {c10::BFloat16(f).x}; }
inline float __bfloat162float(__nv_bfloat16 b) {
  return c10::BFloat16(b.bits, c10::BFloat16::from_bits());
}

// ---------------------------------------------------------------------------------------------
// nvcuda::wmma, the subset the kernels use (see the header for the model).

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// Round to nearest, ties away from zero, to 10 mantissa bits (cvt.rna.tf32.f32).
inline float __float_to_tf32(float f) {
  const uint32_t x = liif_harness::float_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return f;
  return liif_harness::bits_float((x + 0x1000u) & ~0x1FFFu);
}

namespace detail {

template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

inline float widen(float v) { return v; }
inline float widen(__half v) { return __half2float(v); }
inline float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

inline void check_access(const void* p, unsigned ldm, size_t element_bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    throw std::runtime_error(std::string("host harness: ") + what +
                             ": the pointer is not 32-byte aligned");
  }
  if (ldm * element_bytes % 16 != 0) {
    throw std::runtime_error(std::string("host harness: ") + what + ": ldm " +
                             std::to_string(ldm) + " is not a multiple of 16 bytes");
  }
}

inline void check_tf32_operand(float v) {
  if (!std::isnan(v) && (liif_harness::float_bits(v) & 0x1FFFu) != 0) {
    throw std::runtime_error("host harness: a tf32 operand was not rounded with __float_to_tf32");
  }
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = T;
  using storage_element_type = typename detail::Storage<T>::type;
  static constexpr int rows = detail::Shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::Shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  storage_element_type x[num_elements];  // the whole tile, row-major, in every lane
};

template <typename Use, int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<Use, M, N, K, T, row_major>& f,
                             const typename fragment<Use, M, N, K, T, row_major>::storage_element_type* p,
                             unsigned ldm) {
  using F = fragment<Use, M, N, K, T, row_major>;
  detail::check_access(p, ldm, sizeof(*p), "load_matrix_sync");
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      f.x[r * F::cols + c] = p[static_cast<size_t>(r) * ldm + c];
      if constexpr (std::is_same_v<T, precision::tf32>) detail::check_tf32_operand(f.x[r * F::cols + c]);
    }
  }
}

template <int M, int N, int K, typename T>
inline void fill_fragment(fragment<accumulator, M, N, K, T>& f, T value) {
  for (T& v : f.x) v = value;
}

template <int M, int N, int K, typename A>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, A, row_major>& a,
                     const fragment<matrix_b, M, N, K, A, row_major>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  // Widened once per call, so that the product loop is plain float32 (and vectorises).
  float av[M * K], bv[K * N], result[M * N];
  for (int e = 0; e < M * K; ++e) av[e] = detail::widen(a.x[e]);
  for (int e = 0; e < K * N; ++e) bv[e] = detail::widen(b.x[e]);
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) result[i * N + j] = c.x[i * N + j];
    for (int k = 0; k < K; ++k) {
      const float aik = av[i * K + k];
      for (int j = 0; j < N; ++j) result[i * N + j] += aik * bv[k * N + j];
    }
  }
  std::memcpy(d.x, result, sizeof result);
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f,
                              unsigned ldm, layout_t layout) {
  detail::check_access(p, ldm, sizeof(float), "store_matrix_sync");
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      const size_t at = layout == mem_row_major ? static_cast<size_t>(i) * ldm + j
                                                : static_cast<size_t>(j) * ldm + i;
      p[at] = f.x[i * N + j];
    }
  }
}

}  // namespace wmma
}  // namespace nvcuda

// ---------------------------------------------------------------------------------------------
// Asynchronous copies (liif_tensor_core.cuh's names; cp.async on the GPU).

namespace liif {
namespace cuda {

inline void async_copy_16(void* shared, const void* global) {
  if (reinterpret_cast<uintptr_t>(shared) % 16 != 0 || reinterpret_cast<uintptr_t>(global) % 16 != 0) {
    throw std::runtime_error("host harness: async_copy_16 needs 16-byte aligned addresses");
  }
  liif_harness::BlockRunner* runner = liif_harness::BlockRunner::current_runner();
  if (!runner->in_shared_memory(shared, 16)) {
    throw std::runtime_error("host harness: async_copy_16 to bytes outside the block's " +
                             std::to_string(runner->shared_size()) +
                             " bytes of dynamic shared memory");
  }
  liif_harness::PendingCopy copy{shared, {}};
  std::memcpy(copy.bytes, global, 16);
  runner->current_fiber().open_copies.push_back(copy);
}

inline void async_copy_commit() {
  liif_harness::Fiber& f = liif_harness::BlockRunner::current_runner()->current_fiber();
  f.committed_copies.push_back(std::move(f.open_copies));
  f.open_copies.clear();
}

template <int Pending>
inline void async_copy_wait() {
  liif_harness::Fiber& f = liif_harness::BlockRunner::current_runner()->current_fiber();
  while (f.committed_copies.size() > static_cast<size_t>(Pending)) {
    for (const liif_harness::PendingCopy& c : f.committed_copies.front()) {
      std::memcpy(c.dst, c.bytes, 16);
      f.unfenced_async_writes = true;
    }
    f.committed_copies.erase(f.committed_copies.begin());
  }
}

}  // namespace cuda
}  // namespace liif

// ---------------------------------------------------------------------------------------------
// Warp-wide instructions of the mma.sync kernel (liif_tensor_core.cuh's names on the GPU).

namespace liif_harness {

enum class MmaOperands { kBf16, kFp16, kTf32 };

using WarpRegisters = unsigned char[32][WarpExchange::kBytes];

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane l addresses row l % 8 of matrix l / 8 and receives
// in r[j] the 4 bytes at row l / 4, bytes 4 (l % 4) .. +3, of matrix j.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  BlockRunner* runner = BlockRunner::current_runner();
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0 || !runner->in_shared_memory(row, 16)) {
    throw std::runtime_error("host harness: ldmatrix row address not 16-byte aligned inside the "
                             "block's shared memory");
  }
  runner->warp_instruction("ldmatrix.x4", &row, sizeof row, r, sizeof r,
                           [](const WarpRegisters& in, WarpRegisters& out, unsigned lanes) {
    if (lanes != 32) throw std::runtime_error("host harness: ldmatrix needs a full warp");
    const unsigned char* rows[32];
    for (unsigned l = 0; l < 32; ++l) std::memcpy(&rows[l], in[l], sizeof rows[l]);
    for (unsigned l = 0; l < 32; ++l) {
      uint32_t v[4];
      for (int j = 0; j < 4; ++j) std::memcpy(&v[j], rows[8 * j + l / 4] + 4 * (l % 4), 4);
      std::memcpy(out[l], v, sizeof v);
    }
  });
}

namespace detail {

inline float half_bits_to_float(uint16_t bits, MmaOperands kind) {
  return kind == MmaOperands::kBf16 ? static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()))
                                    : static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// The element of a 32-bit fragment register: 16-bit operands hold two (the lower-indexed one in
// the low bits), tf32 one.
inline float fragment_element(uint32_t reg, int half, MmaOperands kind) {
  if (kind == MmaOperands::kTf32) {
    const float v = bits_float(reg);
    if (!std::isnan(v) && (reg & 0x1FFFu) != 0) {
      throw std::runtime_error("host harness: an mma.sync tf32 operand was not rounded to tf32");
    }
    return v;
  }
  return half_bits_to_float(static_cast<uint16_t>(half == 0 ? reg : reg >> 16), kind);
}

// Lane (g = lane / 4, t = lane % 4)'s part of a 16 x 16 A operand of 16-bit elements, as mma.sync
// m16n8k16 and wgmma (for each warp's 16 rows) lay it out: a[0] (g, 2t..2t+1), a[1] (g+8, 2t..),
// a[2] (g, 2t+8..), a[3] (g+8, 2t+8..), into A.
inline void unpack_a_fragment_16bit(float (&A)[16][16], const uint32_t (&a)[4], int g, int t,
                                    MmaOperands kind) {
  for (int h = 0; h < 2; ++h) {
    A[g][2 * t + h] = fragment_element(a[0], h, kind);
    A[g + 8][2 * t + h] = fragment_element(a[1], h, kind);
    A[g][2 * t + 8 + h] = fragment_element(a[2], h, kind);
    A[g + 8][2 * t + 8 + h] = fragment_element(a[3], h, kind);
  }
}

struct MmaLane {
  uint32_t a[4], b[2];
  float c[4];
};

}  // namespace detail

// mma.sync.aligned.m16n8k16 (bf16, fp16) / m16n8k8 (tf32) .row.col.f32: D = A B + C on the lanes'
// fragments (layouts in liif_tensor_core.cuh), products exact and summed in float32.
inline void mma_16x8(MmaOperands kind, float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                     uint32_t b1) {
  detail::MmaLane lane_in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {d[0], d[1], d[2], d[3]}};
  BlockRunner::current_runner()->warp_instruction(
      "mma.sync", &lane_in, sizeof lane_in, d, sizeof d,
      [kind](const WarpRegisters& in, WarpRegisters& out, unsigned lanes) {
    if (lanes != 32) throw std::runtime_error("host harness: mma.sync needs a full warp");
    const int K = kind == MmaOperands::kTf32 ? 8 : 16;
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      detail::MmaLane x;
      std::memcpy(&x, in[l], sizeof x);
      const int g = l / 4, t = l % 4;
      if (kind == MmaOperands::kTf32) {
        A[g][t] = detail::fragment_element(x.a[0], 0, kind);
        A[g + 8][t] = detail::fragment_element(x.a[1], 0, kind);
        A[g][t + 4] = detail::fragment_element(x.a[2], 0, kind);
        A[g + 8][t + 4] = detail::fragment_element(x.a[3], 0, kind);
        B[t][g] = detail::fragment_element(x.b[0], 0, kind);
        B[t + 4][g] = detail::fragment_element(x.b[1], 0, kind);
      } else {
        detail::unpack_a_fragment_16bit(A, x.a, g, t, kind);
        for (int h = 0; h < 2; ++h) {
          B[2 * t + h][g] = detail::fragment_element(x.b[0], h, kind);
          B[2 * t + 8 + h][g] = detail::fragment_element(x.b[1], h, kind);
        }
      }
      C[g][2 * t] = x.c[0];
      C[g][2 * t + 1] = x.c[1];
      C[g + 8][2 * t] = x.c[2];
      C[g + 8][2 * t + 1] = x.c[3];
    }
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 8; ++j) {
        float sum = C[i][j];
        for (int k = 0; k < K; ++k) sum += A[i][k] * B[k][j];
        C[i][j] = sum;
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      const float v[4] = {C[g][2 * t], C[g][2 * t + 1], C[g + 8][2 * t], C[g + 8][2 * t + 1]};
      std::memcpy(out[l], v, sizeof v);
    }
  });
}

}  // namespace liif_harness

// __shfl_xor_sync over the full warp: lane l receives lane (l ^ lane_mask)'s value.
inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  if (mask != 0xFFFFFFFFu) throw std::runtime_error("host harness: __shfl_xor_sync needs a full mask");
  float result;
  liif_harness::BlockRunner::current_runner()->warp_instruction(
      "shfl.xor", &value, sizeof value, &result, sizeof result,
      [lane_mask](const liif_harness::WarpRegisters& in, liif_harness::WarpRegisters& out,
                  unsigned lanes) {
    if (lanes != 32) throw std::runtime_error("host harness: __shfl_xor_sync needs a full warp");
    for (unsigned l = 0; l < 32; ++l) std::memcpy(out[l], in[l ^ static_cast<unsigned>(lane_mask)], 4);
  });
  return result;
}

// __ballot_sync over the full warp: bit l of every lane's result is lane l's predicate.
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  if (mask != 0xFFFFFFFFu) throw std::runtime_error("host harness: __ballot_sync needs a full mask");
  const uint32_t in = predicate != 0 ? 1u : 0u;
  uint32_t result;
  liif_harness::BlockRunner::current_runner()->warp_instruction(
      "vote.ballot", &in, sizeof in, &result, sizeof result,
      [](const liif_harness::WarpRegisters& regs, liif_harness::WarpRegisters& out, unsigned lanes) {
    if (lanes != 32) throw std::runtime_error("host harness: __ballot_sync needs a full warp");
    uint32_t bits = 0;
    for (unsigned l = 0; l < 32; ++l) {
      uint32_t v;
      std::memcpy(&v, regs[l], 4);
      bits |= v << l;
    }
    for (unsigned l = 0; l < 32; ++l) std::memcpy(out[l], &bits, 4);
  });
  return result;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }

// ---------------------------------------------------------------------------------------------
// Warpgroup-wide, asynchronous instructions of the wgmma kernel (liif_tensor_core.cuh's names on
// the GPU; the model in the header).

namespace liif_harness {

// The offset of p in the block's shared memory, as __cvta_generic_to_shared gives a shared address.
inline uint32_t shared_address(const void* p) {
  BlockRunner* runner = BlockRunner::current_runner();
  if (!runner->in_shared_memory(p, 1)) {
    throw std::runtime_error("host harness: shared_address of a pointer outside shared memory");
  }
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - runner->shared_memory());
}

inline void fence_proxy_async() {
  BlockRunner::current_runner()->current_fiber().unfenced_async_writes = false;
}

inline void wgmma_fence() {
  const int none = 0;
  BlockRunner::current_runner()->warpgroup_instruction(
      "wgmma.fence", &none, sizeof none, [](const auto&, WarpgroupExchange&) {});
}

inline void wgmma_commit() {
  const int none = 0;
  BlockRunner::current_runner()->warpgroup_instruction(
      "wgmma.commit_group", &none, sizeof none, [](const auto&, WarpgroupExchange& w) {
    w.committed.push_back(std::move(w.open));
    w.open.clear();
  });
}

inline void wgmma_wait(int pending) {
  BlockRunner::current_runner()->warpgroup_instruction(
      "wgmma.wait_group", &pending, sizeof pending,
      [pending](const auto&, WarpgroupExchange& w) {
    while (w.committed.size() > static_cast<size_t>(pending)) {
      for (const std::function<void()>& product : w.committed.front()) product();
      w.committed.erase(w.committed.begin());
    }
  });
}

// setmaxnreg.{dec,inc}.sync.aligned: warpgroup-wide, with a count of 24 .. 256, a multiple of 8.
// Registers are not modelled: only that the whole warpgroup executes it.
inline void set_max_registers(const char* name, int count) {
  if (count < 24 || count > 256 || count % 8 != 0) {
    throw std::runtime_error(std::string("host harness: ") + name + " " + std::to_string(count) +
                             ": the count must be a multiple of 8 in 24 .. 256");
  }
  BlockRunner::current_runner()->warpgroup_instruction(name, &count, sizeof count,
                                                       [](const auto&, WarpgroupExchange&) {});
}

namespace detail {

struct WgmmaLane {
  float* d;
  const uint32_t* a_registers;  // nullptr: A in shared memory
  uint32_t a[4];
  uint64_t a_descriptor;
  uint64_t b;
};

// A shared-memory matrix descriptor without swizzling: start, leading and stride byte offsets.
struct Descriptor {
  uint32_t start, lbo, sbo;
};

inline Descriptor decode_descriptor(uint64_t desc) {
  if ((desc >> 62) != 0) throw std::runtime_error("host harness: only wgmma without swizzling is emulated");
  if (((desc >> 49) & 7) != 0) throw std::runtime_error("host harness: wgmma base offset must be 0");
  return {static_cast<uint32_t>(desc & 0x3FFF) << 4,
          static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4,
          static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4};
}

// A K-major operand of `rows` rows (M for A, N for B) and 16 k from shared memory as it is now:
// element (row, k) at start + (row % 8) 16 + (row / 8) sbo + (k % 8) 2 + (k / 8) lbo.
inline void read_k_major(BlockRunner* runner, const Descriptor& d, MmaOperands kind, int rows,
                         float (*out)[16]) {
  for (int r = 0; r < rows; ++r) {
    for (int k = 0; k < 16; ++k) {
      const uint32_t at = d.start + (r % 8) * 16 + (r / 8) * d.sbo + (k % 8) * 2 + (k / 8) * d.lbo;
      const unsigned char* p = runner->shared_memory() + at;
      if (!runner->in_shared_memory(p, 2)) {
        throw std::runtime_error("host harness: wgmma operand outside shared memory");
      }
      uint16_t bits;
      std::memcpy(&bits, p, 2);
      out[r][k] = half_bits_to_float(bits, kind);
    }
  }
}

// wgmma.mma_async m64n256k16 (f32 accumulators, 16-bit operands), A from registers (a_registers)
// or shared memory (a_descriptor), B from shared memory: d += a x b once a wait retires it.
inline void wgmma_m64n256k16(MmaOperands kind, float (&d)[128], const uint32_t* a_registers,
                             uint64_t a_descriptor, uint64_t b) {
  BlockRunner* runner = BlockRunner::current_runner();
  WgmmaLane lane{d, a_registers, {}, a_descriptor, b};
  if (a_registers != nullptr) std::memcpy(lane.a, a_registers, sizeof lane.a);
  static_assert(sizeof lane <= WarpgroupExchange::kBytes, "fits the exchange");
  runner->warpgroup_instruction(
      "wgmma.mma_async", &lane, sizeof lane,
      [runner, kind](const unsigned char (&in)[128][WarpgroupExchange::kBytes],
                     WarpgroupExchange& w) {
    if (runner->any_unfenced_async_writes()) {
      throw std::runtime_error("host harness: wgmma issued while cp.async data landed in shared "
                               "memory without fence.proxy.async");
    }
    std::vector<WgmmaLane> lanes(128);
    for (int l = 0; l < 128; ++l) std::memcpy(&lanes[l], in[l], sizeof lanes[l]);
    for (const WgmmaLane& x : lanes) {
      if (x.b != lanes[0].b || (x.a_registers == nullptr) != (lanes[0].a_registers == nullptr) ||
          (x.a_registers == nullptr && x.a_descriptor != lanes[0].a_descriptor)) {
        throw std::runtime_error("host harness: wgmma operands differ between threads");
      }
    }
    const bool a_shared = lanes[0].a_registers == nullptr;
    const Descriptor bd = decode_descriptor(lanes[0].b);
    const Descriptor ad = a_shared ? decode_descriptor(lanes[0].a_descriptor) : Descriptor{};
    w.open.push_back([runner, kind, lanes, a_shared, ad, bd] {
      // The operands as they are at retirement: B (and A if shared) from shared memory.
      static thread_local float A[64][16], B[256][16];
      read_k_major(runner, bd, kind, 256, B);
      if (a_shared) {
        read_k_major(runner, ad, kind, 64, A);
      } else {
        for (int l = 0; l < 128; ++l) {
          const WgmmaLane& x = lanes[l];
          if (std::memcmp(x.a_registers, x.a, sizeof x.a) != 0) {
            throw std::runtime_error("host harness: wgmma A registers written before the wgmma "
                                     "was waited for");
          }
        }
        // Each warp's 16 rows from its lanes' registers.
        for (int q = 0; q < 4; ++q) {
          float rows[16][16];
          for (int l = 0; l < 32; ++l) {
            unpack_a_fragment_16bit(rows, lanes[32 * q + l].a, l / 4, l % 4, kind);
          }
          std::memcpy(A[16 * q], rows, sizeof rows);
        }
      }
      // C read from the accumulators now.
      for (int l = 0; l < 128; ++l) {
        float* dl = lanes[l].d;
        const int row0 = 16 * (l / 32), g = l % 32 / 4, t = l % 4;
        for (int j = 0; j < 32; ++j) {
          for (int h = 0; h < 2; ++h) {
            for (int e = 0; e < 2; ++e) {
              const int row = row0 + g + 8 * h, col = 8 * j + 2 * t + e;
              float sum = dl[4 * j + 2 * h + e];
              for (int k = 0; k < 16; ++k) sum += A[row][k] * B[col][k];
              dl[4 * j + 2 * h + e] = sum;
            }
          }
        }
      }
    });
  });
}

}  // namespace detail

// wgmma.mma_async.sync.aligned.m64n256k16.f32.{bf16,f16} with A in registers and B (K-major, no
// swizzling) in shared memory: d += a x b once a wait retires it (layouts in liif_tensor_core.cuh).
inline void wgmma_m64n256k16(MmaOperands kind, float (&d)[128], const uint32_t (&a)[4],
                             uint64_t b) {
  detail::wgmma_m64n256k16(kind, d, a, 0, b);
}

// The same with A (K-major, no swizzling) in shared memory too.
inline void wgmma_m64n256k16_ss(MmaOperands kind, float (&d)[128], uint64_t a, uint64_t b) {
  detail::wgmma_m64n256k16(kind, d, nullptr, a, b);
}

// bar.sync / bar.arrive (the model in BlockRunner::named_barrier).
inline void named_barrier(int id, int count, bool wait) {
  BlockRunner::current_runner()->named_barrier(id, count, wait);
}

// Clusters, mbarriers and bulk copies (the model in BlockRunner's mbarrier_* and bulk_copy).
inline void mbarrier_init(const void* bar, int count) {
  BlockRunner::current_runner()->mbarrier_init(bar, count);
}
inline void mbarrier_arrive(const void* bar, unsigned block, uint32_t bytes) {
  BlockRunner::current_runner()->mbarrier_arrive(bar, block, bytes);
}
inline void mbarrier_wait(const void* bar, uint32_t parity) {
  BlockRunner::current_runner()->mbarrier_wait(bar, parity);
}
inline void bulk_copy(void* dst, const void* src, uint32_t bytes, const void* bar, unsigned mask) {
  BlockRunner::current_runner()->bulk_copy(dst, src, bytes, bar, mask);
}
inline unsigned cluster_rank() { return BlockRunner::current_runner()->block_in_cluster(); }
inline void cluster_sync() { BlockRunner::current_runner()->cluster_sync(); }

}  // namespace liif_harness
