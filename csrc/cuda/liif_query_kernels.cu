// The CUDA translation unit: the query kernels (liif_query_kernel.cuh) and their launch.
#include <cuda_runtime.h>

#include <type_traits>

#include "liif_query_cuda_launcher.h"
#include "liif_query_kernel.cuh"

namespace liif {
namespace cuda {

namespace {

template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, const Params& params, const LaunchPlan& plan, cudaStream_t stream) {
  const int shared = static_cast<int>(plan.shared_bytes);
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(static_cast<unsigned>(plan.blocks)), dim3(kThreadsPerBlock), plan.shared_bytes,
           stream>>>(params);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_query_kernel(const QueryKernelParams<T>& params, const LaunchPlan& plan,
                                cudaStream_t stream) {
  if (plan.blocks == 0) return cudaSuccess;
  if (plan.path == KernelPath::kGeneric) {
    return launch(liif_query_generic_kernel<T>, params, plan, stream);
  }
  // The other kernels are float32 only; the host never plans them for float64.
  if constexpr (std::is_same_v<T, float>) {
    if (plan.path == KernelPath::kFast) return launch(liif_query_fast_kernel, params, plan, stream);
    if (plan.path == KernelPath::kTensorCore) {
      switch (params.precision) {
        case Precision::kTf32:
          return launch(liif_query_tensor_core_kernel<Precision::kTf32>, params, plan, stream);
        case Precision::kBf16:
          return launch(liif_query_tensor_core_kernel<Precision::kBf16>, params, plan, stream);
        case Precision::kFp16:
          return launch(liif_query_tensor_core_kernel<Precision::kFp16>, params, plan, stream);
        case Precision::kFp32:
          break;
      }
    }
  }
  return cudaErrorInvalidValue;
}

template cudaError_t launch_query_kernel<float>(const QueryKernelParams<float>&, const LaunchPlan&,
                                                cudaStream_t);
template cudaError_t launch_query_kernel<double>(const QueryKernelParams<double>&,
                                                 const LaunchPlan&, cudaStream_t);

}  // namespace cuda
}  // namespace liif
