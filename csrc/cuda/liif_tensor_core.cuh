// What the tensor-core query kernel needs beyond plain CUDA C++: the operand type of each reduced
// precision (storage, conversion from and to float, WMMA fragment shape), asynchronous copies from
// global to shared memory (cp.async, sm_80+), and the mma.sync kernel's ldmatrix and mma.sync.
//
// Under nvcc these map to cuda_fp16.h / cuda_bf16.h, nvcuda::wmma (mma.h) and inline PTX. In the host
// execution harness (tests/harness/cuda_host_emulation.h) the same names are emulated: the operand
// types and their round-to-nearest conversions bit for bit, the WMMA fragment operations as whole
// 16x16 tiles, the asynchronous copies as copies that land only when the thread waits for them, and
// ldmatrix / mma.sync as warp-wide operations on each lane's own fragment registers.
#pragma once

#include "liif_query_launch.h"

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

// WMMA for bf16 and tf32, and cp.async, exist from sm_80 on. Device code for older targets (only if
// TORCH_CUDA_ARCH_LIST asks for them) compiles the tensor-core kernel as a trap; the host never plans
// it there (compute capability < 8.0, see liif_query_cuda.cpp).
#if defined(LIIF_HOST_EXECUTION_HARNESS) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define LIIF_TENSOR_CORES 1
#endif
// wgmma (warpgroup MMA) exists only in sm_90a code (TORCH_CUDA_ARCH_LIST "9.0a"): the wgmma kernel
// is compiled there (and by the host pass and the harness), a trap elsewhere; the host plans it only
// where the build says the sm_90a code is what a compute capability 9.0 device runs
// (LIIF_WGMMA_BUILT, liif_query_cuda.cpp).
#if defined(LIIF_HOST_EXECUTION_HARNESS) || !defined(__CUDA_ARCH__) || \
    (__CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define LIIF_WGMMA 1
#endif

namespace liif {
namespace cuda {

#if defined(LIIF_TENSOR_CORES)

template <Precision P>
struct Operand;

template <>
struct Operand<Precision::kFp16> {
  using storage = __half;
  using fragment_type = __half;
  static constexpr int k = 16;  // WMMA shape m16n16k16
  static __device__ __forceinline__ storage store(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float load(storage v) { return __half2float(v); }
};

template <>
struct Operand<Precision::kBf16> {
  using storage = __nv_bfloat16;
  using fragment_type = __nv_bfloat16;
  static constexpr int k = 16;
  static __device__ __forceinline__ storage store(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float load(storage v) { return __bfloat162float(v); }
};

// TF32 operands are floats whose low 13 mantissa bits are zero: rounded once when stored (the same
// rounding as cvt.rna.tf32.f32; the weights are rounded so on the host), so that the fragments need
// no conversion after loading.
template <>
struct Operand<Precision::kTf32> {
  using storage = float;
  using fragment_type = nvcuda::wmma::precision::tf32;
  static constexpr int k = 8;  // WMMA shape m16n16k8
  static __device__ __forceinline__ storage store(float v) { return nvcuda::wmma::__float_to_tf32(v); }
  static __device__ __forceinline__ float load(storage v) { return v; }
};

#if defined(__CUDACC__)
// 16 bytes from global to shared memory without passing through registers; .cg skips L1, the
// weights are read once per block from L2.
__device__ __forceinline__ void async_copy_16(void* shared, const void* global) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(global));
}
// Closes the group of copies issued since the last commit.
__device__ __forceinline__ void async_copy_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `Pending` committed groups of this thread are still in flight. The copies
// of other threads become visible only after a barrier.
template <int Pending>
__device__ __forceinline__ void async_copy_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

// The mma.sync kernel's two warp-wide instructions (PTX ISA, "Warp-level matrix instructions").
//
// ldmatrix .x4: four 8 x 8 matrices of 16-bit elements (8 rows of 16 bytes each; for tf32, 8 rows of
// 4 floats), lane l giving the shared-memory address of row l % 8 of matrix l / 8 and receiving in
// r[j] the 4 bytes at row l / 4, bytes 4 * (l % 4) .. +3, of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* shared_row) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// d += a * b on one m16n8 tile, float32 accumulation; a row-major (m16 x k), b column-major
// (k x n8), k = 16 for fp16 / bf16 (two operands per register), 8 for tf32. With g = lane / 4 and
// t = lane % 4: d[0], d[1] at (row g, columns 2t, 2t+1), d[2], d[3] at row g + 8. For 16-bit
// operands a[0] holds (g, 2t..2t+1), a[1] (g+8, 2t..), a[2] (g, 2t+8..), a[3] (g+8, 2t+8..), b[0]
// (k 2t..2t+1, n g), b[1] (k 2t+8.., n g); for tf32 a[0] (g, t), a[1] (g+8, t), a[2] (g, t+4),
// a[3] (g+8, t+4), b[0] (k t, n g), b[1] (k t+4, n g). The lower-indexed element of a pair is in
// the low 16 bits.
template <Precision P>
__device__ __forceinline__ void mma_16x8(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  static_assert(P != Precision::kFp32, "mma_16x8 multiplies reduced-precision operands");
  if constexpr (P == Precision::kBf16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else if constexpr (P == Precision::kFp16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
#else
// The host execution harness: the same operations, warp-wide, in cuda_host_emulation.h.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* shared_row) {
  liif_harness::ldmatrix_x4(r, shared_row);
}
template <Precision P>
inline void mma_16x8(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(P != Precision::kFp32, "mma_16x8 multiplies reduced-precision operands");
  constexpr liif_harness::MmaOperands kind =
      P == Precision::kBf16   ? liif_harness::MmaOperands::kBf16
      : P == Precision::kFp16 ? liif_harness::MmaOperands::kFp16
                              : liif_harness::MmaOperands::kTf32;
  liif_harness::mma_16x8(kind, d, a, b0, b1);
}
#endif

#endif  // LIIF_TENSOR_CORES

#if defined(LIIF_WGMMA)
// The wgmma kernel's instructions (PTX ISA, "Asynchronous warpgroup level matrix multiply-accumulate
// instructions"), issued by the 128 threads of a warpgroup (4 consecutive warps, the first one's
// index a multiple of 4); warp q of the warpgroup owns rows 16 q .. +15 of the 64-row tile.
//
// wgmma_m64n256k16<P>(d, a, b): d (64 x 256, float32) += a (64 x 16, registers) x b (16 x 256,
// shared memory). With g = lane / 4 and t = lane % 4 of warp q: d[4 j + 2 h + e] is element
// (row 16 q + g + 8 h, column 8 j + 2 t + e), the m16n8 accumulator layout of mma.sync repeated
// for the 32 n8 column blocks; a[0..3] as mma.sync's 16-bit A fragment: (g, k 2t..2t+1),
// (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..), the lower-indexed element in the low 16 bits. So the
// accumulators of columns 16 s .. 16 s + 15 are, rounded and paired, the A fragment of the next
// layer's k-step s: a[r] = (d[8 s + 2 r], d[8 s + 2 r + 1]).
//
// b is a shared-memory matrix descriptor (wgmma_descriptor) of the K-major operand (element (k, n)
// of b is the weight of input k for output n) in the canonical layout without swizzling: core
// matrices of 8 n-rows of 16 bytes (8 k), each 128 contiguous bytes; the two core matrices along k
// `lbo` bytes apart, consecutive groups of 8 n-rows `sbo` bytes apart. Element (k, n) is at byte
// start + (n % 8) 16 + (n / 8) sbo + (k % 8) 2 + (k / 8) lbo.
//
// Asynchronous: the product runs after the instruction returns. wgmma_fence() must precede the
// first wgmma after the registers it uses were written; wgmma_commit() closes the group of wgmmas
// issued since the last commit; wgmma_wait<N>() returns once at most N groups are in flight. Until
// then the accumulators must not be read or written, the A registers not written, the shared
// memory of b not overwritten. Shared memory written by ordinary stores or cp.async needs
// fence_proxy_async() in each writing thread (then a barrier) before a wgmma reads it.
__host__ __device__ constexpr uint64_t wgmma_descriptor(uint32_t shared_address, uint32_t lbo,
                                                        uint32_t sbo) {
  return (static_cast<uint64_t>((shared_address >> 4) & 0x3FFF)) |
         (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32);  // bits 62-63: 0, no swizzle
}

#if defined(__CUDACC__)
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int Pending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving reads or writes of v across this point (the asm statements of
// wgmma do not tell it when the hardware is done with their registers).
__device__ __forceinline__ void fence_register(float& v) { asm volatile("" : "+f"(v)::"memory"); }
__device__ __forceinline__ void fence_register(uint32_t& v) {
  asm volatile("" : "+r"(v)::"memory");
}

#define LIIF_WGMMA_D8(i)                                                                 \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
// The 128 accumulators of m64n256k16: their operands in the instruction, and their constraints.
#define LIIF_WGMMA_D_OPERANDS                                                                    \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                        \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "              \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "              \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "              \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "              \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "              \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, "        \
  "%111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, "     \
  "%126, %127"
#define LIIF_WGMMA_D128                                                                          \
  LIIF_WGMMA_D8(0), LIIF_WGMMA_D8(8), LIIF_WGMMA_D8(16), LIIF_WGMMA_D8(24), LIIF_WGMMA_D8(32),     \
      LIIF_WGMMA_D8(40), LIIF_WGMMA_D8(48), LIIF_WGMMA_D8(56), LIIF_WGMMA_D8(64),                 \
      LIIF_WGMMA_D8(72), LIIF_WGMMA_D8(80), LIIF_WGMMA_D8(88), LIIF_WGMMA_D8(96),                 \
      LIIF_WGMMA_D8(104), LIIF_WGMMA_D8(112), LIIF_WGMMA_D8(120)
#define LIIF_WGMMA_M64N256K16(type)                                                              \
  asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %132, 0;\n"                                            \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." type "." type " {"                          \
      LIIF_WGMMA_D_OPERANDS                                                                      \
      "}, {%128, %129, %130, %131}, %133, p, 1, 1, 0;\n}\n"                                      \
      : LIIF_WGMMA_D128                                                                          \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(1), "l"(b))

// d += a x b, as above; the trailing immediates: A and B not negated, B not transposed (K-major).
template <Precision P>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], const uint32_t (&a)[4],
                                                 uint64_t b) {
  static_assert(P == Precision::kBf16 || P == Precision::kFp16, "16-bit operands");
  if constexpr (P == Precision::kBf16) {
    LIIF_WGMMA_M64N256K16("bf16");
  } else {
    LIIF_WGMMA_M64N256K16("f16");
  }
}

#define LIIF_WGMMA_M64N256K16_SS(type)                                                           \
  asm volatile(                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                            \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." type "." type " {"                          \
      LIIF_WGMMA_D_OPERANDS                                                                      \
      "}, %128, %129, p, 1, 1, 0, 0;\n}\n"                                                       \
      : LIIF_WGMMA_D128                                                                          \
      : "l"(a), "l"(b), "r"(1))

// d += a x b with both operands in shared memory: a (64 x 16) by its descriptor, K-major in the
// same canonical layout as b (core matrices of 8 rows of 16 bytes; element (m, k) at byte start +
// (m % 8) 16 + (m / 8) sbo + (k % 8) 2 + (k / 8) lbo), neither transposed.
template <Precision P>
__device__ __forceinline__ void wgmma_m64n256k16_ss(float (&d)[128], uint64_t a, uint64_t b) {
  static_assert(P == Precision::kBf16 || P == Precision::kFp16, "16-bit operands");
  if constexpr (P == Precision::kBf16) {
    LIIF_WGMMA_M64N256K16_SS("bf16");
  } else {
    LIIF_WGMMA_M64N256K16_SS("f16");
  }
}
#undef LIIF_WGMMA_M64N256K16_SS
#undef LIIF_WGMMA_M64N256K16
#undef LIIF_WGMMA_D128
#undef LIIF_WGMMA_D_OPERANDS
#undef LIIF_WGMMA_D8

// Named barriers (PTX bar.sync / bar.arrive, ids 1 .. 15; 0 is __syncthreads()'s): `count` threads
// (a multiple of 32, whole warps) take part. sync waits until `count` threads have arrived (by sync
// or arrive), arrive only signals; both order this thread's earlier memory accesses before the
// barrier's completion for the threads that wait at it (a producer's stores, then arrive; the
// consumers' sync, then loads).
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// setmaxnreg (sm_90a): the calling warpgroup's registers per thread lowered to (release_registers)
// or raised to (claim_registers) Count, from and into the block's pool; executed by all 128
// threads of the warpgroup. A block launched with R registers per thread may give one warpgroup
// more where another gives up as many.
template <int Count>
__device__ __forceinline__ void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Count));
}
template <int Count>
__device__ __forceinline__ void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Count));
}

// Clusters, mbarriers and bulk copies (sm_90; the multicast weight stream of the wgmma_mc kernel).
// An mbarrier is 8 bytes of shared memory that counts arrivals and transaction bytes; a phase
// completes when `count` threads have arrived and every byte announced by expect_tx has landed;
// try_wait.parity(p) returns once the phase of parity p has completed (starting at phase 0, so a
// wait for parity 1 returns at once). cp.async.bulk copies contiguous bytes from global memory into
// shared memory by the TMA unit, completing its transaction bytes on an mbarrier; with .multicast
// into the same offset of several blocks of the cluster, each counting on its own mbarrier at the
// same offset. The cluster's blocks reach each other's shared memory by mapa.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(count)
               : "memory");
}
// Makes the initialisations visible to the cluster (then cluster_sync before anyone uses them).
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// An arrival on this block's mbarrier at `bar` that first announces `bytes` of transactions.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                   shared_address(bar)),
               "r"(bytes)
               : "memory");
}
// An arrival on the mbarrier at `bar`'s offset in block `block` of the cluster (this block's own
// included). A release at CTA scope, as CUTLASS's ClusterBarrier::arrive: what it orders here is
// the retirement of this warp's wgmmas (which read a ring slot through the async proxy) before the
// peer's next bulk copy into the slot; the cluster-scoped release compiles to a MEMBAR.ALL.GPU
// before each arrival.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar, uint32_t block) {
  asm volatile(
      "{\n.reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(
          shared_address(bar)),
      "r"(block)
      : "memory");
}
// Returns once the phase of parity `parity` of this block's mbarrier at `bar` has completed (an
// acquire at CTA scope, as CUTLASS's waits; the cluster-scoped one invalidates L1 after each).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t address = shared_address(bar);
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.b32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(address), "r"(parity)
        : "memory");
  } while (done == 0);
}
// `bytes` (a multiple of 16) from global `src` to `dst` in this block's shared memory and the same
// offset of every block of the cluster in `mask`, each completing them on its mbarrier at `bar`'s
// offset.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar, uint32_t mask) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
      "[%0], [%1], %2, [%3], %4;\n" ::"r"(shared_address(dst)),
      "l"(src), "r"(bytes), "r"(shared_address(bar)), "h"(static_cast<uint16_t>(mask))
      : "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}
// Every thread of every block of the cluster (barrier.cluster, release and acquire).
__device__ __forceinline__ void cluster_sync() {
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
#else
// The host execution harness: warpgroup-wide and asynchronous, in cuda_host_emulation.h.
inline uint32_t shared_address(const void* p) { return liif_harness::shared_address(p); }
inline void wgmma_fence() { liif_harness::wgmma_fence(); }
inline void wgmma_commit() { liif_harness::wgmma_commit(); }
template <int Pending>
inline void wgmma_wait() {
  liif_harness::wgmma_wait(Pending);
}
inline void fence_proxy_async() { liif_harness::fence_proxy_async(); }
inline void fence_register(float&) {}
inline void fence_register(uint32_t&) {}
template <Precision P>
inline void wgmma_m64n256k16(float (&d)[128], const uint32_t (&a)[4], uint64_t b) {
  static_assert(P == Precision::kBf16 || P == Precision::kFp16, "16-bit operands");
  liif_harness::wgmma_m64n256k16(
      P == Precision::kBf16 ? liif_harness::MmaOperands::kBf16 : liif_harness::MmaOperands::kFp16,
      d, a, b);
}
template <Precision P>
inline void wgmma_m64n256k16_ss(float (&d)[128], uint64_t a, uint64_t b) {
  static_assert(P == Precision::kBf16 || P == Precision::kFp16, "16-bit operands");
  liif_harness::wgmma_m64n256k16_ss(
      P == Precision::kBf16 ? liif_harness::MmaOperands::kBf16 : liif_harness::MmaOperands::kFp16,
      d, a, b);
}
template <int Count>
inline void release_registers() {
  liif_harness::set_max_registers("setmaxnreg.dec", Count);
}
template <int Count>
inline void claim_registers() {
  liif_harness::set_max_registers("setmaxnreg.inc", Count);
}
inline void named_barrier_sync(int id, int count) { liif_harness::named_barrier(id, count, true); }
inline void named_barrier_arrive(int id, int count) {
  liif_harness::named_barrier(id, count, false);
}
inline void mbarrier_init(uint64_t* bar, int count) { liif_harness::mbarrier_init(bar, count); }
inline void fence_mbarrier_init() {}
inline void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  liif_harness::mbarrier_arrive(bar, liif_harness::cluster_rank(), bytes);
}
inline void mbarrier_arrive(uint64_t* bar, uint32_t block) {
  liif_harness::mbarrier_arrive(bar, block, 0);
}
inline void mbarrier_wait(uint64_t* bar, uint32_t parity) { liif_harness::mbarrier_wait(bar, parity); }
inline void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar, uint32_t mask) {
  liif_harness::bulk_copy(dst, src, bytes, bar, mask);
}
inline uint32_t cluster_rank() { return liif_harness::cluster_rank(); }
inline void cluster_sync() { liif_harness::cluster_sync(); }
#endif
#endif  // LIIF_WGMMA

}  // namespace cuda
}  // namespace liif
