// Launches the CUDA query kernels (defined in liif_query_kernels.cu, the only CUDA translation unit,
// which keeps torch's headers out of nvcc's way).
#pragma once

#include <cuda_runtime_api.h>

#include "liif_query_launch.h"

namespace liif {
namespace cuda {

// The outcome of a launch: the error code and the stage it came from, so that an error left pending
// by earlier, unrelated work is not reported as this launch's.
struct LaunchStatus {
  cudaError_t error = cudaSuccess;
  const char* stage = "";
  // Nothing was launched: none of the plan's clusters fits the device at once (plan_and_launch
  // then plans a kernel without clusters where it may).
  bool no_cluster_fits = false;
};

// Launches the kernel `plan` names on `stream` (raising its dynamic shared-memory limit first), or
// nothing where none of its clusters fits the device (no_cluster_fits).
// Defined for float and double.
template <typename T>
LaunchStatus launch_query_kernel(const QueryKernelParams<T>& params, const LaunchPlan& plan,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace liif
