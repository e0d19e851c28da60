// Argument checks of liif_cuda::query shared by the CPU and CUDA kernels.
//
// The Python wrapper (liif_cuda/_validation.py) checks the same conditions first and raises ValueError
// with the same wording; these checks are the safety net for direct calls of torch.ops.liif_cuda.query,
// so that no input can make a kernel read out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <iterator>
#include <string>
#include <vector>

namespace liif {

// liif_cuda.query's `precision`: the arithmetic the MLP's hidden layers may use ("fp32" exact;
// "tf32", "bf16", "fp16" on CUDA tensor cores, see csrc/cuda). The CPU kernel computes float32 for
// all four. Reduced precisions apply to float32 tensors (the Python wrapper converts float16 and
// bfloat16 inputs); float64 is always computed in float64. Returns the precision's index in
// kPrecisionNames (the values of liif::cuda::Precision).
inline constexpr const char* kPrecisionNames[] = {"fp32", "tf32", "bf16", "fp16"};
inline constexpr int kPrecisionBf16 = 2;

inline int check_precision(const at::Tensor& feat, c10::string_view precision) {
  constexpr int count = static_cast<int>(std::size(kPrecisionNames));
  int index = 0;
  while (index < count && precision != kPrecisionNames[index]) ++index;
  TORCH_CHECK(index < count,
              "liif_cuda.query: precision must be one of 'fp32', 'tf32', 'bf16', 'fp16', got '",
              std::string(precision), "'");
  TORCH_CHECK(index == 0 || feat.scalar_type() == at::kFloat, "liif_cuda.query: precision '",
              std::string(precision), "' needs float32 tensors, got ", feat.scalar_type());
  return index;
}

// liif_cuda.query's `backward_precision` (and query_backward's `precision`): "fp32", the exact
// function's gradients, or "bf16", the products between hidden layers with bf16 operands (float32
// tensors only). Returns whether it is "bf16".
inline bool check_backward_precision(const at::Tensor& feat, c10::string_view precision) {
  TORCH_CHECK(precision == "fp32" || precision == "bf16",
              "liif_cuda.query: backward_precision must be 'fp32' or 'bf16', got '",
              std::string(precision), "'");
  TORCH_CHECK(precision == "fp32" || feat.scalar_type() == at::kFloat,
              "liif_cuda.query: backward_precision 'bf16' needs float32 tensors, got ",
              feat.scalar_type());
  return precision == "bf16";
}

struct QueryShape {
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t height = 0;
  int64_t width = 0;
  int64_t queries = 0;
  int64_t feat_dim = 0;  // width of the feature part of the MLP input: 9C with feat_unfold, else C
  int64_t in_dim = 0;    // feat_dim + 2 (+ 2 with cell_decode)
  int64_t out_dim = 0;
  std::vector<int64_t> layer_widths;  // output width of every Linear layer, the last one is out_dim
};

inline QueryShape check_query_inputs(const at::Tensor& feat, const at::Tensor& coords,
                                     const c10::optional<at::Tensor>& cells,
                                     const std::vector<at::Tensor>& weights,
                                     const std::vector<at::Tensor>& biases, bool feat_unfold,
                                     bool cell_decode) {
  TORCH_CHECK(feat.dim() == 4, "liif_cuda.query: feat must be (B, C, H, W), got ", feat.dim(),
              " dimensions");
  TORCH_CHECK(feat.scalar_type() == at::kFloat || feat.scalar_type() == at::kDouble,
              "liif_cuda.query: feat must be float32 or float64, got ", feat.scalar_type());
  QueryShape s;
  s.batch = feat.size(0);
  s.channels = feat.size(1);
  s.height = feat.size(2);
  s.width = feat.size(3);
  TORCH_CHECK(s.channels > 0 && s.height > 0 && s.width > 0,
              "liif_cuda.query: feat must have C, H, W >= 1, got ", feat.sizes());

  auto check_same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == feat.scalar_type(), "liif_cuda.query: ", name,
                " must have feat's dtype ", feat.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == feat.device(), "liif_cuda.query: ", name,
                " must be on feat's device ", feat.device(), ", got ", t.device());
  };
  auto check_points = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 3 && t.size(2) == 2, "liif_cuda.query: ", name,
                " must be (B, Q, 2), got ", t.sizes());
    TORCH_CHECK(t.size(0) == s.batch, "liif_cuda.query: ", name, " has batch size ", t.size(0),
                " but feat has ", s.batch);
    check_same(t, name);
  };
  check_points(coords, "coords");
  s.queries = coords.size(1);
  if (cell_decode) {
    TORCH_CHECK(cells.has_value(), "liif_cuda.query: cells is required when cell_decode=True");
    check_points(*cells, "cells");
    TORCH_CHECK(cells->size(1) == s.queries, "liif_cuda.query: cells has ", cells->size(1),
                " queries but coords has ", s.queries);
  }

  TORCH_CHECK(!weights.empty(), "liif_cuda.query: the MLP needs at least one Linear layer");
  TORCH_CHECK(weights.size() == biases.size(), "liif_cuda.query: got ", weights.size(),
              " weights but ", biases.size(), " biases");
  s.feat_dim = s.channels * (feat_unfold ? 9 : 1);
  s.in_dim = s.feat_dim + 2 + (cell_decode ? 2 : 0);
  int64_t expected_in = s.in_dim;
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    const at::Tensor& b = biases[l];
    check_same(w, "an MLP weight");
    check_same(b, "an MLP bias");
    TORCH_CHECK(w.dim() == 2, "liif_cuda.query: weights[", l, "] must be (out, in), got ",
                w.sizes());
    TORCH_CHECK(w.size(1) == expected_in, "liif_cuda.query: weights[", l, "] takes ", w.size(1),
                " inputs, expected ", expected_in,
                l == 0 ? " (C*9 with feat_unfold or C, + 2 coordinates, + 2 with cell_decode)"
                       : " (the previous layer's width)");
    TORCH_CHECK(w.size(0) > 0, "liif_cuda.query: weights[", l, "] has no outputs");
    TORCH_CHECK(b.dim() == 1 && b.size(0) == w.size(0), "liif_cuda.query: biases[", l,
                "] must be (", w.size(0), ",), got ", b.sizes());
    s.layer_widths.push_back(w.size(0));
    expected_in = w.size(0);
  }
  s.out_dim = s.layer_widths.back();
  return s;
}

// The extra arguments of liif_cuda::query_backward: grad_out like the output, one flag per gradient.
inline void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& feat,
                                  const QueryShape& s, size_t needs_grad) {
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == s.batch && grad_out.size(1) == s.queries &&
                  grad_out.size(2) == s.out_dim,
              "liif_cuda.query backward: grad_out must be (B, Q, out_dim) = (", s.batch, ", ",
              s.queries, ", ", s.out_dim, "), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == feat.scalar_type(),
              "liif_cuda.query backward: grad_out must have feat's dtype ", feat.scalar_type(),
              ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == feat.device(),
              "liif_cuda.query backward: grad_out must be on feat's device ", feat.device(), ", got ",
              grad_out.device());
  const size_t expected = 3 + 2 * s.layer_widths.size();
  TORCH_CHECK(needs_grad == expected, "liif_cuda.query backward: needs_grad must have ", expected,
              " flags (feat, coords, cells, each weight, each bias), got ", needs_grad);
}

// Whether the first-layer map (layer 0's feature columns applied once per LR cell) costs less than
// applying them per (query, neighbour) row: when there are more rows per image than LR cells. The
// CPU kernel computes the map only then; query_saving_map keeps a map only then, on both devices
// (elsewhere the backward's own is cheap). liif_cuda/_registration.py's saves_first_layer_map, the
// fake's rule, states the same.
inline bool first_layer_map_pays_off(const QueryShape& s, bool local_ensemble) {
  return s.queries * (local_ensemble ? 4 : 1) > s.height * s.width;
}

// query_backward's `first_layer_map` (query_saving_map's second output): the map to use, or an
// undefined tensor where there is none (None or empty: compute it again). Anything else must be the
// (B, H, W, width0) contiguous map of feat's dtype and device.
inline at::Tensor saved_first_layer_map(const c10::optional<at::Tensor>& map,
                                        const at::Tensor& feat, const QueryShape& s) {
  if (!map.has_value() || !map->defined() || map->numel() == 0) return at::Tensor();
  const at::Tensor& m = *map;
  TORCH_CHECK(m.dim() == 4 && m.size(0) == s.batch && m.size(1) == s.height &&
                  m.size(2) == s.width && m.size(3) == s.layer_widths[0],
              "liif_cuda.query backward: first_layer_map must be (B, H, W, width0) = (", s.batch,
              ", ", s.height, ", ", s.width, ", ", s.layer_widths[0], ") or empty, got ", m.sizes());
  TORCH_CHECK(m.scalar_type() == feat.scalar_type() && m.device() == feat.device(),
              "liif_cuda.query backward: first_layer_map must have feat's dtype and device (",
              feat.scalar_type(), ", ", feat.device(), "), got ", m.scalar_type(), ", ", m.device());
  TORCH_CHECK(m.is_contiguous(), "liif_cuda.query backward: first_layer_map must be contiguous");
  return m;
}

}  // namespace liif
