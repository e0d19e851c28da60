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

}  // namespace cuda
}  // namespace liif
