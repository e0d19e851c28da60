// The first-layer map's convolution on the GPU (prepare_query's `convolve`), for the forward and the
// backward operators.
#pragma once

#include <ATen/ATen.h>

namespace liif {
namespace cuda {

// The first-layer map in full float32 (or float64) for precision "fp32": cuDNN would otherwise run
// float32 convolutions on TF32 tensor cores by default (torch.backends.cudnn.allow_tf32), a 1e-3
// error. at::_convolution takes that choice as an argument (no global state), and otherwise picks the
// backend as torch.nn.functional.conv2d does (cuDNN if enabled, splitting inputs too large for 32-bit
// indexing). The reduced precisions allow TF32 here: the map's error then stays below theirs.
// Deterministic algorithms only, so that repeated queries give identical outputs.
inline at::Tensor convolve_map(const at::Tensor& input, const at::Tensor& weight,
                               int64_t padding, bool allow_tf32) {
  // Channels-last operands make cuDNN write (B, H, W, width0) directly, the layout the kernel reads.
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w = weight.contiguous(at::MemoryFormat::ChannelsLast);
  return at::_convolution(x, w, c10::nullopt, /*stride=*/{1, 1}, {padding, padding},
                          /*dilation=*/{1, 1}, /*transposed=*/false, /*output_padding=*/{0, 0},
                          /*groups=*/1, /*benchmark=*/false, /*deterministic=*/true,
                          /*cudnn_enabled=*/at::globalContext().userEnabledCuDNN(),
                          allow_tf32);
}

// query_backward_in_chunks' `convolve`: the map the forward saved (query_saving_map's (B, H, W,
// width0), as the (B, width0, H, W) view that prepare_query permutes back without a copy), or where
// there is none (undefined), `convolve`'s.
template <typename Convolve>
auto saved_map_or(const at::Tensor& saved, Convolve convolve) {
  return [saved, convolve](const at::Tensor& input, const at::Tensor& weight, int64_t padding,
                           bool allow_tf32) -> at::Tensor {
    if (saved.defined()) return saved.permute({0, 3, 1, 2});
    return convolve(input, weight, padding, allow_tf32);
  };
}

}  // namespace cuda
}  // namespace liif
