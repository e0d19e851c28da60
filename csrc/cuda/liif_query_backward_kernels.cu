// The CUDA translation unit of the backward kernels (liif_query_backward_kernels.cuh) and their
// launch.
#include <cuda_runtime.h>

#include "liif_query_backward_kernels.cuh"
#include "liif_query_backward_launcher.h"

namespace liif {
namespace cuda {

template <typename T>
LaunchStatus launch_backward_kernel(BackwardKernel kernel, const BackwardChunkParams<T>& params,
                                    int64_t threads, cudaStream_t stream) {
  const int64_t blocks = backward_blocks(threads);
  if (blocks == 0) return {};
  // As launch_query_kernel: an error left by earlier work is named as such, not as this launch's.
  const cudaError_t pending = cudaGetLastError();
  if (pending != cudaSuccess) {
    return {pending, "before the launch (an error left by earlier CUDA work, not by liif_cuda)"};
  }
  const dim3 grid(static_cast<unsigned>(blocks)), block(kBackwardThreads);
  switch (kernel) {
    case BackwardKernel::kGeometry:
      backward_geometry_kernel<T><<<grid, block, 0, stream>>>(params);
      break;
    case BackwardKernel::kFirstLayer:
      backward_first_layer_kernel<T><<<grid, block, 0, stream>>>(params);
      break;
    case BackwardKernel::kBlend:
      backward_blend_kernel<T><<<grid, block, 0, stream>>>(params);
      break;
    case BackwardKernel::kCoordinate:
      backward_coordinate_kernel<T><<<grid, block, 0, stream>>>(params);
      break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return {err, "launching a backward kernel"};
  return {};
}

template LaunchStatus launch_backward_kernel<float>(BackwardKernel, const BackwardChunkParams<float>&,
                                                    int64_t, cudaStream_t);
template LaunchStatus launch_backward_kernel<double>(BackwardKernel,
                                                     const BackwardChunkParams<double>&, int64_t,
                                                     cudaStream_t);

}  // namespace cuda
}  // namespace liif
