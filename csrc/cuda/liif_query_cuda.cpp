// The CUDA kernel of liif_cuda::query at the Tensor level: checks, device guard, the first-layer map
// by cuDNN (liif_map_convolution.h), the launch on the current stream and its error check.
// Registered for the CUDA dispatch key. The kernels themselves are in liif_query_kernel.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cstdlib>

#include "../liif_query_checks.h"
#include "liif_build_config.h"  // LIIF_WGMMA_BUILT, written by setup.py
#include "../liif_query_entry_points.h"
#include "liif_map_convolution.h"
#include "liif_query_cuda_launcher.h"
#include "liif_query_prepare.h"

namespace liif {
namespace cuda {
namespace {

// LIIF_CUDA_TENSOR_CORE_KERNEL: which tensor-core kernel runs the reduced precisions, "auto" (the
// default, unset or empty too: the multicast wgmma kernel on H100 / H200 with an sm_90a build for
// bf16 and fp16, where its clusters fit the device, else the wgmma kernel, plan_and_launch; else
// mma.sync with 16 warps; plan_launch says why), "mma" (mma.sync with 8 warps per block), "mma16"
// (its 16-warp form), "wmma" (the kernel mma.sync replaced), "wgmma", "wgmma_ws", "wgmma_mc" or
// "wgmma_pp" (the wgmma kernel, its warp-specialised form, its form with multicast weights or that
// form's ping-pong schedule: bf16 and fp16 on H100 / H200 with an sm_90a build).
// Read at every call, so that a benchmark can compare them in one process.
TensorCoreKernel preferred_tensor_core_kernel() {
  const char* value = std::getenv("LIIF_CUDA_TENSOR_CORE_KERNEL");
  TensorCoreKernel kernel = TensorCoreKernel::kAuto;
  TORCH_CHECK(tensor_core_kernel_named(value, &kernel),
              "liif_cuda.query: LIIF_CUDA_TENSOR_CORE_KERNEL must be auto, mma, mma16, wmma, "
              "wgmma, wgmma_ws, wgmma_mc or wgmma_pp, got '", value, "'");
  return kernel;
}

// Whether a device of compute capability major.minor runs this build's wgmma kernel: sm_90a code
// runs on 9.0 only, and the build has it only without plain sm_90 code beside it (setup.py).
bool runs_wgmma(int major, int minor) {
#ifdef LIIF_WGMMA_BUILT
  return major == 9 && minor == 0;
#else
  (void)major;
  (void)minor;
  return false;
#endif
}

// query, and query_saving_map when `keep_map`: (out, the first-layer map for the backward where it
// is the exact one, precision "fp32", and pays off; else an empty tensor).
std::tuple<at::Tensor, at::Tensor> query_cuda_keeping_map(
    const at::Tensor& feat, const at::Tensor& coords, const c10::optional<at::Tensor>& cells,
    at::TensorList weights, at::TensorList biases, bool local_ensemble, bool feat_unfold,
    bool cell_decode, c10::string_view precision, c10::string_view backward_precision,
    bool keep_map) {
  const std::vector<at::Tensor> w = weights.vec(), bs = biases.vec();
  const QueryShape shape = check_query_inputs(feat, coords, cells, w, bs, feat_unfold, cell_decode);
  const Precision arithmetic = parse_precision(feat, precision);
  check_backward_precision(feat, backward_precision);  // used by autograd only
  TORCH_CHECK(feat.is_cuda(), "liif_cuda.query (CUDA kernel): feat must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(feat.device());
  // The operator has no autocast kernel: inside torch.autocast the dispatcher falls through to this
  // one with autocast still on, and the convolution below would come back in the autocast dtype.
  // The precision is the operator's own argument (liif_cuda.query maps autocast onto it).
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::Tensor saved_map = feat.new_empty({0});
  if (shape.batch * shape.queries * shape.out_dim == 0) {
    return {at::empty({shape.batch, shape.queries, shape.out_dim}, feat.options()), saved_map};
  }
  int max_shared = 0, major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        feat.device().index()));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, feat.device().index()));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, feat.device().index()));
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "liif_cuda_query_cuda", [&] {
    PreparedQuery<scalar_t> prepared =
        prepare_query<scalar_t>(feat, coords, cells, w, bs, local_ensemble, feat_unfold,
                                cell_decode, arithmetic, shape, convolve_map);
    auto launch = [&](const LaunchPlan& plan) {
      const LaunchStatus status = launch_query_kernel(
          prepared.params, plan, c10::cuda::getCurrentCUDAStream().stream());
      if (status.no_cluster_fits) return false;
      TORCH_CHECK(status.error == cudaSuccess, "liif_cuda.query (CUDA kernel): CUDA error ",
                  status.stage, ": ", cudaGetErrorString(status.error));
      return true;
    };
    const LaunchPlan plan =
        plan_and_launch(prepared, static_cast<size_t>(max_shared),
                        /*has_tensor_cores=*/major >= 8, preferred_tensor_core_kernel(),
                        runs_wgmma(major, minor), launch);
    print_phase_clocks(prepared.phase_clocks, plan);
    // The temporaries go back to the caching allocator, which keeps them for this stream until
    // the kernel is done with them.
    out = prepared.out;
    if (keep_map && arithmetic == Precision::kFp32 &&
        first_layer_map_pays_off(shape, local_ensemble)) {
      saved_map = prepared.map;
    }
  });
  return {out, saved_map};
}

}  // namespace
}  // namespace cuda
}  // namespace liif

TORCH_LIBRARY_IMPL(liif_cuda, CUDA, m) {
  m.impl("query", &liif::query_entry<&liif::cuda::query_cuda_keeping_map>);
  m.impl("query_saving_map", &liif::query_saving_map_entry<&liif::cuda::query_cuda_keeping_map>);
}
