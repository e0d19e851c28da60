// The CUDA translation unit: the query kernels (liif_query_kernel.cuh, liif_query_mma_kernel.cuh,
// liif_query_wgmma_kernel.cuh, liif_query_wgmma_ws_kernel.cuh, liif_query_wgmma_mc_kernel.cuh) and
// their launch.
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
  int multiprocessors = 0;  // read for the persistent kernel only (launch_blocks)
  if (plan.path == KernelPath::kWgmmaWs) {
    int device = 0;
    err = cudaGetDevice(&device);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
    }
    if (err != cudaSuccess) return {err, "reading the device's multiprocessor count"};
    // Its warpgroups trade registers (setmaxnreg) within the block's pool, sized by the count
    // ptxas gave the kernel: with fewer than it was written for, the consumers would wait
    // forever for registers the pool does not have.
    cudaFuncAttributes attributes{};
    err = cudaFuncGetAttributes(&attributes, kernel);
    if (err != cudaSuccess) return {err, "reading the kernel's attributes"};
    if (attributes.numRegs != kWgmmaWsLaunchRegisters) {
      return {cudaErrorInvalidConfiguration,
              "checking the warp-specialised wgmma kernel's registers (ptxas gave it a count "
              "other than the one its setmaxnreg balance is written for; run "
              "LIIF_CUDA_TENSOR_CORE_KERNEL=wgmma instead)"};
    }
  }
  const dim3 grid(static_cast<unsigned>(launch_blocks(plan, multiprocessors)));
  const dim3 block(static_cast<unsigned>(plan.threads));
  if (launch_cluster(plan) > 1) {
    // The multicast kernel's blocks come in clusters (launch_blocks made the grid whole clusters).
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = static_cast<unsigned>(launch_cluster(plan));
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = plan.shared_bytes;
    config.stream = stream;
    config.attrs = &cluster;
    config.numAttrs = 1;
    err = cudaLaunchKernelEx(&config, kernel, params);
    if (err != cudaSuccess) return {err, "launching the kernel in clusters"};
  } else {
    kernel<<<grid, block, plan.shared_bytes, stream>>>(params);
  }
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
