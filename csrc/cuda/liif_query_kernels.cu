// The CUDA translation unit: the query kernels (liif_query_kernel.cuh) and their launch.
#include <cuda_runtime.h>

#include <type_traits>

#include "liif_query_cuda_launcher.h"
#include "liif_query_kernel.cuh"

namespace liif {
namespace cuda {

template <typename T>
cudaError_t launch_query_kernel(const QueryKernelParams<T>& params, const LaunchPlan& plan,
                                cudaStream_t stream) {
  if (plan.blocks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(plan.blocks));
  const dim3 block(kThreadsPerBlock);
  const int shared = static_cast<int>(plan.shared_bytes);
  cudaError_t err = cudaSuccess;
  if (plan.path == KernelPath::kFast) {
    if constexpr (std::is_same_v<T, float>) {
      err = cudaFuncSetAttribute(liif_query_fast_kernel,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
      if (err != cudaSuccess) return err;
      liif_query_fast_kernel<<<grid, block, plan.shared_bytes, stream>>>(params);
    } else {
      return cudaErrorInvalidValue;  // the host never plans the float32 kernel for float64
    }
  } else if (plan.path == KernelPath::kGeneric) {
    err = cudaFuncSetAttribute(liif_query_generic_kernel<T>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
    if (err != cudaSuccess) return err;
    liif_query_generic_kernel<T><<<grid, block, plan.shared_bytes, stream>>>(params);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template cudaError_t launch_query_kernel<float>(const QueryKernelParams<float>&, const LaunchPlan&,
                                                cudaStream_t);
template cudaError_t launch_query_kernel<double>(const QueryKernelParams<double>&,
                                                 const LaunchPlan&, cudaStream_t);

}  // namespace cuda
}  // namespace liif
