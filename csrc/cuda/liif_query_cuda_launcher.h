// Launches the CUDA query kernels (defined in liif_query_kernels.cu, the only CUDA translation unit,
// which keeps torch's headers out of nvcc's way).
#pragma once

#include <cuda_runtime_api.h>

#include "liif_query_launch.h"

namespace liif {
namespace cuda {

// Launches the kernel `plan` names on `stream` (raising its dynamic shared-memory limit first) and
// returns the launch's error code. Defined for float and double.
template <typename T>
cudaError_t launch_query_kernel(const QueryKernelParams<T>& params, const LaunchPlan& plan,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace liif
