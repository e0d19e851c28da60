// The two forward operators, liif_cuda::query and liif_cuda::query_saving_map, over one kernel per
// device that computes the output and, when asked, keeps the first-layer map for the backward.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace liif {

// A device's forward: (out, the first-layer map kept for the backward where `keep_map` and the
// device keeps one, else an empty tensor).
using QueryKeepingMap = std::tuple<at::Tensor, at::Tensor> (*)(
    const at::Tensor& feat, const at::Tensor& coords, const c10::optional<at::Tensor>& cells,
    at::TensorList weights, at::TensorList biases, bool local_ensemble, bool feat_unfold,
    bool cell_decode, c10::string_view precision, c10::string_view backward_precision,
    bool keep_map);

template <QueryKeepingMap forward>
at::Tensor query_entry(const at::Tensor& feat, const at::Tensor& coords,
                       const c10::optional<at::Tensor>& cells, at::TensorList weights,
                       at::TensorList biases, bool local_ensemble, bool feat_unfold,
                       bool cell_decode, c10::string_view precision,
                       c10::string_view backward_precision) {
  return std::get<0>(forward(feat, coords, cells, weights, biases, local_ensemble, feat_unfold,
                             cell_decode, precision, backward_precision, /*keep_map=*/false));
}

template <QueryKeepingMap forward>
std::tuple<at::Tensor, at::Tensor> query_saving_map_entry(
    const at::Tensor& feat, const at::Tensor& coords, const c10::optional<at::Tensor>& cells,
    at::TensorList weights, at::TensorList biases, bool local_ensemble, bool feat_unfold,
    bool cell_decode, c10::string_view precision, c10::string_view backward_precision) {
  return forward(feat, coords, cells, weights, biases, local_ensemble, feat_unfold, cell_decode,
                 precision, backward_precision, /*keep_map=*/true);
}

}  // namespace liif
