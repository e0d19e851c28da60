// What the tensor-core query kernel needs beyond plain CUDA C++: the operand type of each reduced
// precision (storage, conversion from and to float, WMMA fragment shape) and asynchronous copies from
// global to shared memory (cp.async, sm_80+).
//
// Under nvcc these map to cuda_fp16.h / cuda_bf16.h, nvcuda::wmma (mma.h) and inline PTX. In the host
// execution harness (tests/harness/cuda_host_emulation.h) the same names are emulated: the operand
// types and their round-to-nearest conversions bit for bit, the WMMA fragment operations as whole
// 16x16 tiles, the asynchronous copies as copies that land only when the thread waits for them.
#pragma once

#include "liif_query_launch.h"

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
#endif

#endif  // LIIF_TENSOR_CORES

}  // namespace cuda
}  // namespace liif
