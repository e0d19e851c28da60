// The CUDA translation unit: the query kernels (liif_query_kernel.cuh) and their launch.
#include <cuda_runtime.h>

#include "liif_query_cuda_launcher.h"
#include "liif_query_kernel.cuh"

namespace liif {
namespace cuda {

template <typename T>
cudaError_t launch_query_kernel(const QueryKernelParams<T>& params, const LaunchPlan& plan,
                                cudaStream_t stream) {
  if (plan.blocks == 0) return cudaSuccess;
  const QueryKernel<T> kernel = planned_kernel<T>(plan, params.precision);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(plan.shared_bytes));
  if (err != cudaSuccess) return err;
  kernel<<<dim3(static_cast<unsigned>(plan.blocks)), dim3(kThreadsPerBlock), plan.shared_bytes,
           stream>>>(params);
  return cudaGetLastError();
}

template cudaError_t launch_query_kernel<float>(const QueryKernelParams<float>&, const LaunchPlan&,
                                                cudaStream_t);
template cudaError_t launch_query_kernel<double>(const QueryKernelParams<double>&,
                                                 const LaunchPlan&, cudaStream_t);

}  // namespace cuda
}  // namespace liif
