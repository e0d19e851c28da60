// The CUDA kernel of liif_cuda::query_backward at the Tensor level: checks, device guard, and the
// chunked backward of liif_query_backward.h with its kernels launched on the current stream.
// Registered for the CUDA dispatch key.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "../liif_backward_needs.h"
#include "../liif_query_checks.h"
#include "liif_map_convolution.h"
#include "liif_query_backward.h"
#include "liif_query_backward_launcher.h"

namespace liif {
namespace cuda {
namespace {

std::vector<at::Tensor> query_backward_cuda(const at::Tensor& grad_out, const at::Tensor& feat,
                                            const at::Tensor& coords,
                                            const c10::optional<at::Tensor>& cells,
                                            at::TensorList weights, at::TensorList biases,
                                            bool local_ensemble, bool feat_unfold,
                                            bool cell_decode, const c10::List<bool>& needs_grad,
                                            c10::string_view precision,
                                            const c10::optional<at::Tensor>& first_layer_map) {
  const std::vector<at::Tensor> w = weights.vec(), bs = biases.vec();
  const QueryShape shape = check_query_inputs(feat, coords, cells, w, bs, feat_unfold, cell_decode);
  check_backward_inputs(grad_out, feat, shape, needs_grad.size());
  TORCH_CHECK(feat.is_cuda(), "liif_cuda.query backward (CUDA kernel): feat must be a CUDA tensor");
  const at::Tensor saved_map = saved_first_layer_map(first_layer_map, feat, shape);
  const c10::cuda::CUDAGuard device_guard(feat.device());
  // As in the forward: the products below run in the inputs' dtype, whatever autocast says.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const BackwardNeeds needs =
      backward_needs(needs_grad, static_cast<int>(w.size()), cell_decode);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // The bf16 mode on GPUs with bf16 tensor cores (compute capability 8.0 and newer), as the
  // forward's; elsewhere the exact backward.
  int major = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, feat.device().index()));
  const bool bf16 = check_backward_precision(feat, precision) && major >= 8 && w.size() > 2;
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "liif_cuda_query_backward_cuda", [&] {
    auto launch = [&](BackwardKernel kernel, const BackwardChunkParams<scalar_t>& params,
                      int64_t threads) {
      const LaunchStatus status = launch_backward_kernel(kernel, params, threads, stream);
      TORCH_CHECK(status.error == cudaSuccess, "liif_cuda.query backward (CUDA kernel): CUDA error ",
                  status.stage, ": ", cudaGetErrorString(status.error));
    };
    const int64_t chunk_rows = backward_chunk_rows(shape, feat.element_size());
    grads = query_backward_in_chunks<scalar_t>(grad_out, feat, coords, cells, w, bs, local_ensemble,
                                               feat_unfold, cell_decode, needs, shape,
                                               saved_map_or(saved_map, convolve_map), launch,
                                               chunk_rows, bf16);
  });
  return grads;
}

}  // namespace
}  // namespace cuda
}  // namespace liif

TORCH_LIBRARY_IMPL(liif_cuda, CUDA, m) {
  m.impl("query_backward", &liif::cuda::query_backward_cuda);
}
