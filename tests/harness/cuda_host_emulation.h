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
// Limits (what the harness does not model)
//   - no warps: no warp primitives (__shfl_*, __ballot_*, ...) and no warp-level ordering:
//     __syncwarp() does nothing (each lane's fragment store writes the whole tile, so a missing
//     __syncwarp() goes unnoticed); no divergence or occupancy effects; timing means nothing;
//   - no atomics, no __threadfence, no static __shared__ arrays, no texture or constant memory;
//   - memory is the host's: sequentially consistent, with no bounds checks of global memory (the
//     harness tests compare results; out-of-range shared-memory reads stay inside the NaN-filled
//     buffer only if they are small);
//   - floating point is the host's: no FMA contraction (built with -ffp-contract=off), so float32
//     results differ from the GPU's in the last bits of the MLP sums, never in the geometry.
#pragma once

#define LIIF_HOST_EXECUTION_HARNESS 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
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

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool finished = false;
  int64_t barriers = 0;
  std::exception_ptr error;
  // Asynchronous copies issued and not yet committed, and committed groups not yet waited for.
  std::vector<PendingCopy> open_copies;
  std::vector<std::vector<PendingCopy>> committed_copies;
};

// Shared memory of one block, aligned as the GPU aligns dynamic shared memory.
struct AlignedBuffer {
  explicit AlignedBuffer(size_t bytes)
      : size(bytes),
        data(static_cast<unsigned char*>(std::aligned_alloc(128, (bytes + 127) / 128 * 128 + 128))) {
    if (data == nullptr) throw std::bad_alloc();
  }
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  size_t size;
  unsigned char* data;
};

// Runs the blocks one OS thread is given.
class BlockRunner {
 public:
  BlockRunner(unsigned threads, size_t shared_bytes) : fibers_(threads), shared_(shared_bytes) {
    for (Fiber& f : fibers_) f.stack.resize(kStackBytes);
  }

  void run_block(const std::function<void()>& kernel, bool reverse_order) {
    kernel_ = &kernel;
    std::memset(shared_.data, 0xFF, shared_.size);
    for (Fiber& f : fibers_) {
      f.finished = false;
      f.barriers = 0;
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
      const bool reverse = reverse_order && (phase % 2 == 1);
      for (unsigned i = 0; i < n; ++i) {
        const unsigned t = reverse ? n - 1 - i : i;
        if (fibers_[t].finished) continue;
        current_ = t;
        threadIdx.x = t;
        swapcontext(&scheduler_, &fibers_[t].context);
        if (fibers_[t].error) {
          current_runner() = nullptr;
          std::rethrow_exception(fibers_[t].error);
        }
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

  unsigned char* shared_memory() { return shared_.data; }

  void sync() {
    Fiber& f = fibers_[current_];
    ++f.barriers;
    swapcontext(&f.context, &scheduler_);
  }

  Fiber& current_fiber() { return fibers_[current_]; }

  static BlockRunner*& current_runner() {
    static thread_local BlockRunner* runner = nullptr;
    return runner;
  }

 private:
  static constexpr size_t kStackBytes = 256 * 1024;

  static void fiber_main() {
    BlockRunner* self = current_runner();
    try {
      (*self->kernel_)();
    } catch (...) {
      self->fibers_[self->current_].error = std::current_exception();
    }
    self->fibers_[self->current_].finished = true;
    // Returning resumes uc_link, the scheduler.
  }

  std::vector<Fiber> fibers_;
  AlignedBuffer shared_;
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

// Warp-level ordering is not modelled (see the header).
inline void __syncwarp(unsigned = 0xFFFFFFFFu) {}

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
  liif_harness::PendingCopy copy{shared, {}};
  std::memcpy(copy.bytes, global, 16);
  liif_harness::BlockRunner::current_runner()->current_fiber().open_copies.push_back(copy);
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
    }
    f.committed_copies.erase(f.committed_copies.begin());
  }
}

}  // namespace cuda
}  // namespace liif
