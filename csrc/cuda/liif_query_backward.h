// The backward of the query on CUDA (liif_cuda::query_backward), at the Tensor level: shared by the
// CUDA operator (liif_query_backward_cuda.cpp) and the host execution harness (tests/harness), which
// runs the same code with the kernels executed on the host and the products on the CPU.
//
// Plan: the first-layer map is made as in the forward (liif_query_prepare.h); the queries (all batch
// elements together) are taken in chunks of `chunk_rows` (query, neighbour) rows (backward_chunk_rows:
// a bounded amount of temporaries). Per chunk:
//   1. geometry kernel: each row's LR cell, blend weight and layer 0's rank-4 input;
//   2. the forward again, keeping every layer's output: layer 0 by a kernel (map row + bias +
//      coordinate and cell columns, ReLU), the other layers as cuBLAS products (addmm, ReLU);
//   3. blend kernel: the predictions' gradient and the blend weights';
//   4. down the layers, each gradient only as deep as one is asked for: weight gradients G^T A
//      accumulated into one tensor per layer across chunks (addmm_, in chunk order), bias gradients
//      as column sums, input gradients G W masked by the ReLUs (threshold_backward);
//   5. layer 0: its bias and rank-4 columns' gradients, the map gradient added per LR cell
//      (index_add_), and the coordinate kernel (the rank-4 input's gradient, G0 times those
//      columns, through the relative coordinates and the blend weights' areas).
// Then the map's gradient goes through the convolution that made the map, written as products:
// feat's gradient is col2im(W^T G) and the feature columns' is G^T im2col(feat).
//
// `bf16` (the backward's bf16 mode, float32 only), as the CPU kernel's: the forward again is the bf16
// forward's rounding model (layer 0's output and each hidden layer's rounded to bf16 once, after
// bias and ReLU in float32; the hidden layers' products of bf16 operands with float32 results),
// and the weight and input gradients of the layers between hidden layers (1 .. L-2) multiply the
// output gradient rounded to bf16 by those bf16 activations / weights, with float32 results; the
// rest is unchanged (the CPU kernel also takes the map's convolution backward in bf16; here its
// products stay float32).
//
// Deterministic except for the per-cell addition of step 5, which uses atomic adds on CUDA unless
// torch.use_deterministic_algorithms(True) is on (index_add_ then takes its sorted, deterministic
// path); the products (cuBLAS) and sums are reproducible. Outside the bf16 mode the gradients are
// those of the exact float32 / float64 function: products follow
// torch.backends.cuda.matmul.allow_tf32 (off by default), as the reference's autograd does.
#pragma once

#include <ATen/ATen.h>
#include <torch/version.h>

#include <algorithm>
#include <vector>

#include "../liif_backward_needs.h"
#include "../liif_query_checks.h"
#include "liif_query_backward_params.h"
#include "liif_query_prepare.h"

namespace liif {
namespace cuda {

// Temporaries of one chunk: enough rows to keep a GPU busy with few launches, within a bound that is
// independent of the number of queries (the training recipe's 147456 rows take four chunks).
constexpr int64_t kBackwardChunkBytes = int64_t(256) << 20;
constexpr int64_t kBackwardMinChunkRows = 4096;

// Bytes of chunk temporaries per (query, neighbour) row: every layer's output, two gradient buffers
// of the widest layer, the rank-4 input and its gradient, blend weight and its gradient, the cell
// and its scatter index.
inline int64_t backward_row_bytes(const QueryShape& s, int64_t element_size) {
  int64_t elements = 0, widest = 0;
  for (int64_t w : s.layer_widths) {
    elements += w;
    widest = std::max(widest, w);
  }
  elements += 2 * widest + 4 + 4 + 2;
  return elements * element_size + 4 + 8;
}

// Rows per chunk: kBackwardChunkBytes of temporaries, and at least kBackwardMinChunkRows.
inline int64_t backward_chunk_rows(const QueryShape& s, int64_t element_size) {
  return std::max(kBackwardMinChunkRows, kBackwardChunkBytes / backward_row_bytes(s, element_size));
}

// `launch(BackwardKernel, const BackwardChunkParams<T>&, int64_t threads)` runs one of the kernels
// of liif_query_backward_kernels.cuh with at least `threads` threads (grid-stride loops);
// `convolve` makes the first-layer map as prepare_query wants it.
template <typename T, typename Convolve, typename Launch>
std::vector<at::Tensor> query_backward_in_chunks(
    const at::Tensor& grad_out, const at::Tensor& feat, const at::Tensor& coords,
    const c10::optional<at::Tensor>& cells, const std::vector<at::Tensor>& weights,
    const std::vector<at::Tensor>& biases, bool local_ensemble, bool feat_unfold, bool cell_decode,
    const BackwardNeeds& needs, const QueryShape& shape, Convolve&& convolve, Launch&& launch,
    int64_t chunk_rows, bool bf16_mode) {
  const int num_layers = static_cast<int>(weights.size());
  // Without a layer between hidden layers the bf16 mode rounds nothing (as on the CPU).
  const bool bf16 = bf16_mode && num_layers > 2;
  const auto opts = feat.options();
  const int64_t B = shape.batch, C = shape.channels, H = shape.height, W = shape.width;
  const int64_t width0 = shape.layer_widths[0];
  const int64_t total_queries = B * shape.queries;
  const int lowest = needs.lowest_layer();
  // The map's gradient feeds feat's and the feature columns of layer 0.
  const bool scatter = lowest == 0 && (needs.feat || needs.first_feature_columns());

  // The last layer (out_dim wide: 3 for RGB) padded with zero outputs to a multiple of 8 when
  // there is a layer before it: cuBLAS runs products with a leading dimension of 3 on unaligned
  // SIMT kernels, the slowest products of the step on an H200 (profile_train_step.py).
  const int64_t out_dim = shape.out_dim;
  const int64_t out_pitch = num_layers > 1 ? (out_dim + 7) / 8 * 8 : out_dim;
  std::vector<at::Tensor> layer_w(weights), layer_b(biases);
  if (out_pitch != out_dim) {
    const int last = num_layers - 1;
    layer_w[last] = at::zeros({out_pitch, weights[last].size(1)}, opts);
    layer_w[last].narrow(0, 0, out_dim).copy_(weights[last]);
    layer_b[last] = at::zeros({out_pitch}, opts);
    layer_b[last].narrow(0, 0, out_dim).copy_(biases[last]);
  }
  // Accumulators (contiguous, whatever the parameters' strides: as the fake implementation says).
  std::vector<at::Tensor> grad_w(num_layers), grad_b(num_layers);
  for (int l = 0; l < num_layers; ++l) {
    if (needs.weight[l] && l > 0) grad_w[l] = at::zeros(layer_w[l].sizes(), opts);
    if (needs.bias[l]) grad_b[l] = at::zeros(layer_b[l].sizes(), opts);
  }
  const at::Tensor grad_extra_columns = needs.weight[0] ? at::zeros({4, width0}, opts)
                                                        : at::Tensor();  // (4, width0)
  at::Tensor grad_coords = needs.coords ? at::empty({B, shape.queries, 2}, opts) : at::Tensor();
  at::Tensor grad_cells = needs.cells ? at::empty({B, shape.queries, 2}, opts) : at::Tensor();
  const at::Tensor grad_map = scatter ? at::zeros({B * H * W, width0}, opts) : at::Tensor();

  if (lowest < num_layers && total_queries > 0) {
    const PreparedQuery<T> prepared =
        prepare_query<T>(feat, coords, cells, weights, biases, local_ensemble, feat_unfold,
                         cell_decode, Precision::kFp32, shape, convolve);
    const int nn = prepared.params.grid.num_neighbours;
    // Whole queries: at least one, and no more than there are.
    const int64_t chunk_queries = std::max<int64_t>(1, std::min(total_queries, chunk_rows / nn));
    const int64_t rows_max = chunk_queries * nn;

    // acts[l]: layer l's output (after its ReLU; the predictions for the last layer).
    std::vector<at::Tensor> acts;
    int64_t widest = 0;
    for (int l = 0; l < num_layers; ++l) {
      const int64_t width = l + 1 == num_layers ? out_pitch : shape.layer_widths[l];
      acts.push_back(at::empty({rows_max, width}, opts));
      widest = std::max(widest, width);
    }
    const at::Tensor ones = at::ones({rows_max}, opts);  // column sums as products
    const at::Tensor grad_buffers[2] = {at::empty({rows_max * widest}, opts),
                                        at::empty({rows_max * widest}, opts)};
    const at::Tensor cell = at::empty({rows_max}, opts.dtype(at::kInt));
    const at::Tensor blend = at::empty({rows_max}, opts);
    const at::Tensor extra = at::empty({rows_max, 4}, opts);
    const at::Tensor grad_blend = at::empty({rows_max}, opts);
    const at::Tensor grad_extra = at::empty({rows_max, 4}, opts);
    const at::Tensor grad_out_flat = grad_out.contiguous();
    // The bf16 mode's weights of the layers between hidden layers: (out, in) and (in, out).
    std::vector<at::Tensor> bf16_weights(num_layers), bf16_weights_t(num_layers);
    for (int l = 1; bf16 && l + 1 < num_layers; ++l) {
      bf16_weights[l] = weights[l].to(at::kBFloat16);
      bf16_weights_t[l] = bf16_weights[l].t().contiguous();
    }
    auto reduced = [&](int l) { return bf16 && l + 1 < num_layers; };
    auto to_bf16 = [](const at::Tensor& t) { return t.to(at::kBFloat16); };
    // The bf16 mode's products: bf16 operands, float32 accumulation and result. cuBLAS's
    // float32-output bf16 GEMM (aten's mm.dtype, torch 2.8 and newer); on the host harness, and with
    // an older torch, a float32 product of the same bf16 values, equal up to the order of the sums.
    auto product_bf16 = [](const at::Tensor& a, const at::Tensor& b) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
      if (a.is_cuda()) return at::mm(a, b, at::kFloat);
#endif
      return at::mm(a.to(at::kFloat), b.to(at::kFloat));
    };
    // In place: float32 values rounded to bf16 (to nearest even), kept in float32.
    auto round_to_bf16 = [](at::Tensor t) { t.copy_(t.to(at::kBFloat16)); };

    BackwardChunkParams<T> p;
    p.grid = prepared.params.grid;
    p.queries_per_image = shape.queries;
    p.width0 = width0;
    p.out_dim = out_dim;
    p.pred_pitch = out_pitch;
    p.num_layers = num_layers;
    p.coords = prepared.params.coords;
    p.cells = prepared.params.cells;
    p.grad_out = grad_out_flat.template const_data_ptr<T>();
    p.map = prepared.params.map;
    p.first_bias = prepared.params.first_bias;
    p.extra_columns = prepared.params.extra_columns;
    p.pred = acts[num_layers - 1].template const_data_ptr<T>();
    p.grad_extra = grad_extra.template const_data_ptr<T>();
    p.cell = cell.template data_ptr<int>();
    p.blend = blend.template data_ptr<T>();
    p.extra = extra.template data_ptr<T>();
    p.act0 = acts[0].template data_ptr<T>();
    p.grad_pred = grad_buffers[0].template data_ptr<T>();
    p.grad_blend = grad_blend.template data_ptr<T>();
    p.grad_coords = needs.coords ? grad_coords.template data_ptr<T>() : nullptr;
    p.grad_cells = needs.cells ? grad_cells.template data_ptr<T>() : nullptr;

    for (int64_t first = 0; first < total_queries; first += chunk_queries) {
      const int64_t nq = std::min(chunk_queries, total_queries - first);
      const int64_t rows = nq * nn;
      p.first_query = first;
      p.queries = nq;
      auto rows_of = [&](const at::Tensor& t) { return t.narrow(0, 0, rows); };
      auto grad_rows = [&](int buffer, int64_t width) {
        return grad_buffers[buffer].narrow(0, 0, rows * width).view({rows, width});
      };

      // 1-2. Geometry, then the forward, keeping each layer's output.
      launch(BackwardKernel::kGeometry, p, nq);
      launch(BackwardKernel::kFirstLayer, p, rows * width0);
      if (bf16) round_to_bf16(rows_of(acts[0]));
      for (int l = 1; l < num_layers; ++l) {
        at::Tensor out = rows_of(acts[l]);
        if (reduced(l)) {
          out.copy_(product_bf16(to_bf16(rows_of(acts[l - 1])), bf16_weights_t[l]))
              .add_(biases[l])
              .relu_();
          round_to_bf16(out);
          continue;
        }
        at::addmm_out(out, layer_b[l], rows_of(acts[l - 1]), layer_w[l].t());
        if (l + 1 < num_layers) out.relu_();
      }

      // 3. The blend: the predictions' gradient (into grad buffer 0) and the blend weights'.
      launch(BackwardKernel::kBlend, p, rows);
      at::Tensor G = grad_rows(0, out_pitch);

      // 4. Down the layers.
      int buffer = 0;
      for (int l = num_layers - 1; l >= 1 && l >= lowest; --l) {
        const at::Tensor A = rows_of(acts[l - 1]);
        const at::Tensor G_reduced = reduced(l) ? to_bf16(G) : at::Tensor();
        if (needs.weight[l]) {
          if (reduced(l)) {
            grad_w[l].add_(product_bf16(G_reduced.t(), to_bf16(A)));
          } else {
            grad_w[l].addmm_(G.t(), A);
          }
        }
        if (needs.bias[l]) grad_b[l].addmv_(G.t(), rows_of(ones));
        if (l == lowest) break;
        buffer = 1 - buffer;
        at::Tensor G_in = grad_rows(buffer, shape.layer_widths[l - 1]);
        if (reduced(l)) {
          G_in.copy_(product_bf16(G_reduced, bf16_weights[l]));
        } else {
          at::mm_out(G_in, G, layer_w[l]);
        }
        at::threshold_backward_out(G_in, G_in, A, 0);
        G = G_in;
      }
      if (lowest != 0) continue;

      // 5. Layer 0, whose output gradient G is now rows x width0.
      if (needs.bias[0]) grad_b[0].addmv_(G.t(), rows_of(ones));
      if (needs.weight[0]) grad_extra_columns.addmm_(rows_of(extra).t(), G);
      if (scatter) {
        // Rows of undecoded queries have zero gradients: they may go to any cell.
        grad_map.index_add_(0, rows_of(cell).clamp_min(0), G);
      }
      if (needs.coords || needs.cells) {
        at::Tensor gx = rows_of(grad_extra);
        at::mm_out(gx, G, prepared.extra_columns.t());
        launch(BackwardKernel::kCoordinate, p, nq);
      }
    }
  }

  // Through the convolution that made the map: as products with the unfolded features.
  at::Tensor grad_feat;
  if (needs.feat || needs.first_feature_columns()) {
    const int64_t k = feat_unfold ? 3 : 1;
    const at::Tensor g = grad_map.view({B, H * W, width0}).transpose(1, 2);  // (B, width0, HW)
    if (needs.first_feature_columns()) {
      const at::Tensor unfolded = feat_unfold ? at::im2col(feat, {k, k}, {1, 1}, {1, 1}, {1, 1})
                                              : feat.reshape({B, C, H * W});  // (B, feat_dim, HW)
      grad_w[0] = at::cat(
          {at::matmul(g, unfolded.transpose(1, 2)).sum(0),
           grad_extra_columns.narrow(0, 0, shape.in_dim - shape.feat_dim).t()},
          1);
    }
    if (needs.feat) {
      const at::Tensor feature_columns = weights[0].narrow(1, 0, shape.feat_dim);
      const at::Tensor grad_unfolded = at::matmul(feature_columns.t(), g);  // (B, feat_dim, HW)
      grad_feat = feat_unfold ? at::col2im(grad_unfolded, {H, W}, {k, k}, {1, 1}, {1, 1}, {1, 1})
                              : grad_unfolded.view({B, C, H, W});
    }
  }

  std::vector<at::Tensor> grads;
  grads.push_back(needs.feat ? grad_feat.contiguous() : feat.new_empty({0}));
  grads.push_back(needs.coords ? grad_coords : coords.new_empty({0}));
  grads.push_back(needs.cells ? grad_cells : coords.new_empty({0}));
  // The padded last layer's gradients without their padding.
  auto unpadded = [](const at::Tensor& grad, const at::Tensor& like) {
    return grad.size(0) == like.size(0) ? grad : grad.narrow(0, 0, like.size(0)).clone();
  };
  for (int l = 0; l < num_layers; ++l) {
    grads.push_back(needs.weight[l] ? unpadded(grad_w[l], weights[l]) : weights[l].new_empty({0}));
  }
  for (int l = 0; l < num_layers; ++l) {
    grads.push_back(needs.bias[l] ? unpadded(grad_b[l], biases[l]) : biases[l].new_empty({0}));
  }
  return grads;
}

}  // namespace cuda
}  // namespace liif
