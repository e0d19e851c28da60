// Launches the backward kernels (liif_query_backward_kernels.cuh; defined in
// liif_query_backward_kernels.cu, which keeps torch's headers out of nvcc's way).
#pragma once

#include <cuda_runtime_api.h>

#include "liif_query_backward_params.h"
#include "liif_query_cuda_launcher.h"

namespace liif {
namespace cuda {

// Runs `kernel` with at least `threads` threads on `stream` (grid-stride loops: the grid is
// capped). Defined for float and double.
template <typename T>
LaunchStatus launch_backward_kernel(BackwardKernel kernel, const BackwardChunkParams<T>& params,
                                    int64_t threads, cudaStream_t stream);

}  // namespace cuda
}  // namespace liif
