// The CUDA translation unit: the query kernels (liif_query_kernel.cuh, liif_query_mma_kernel.cuh,
// liif_query_wgmma_kernel.cuh) and their launch.
#include <cuda_runtime.h>

#include "liif_query_cuda_launcher.h"
#include "liif_query_planned_kernel.cuh"

namespace liif {
namespace cuda {

template <typename T>
LaunchStatus launch_query_kernel(const QueryKernelParams<T>& params, const LaunchPlan& plan,
                                 cudaStream_t stream) {
  if (plan.blocks == 0) return {};
  const QueryKernel<T> kernel = planned_kernel<T>(plan, params.precision);
  if (kernel == nullptr) return {cudaErrorInvalidValue, "choosing the kernel (no kernel for this plan)"};
  // cudaGetLastError() after the launch reports (and clears) the last error of this thread, which
  // may come from earlier work: read and clear it first, and name it as such.
  const cudaError_t pending = cudaGetLastError();
  if (pending != cudaSuccess) {
    return {pending, "before the launch (an error left by earlier CUDA work, not by liif_cuda)"};
  }
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(plan.shared_bytes));
  if (err != cudaSuccess) return {err, "setting the kernel's shared-memory size"};
  kernel<<<dim3(static_cast<unsigned>(plan.blocks)), dim3(static_cast<unsigned>(plan.threads)),
           plan.shared_bytes, stream>>>(params);
  err = cudaGetLastError();
  if (err != cudaSuccess) return {err, "launching the kernel"};
  return {};
}

template LaunchStatus launch_query_kernel<float>(const QueryKernelParams<float>&,
                                                 const LaunchPlan&, cudaStream_t);
template LaunchStatus launch_query_kernel<double>(const QueryKernelParams<double>&,
                                                  const LaunchPlan&, cudaStream_t);

}  // namespace cuda
}  // namespace liif
