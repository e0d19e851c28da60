// The first-layer map's convolution on the GPU (prepare_query's `convolve`), for the forward and the
// backward operators.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace liif {
namespace cuda {

// A large map is convolved in bands of rows, so that a convolution's output and the workspace cuDNN
// takes for it are a band's, not the whole map's (in full float32 a 1080p frame's query peaked 150
// MiB above its TF32 form, whose allocations differ only in the convolution; its map is 127 MiB).
// Maps up to kMapBandingFromBytes (a training batch's, typically) stay one convolution: bands would
// only add launches.
constexpr int64_t kMapBandingFromBytes = int64_t{64} << 20;
constexpr int64_t kMapBandBytes = int64_t{16} << 20;

// Rows per band of a (batch, channels, height, width) map of `element_size`-byte values: `height`
// (one convolution) up to kMapBandingFromBytes, else as many as kMapBandBytes hold, at least one.
inline int64_t map_band_rows(int64_t batch, int64_t channels, int64_t height, int64_t width,
                             int64_t element_size) {
  const int64_t row_bytes = std::max<int64_t>(1, batch * channels * width * element_size);
  if (row_bytes * height <= kMapBandingFromBytes) return std::max<int64_t>(1, height);
  return std::max<int64_t>(1, kMapBandBytes / row_bytes);
}

// `convolve(input, weight, padding)` (stride 1, a square kernel of 2 * padding + 1 taps) in bands
// of `band_rows` output rows, into one channels-last (B, width0, H, W) tensor. Each band convolves
// its input rows and `padding` rows of halo on either side where the image has them: its output
// rows are then exactly the whole convolution's (the zero padding stands only for rows outside the
// image), up to the summation order the backend picks for the band's size.
template <typename Convolve>
at::Tensor convolve_in_bands(const at::Tensor& input, const at::Tensor& weight, int64_t padding,
                             int64_t band_rows, Convolve&& convolve) {
  TORCH_CHECK(weight.size(2) == 2 * padding + 1 && weight.size(3) == 2 * padding + 1,
              "convolve_in_bands: a kernel of 2 * padding + 1 taps, got ", weight.sizes(),
              " with padding ", padding);
  TORCH_CHECK(band_rows >= 1, "convolve_in_bands: band_rows must be at least 1, got ", band_rows);
  const int64_t height = input.size(2);
  if (band_rows >= height) return convolve(input, weight, padding);
  at::Tensor out = at::empty({input.size(0), weight.size(0), height, input.size(3)},
                             input.options().memory_format(at::MemoryFormat::ChannelsLast));
  for (int64_t first = 0; first < height; first += band_rows) {
    const int64_t rows = std::min(band_rows, height - first);
    const int64_t halo_first = std::max<int64_t>(0, first - padding);
    const int64_t halo_end = std::min(height, first + rows + padding);
    const at::Tensor band = convolve(input.narrow(2, halo_first, halo_end - halo_first), weight,
                                     padding);
    out.narrow(2, first, rows).copy_(band.narrow(2, first - halo_first, rows));
  }
  return out;
}

// The first-layer map in full float32 (or float64) for precision "fp32": cuDNN would otherwise run
// float32 convolutions on TF32 tensor cores by default (torch.backends.cudnn.allow_tf32), a 1e-3
// error. at::_convolution takes that choice as an argument (no global state), and otherwise picks the
// backend as torch.nn.functional.conv2d does (cuDNN if enabled, splitting inputs too large for 32-bit
// indexing). The reduced precisions allow TF32 here: the map's error then stays below theirs.
// Deterministic algorithms only, so that repeated queries give identical outputs. Large maps in full
// precision in bands (map_band_rows); the TF32 convolution stays one: its workspace is small (the
// reduced precisions' 1080p query peaked at 165 MiB with a 127 MiB map and a 24 MiB output), and
// bands would only add their copies.
inline at::Tensor convolve_map(const at::Tensor& input, const at::Tensor& weight,
                               int64_t padding, bool allow_tf32) {
  // Channels-last operands make cuDNN write (B, H, W, width0) directly, the layout the kernel reads.
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w = weight.contiguous(at::MemoryFormat::ChannelsLast);
  auto convolve = [&](const at::Tensor& rows, const at::Tensor& kernel, int64_t pad) {
    return at::_convolution(rows, kernel, c10::nullopt, /*stride=*/{1, 1}, {pad, pad},
                            /*dilation=*/{1, 1}, /*transposed=*/false, /*output_padding=*/{0, 0},
                            /*groups=*/1, /*benchmark=*/false, /*deterministic=*/true,
                            /*cudnn_enabled=*/at::globalContext().userEnabledCuDNN(), allow_tf32);
  };
  const int64_t band_rows =
      allow_tf32 ? std::max<int64_t>(1, x.size(2))
                 : map_band_rows(x.size(0), w.size(0), x.size(2), x.size(3),
                                 static_cast<int64_t>(x.element_size()));
  return convolve_in_bands(x, w, padding, band_rows, convolve);
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
