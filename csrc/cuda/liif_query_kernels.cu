// The CUDA translation unit: the query kernels (liif_query_kernel.cuh, liif_query_mma_kernel.cuh,
// liif_query_wgmma_kernel.cuh, liif_query_wgmma_ws_kernel.cuh, liif_query_wgmma_mc_kernel.cuh) and
// their launch.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <tuple>

#include "liif_query_cuda_launcher.h"
#include "liif_query_planned_kernel.cuh"

namespace liif {
namespace cuda {
namespace {

// cudaOccupancyMaxActiveClusters for `config`, asked of the driver once per device, kernel and
// shared-memory size, not at every call (a small query's kernel takes microseconds).
template <typename T>
cudaError_t max_active_clusters(QueryKernel<T> kernel, const cudaLaunchConfig_t& config,
                                int* clusters) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, size_t>, int> known;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const auto key =
      std::make_tuple(device, reinterpret_cast<const void*>(kernel), config.dynamicSmemBytes);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(key);
  if (found != known.end()) {
    *clusters = found->second;
    return cudaSuccess;
  }
  err = cudaOccupancyMaxActiveClusters(clusters, kernel, &config);
  if (err == cudaSuccess) known[key] = *clusters;
  return err;
}

}  // namespace

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
  int64_t resident = 0;  // blocks the device runs at once: for the persistent kernels only
  const dim3 block(static_cast<unsigned>(plan.threads));
  // The multicast kernel's blocks come in clusters (launch_blocks makes the grid whole clusters).
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = static_cast<unsigned>(launch_cluster(plan));
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.blockDim = block;
  config.dynamicSmemBytes = plan.shared_bytes;
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  if (is_multicast(plan.path)) {
    // As many clusters as fit the device at once (as the occupancy API sees it; not other
    // processes' work under MPS): clusters that waited for others' SMs would only add a tail.
    config.gridDim = dim3(static_cast<unsigned>(launch_cluster(plan)));
    int clusters = 0;
    err = max_active_clusters<T>(kernel, config, &clusters);
    if (err != cudaSuccess) return {err, "reading how many of the kernel's clusters fit the device"};
    if (clusters < 1) {
      return {cudaErrorInvalidConfiguration, "fitting a cluster of the kernel on the device",
              /*no_cluster_fits=*/true};
    }
    resident = static_cast<int64_t>(clusters) * launch_cluster(plan);
  }
  if (plan.path == KernelPath::kWgmmaWs) {
    int device = 0, multiprocessors = 0;
    err = cudaGetDevice(&device);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
    }
    if (err != cudaSuccess) return {err, "reading the device's multiprocessor count"};
    resident = multiprocessors;
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
  const dim3 grid(static_cast<unsigned>(launch_blocks(plan, resident)));
  if (launch_cluster(plan) > 1) {
    config.gridDim = grid;
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
