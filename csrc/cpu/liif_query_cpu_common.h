// What the CPU forward and backward kernels of the fused query share: the plan of a call (shape,
// geometry constants, MLP as contiguous tensors, strides), the per-tile geometry, the element-wise
// loops of layer 0, the gather of unfolded features, and the precomputed first-layer map.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../liif_geometry.h"
#include "../liif_query_checks.h"
#include "bf16_linear.h"
#include "grid_sample_rounding.h"

namespace liif {
namespace cpu {

// (query, neighbour) rows per tile: 256 rows of 256 activations are 256 KiB in float32, so a tile's
// two activation buffers stay in a 512 KiB L2 next to the streamed weights, and the matrix products
// are still large enough for BLAS to run near peak.
constexpr int64_t kTileRows = 256;

template <typename scalar_t>
struct Strided3 {
  const scalar_t* data;
  int64_t s0, s1, s2;
  scalar_t at(int64_t i, int64_t j, int64_t k) const { return data[i * s0 + j * s1 + k * s2]; }
};

template <typename scalar_t>
Strided3<scalar_t> strided3(const at::Tensor& t) {
  return {t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Everything a tile needs, shared read-only by all threads.
template <typename scalar_t>
struct QueryPlan {
  QueryShape shape;
  FeatureGrid<scalar_t> grid;
  bool cell_decode = false;
  bool precomputed = false;
  Strided3<scalar_t> coords{};
  Strided3<scalar_t> cells{};
  // Feature map (direct path): element (b, c, y, x) at feat + b*fs[0] + c*fs[1] + y*fs[2] + x*fs[3].
  const scalar_t* feat = nullptr;
  int64_t fs[4] = {0, 0, 0, 0};
  // The MLP: per layer a contiguous (out, in) weight and (out,) bias.
  std::vector<at::Tensor> weights, biases;
  at::Tensor first_feature_weight;  // (width0, feat_dim): the feature columns of layer 0
  // The precomputed path's feature columns as a channels-last (width0, C, k, k) convolution weight
  // (k = 3 with feat_unfold, else 1), for the map and its gradient.
  at::Tensor first_feature_filter;
  // Columns of layer 0 for rel_y, rel_x, cell_y*H, cell_x*W, each contiguous over the width; the
  // cell columns are zeros without cell_decode.
  at::Tensor first_extra_columns;  // (4, width0)
  const scalar_t* extra_column[4] = {nullptr, nullptr, nullptr, nullptr};
  int64_t max_width = 0;
};

// The element-wise loops below get an AVX2 clone next to the baseline x86-64 one, chosen at load
// time, since the extension is built for any x86-64 CPU. (The matrix products are BLAS's.)
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LIIF_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LIIF_SIMD_CLONES
#endif

template <typename scalar_t>
LIIF_SIMD_CLONES void add_bias_relu(scalar_t* x, const scalar_t* bias, int64_t rows, int64_t width,
                                    bool relu) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* row = x + r * width;
    for (int64_t n = 0; n < width; ++n) {
      const scalar_t v = row[n] + bias[n];
      // `v < 0 ? 0 : v` keeps NaN, as torch.relu does.
      row[n] = relu && v < scalar_t(0) ? scalar_t(0) : v;
    }
  }
}

// ReLU's backward: g = 0 where the layer's output a (after ReLU) is <= 0, as torch's
// threshold_backward (so a NaN activation passes its gradient, as in the reference's autograd).
template <typename scalar_t>
LIIF_SIMD_CLONES void relu_backward(scalar_t* g, const scalar_t* a, int64_t count) {
  for (int64_t i = 0; i < count; ++i) g[i] = a[i] <= scalar_t(0) ? scalar_t(0) : g[i];
}

// One row of layer 0: the feature part `src` (precomputed or already multiplied; may alias `row`)
// plus the coordinate and cell terms, then ReLU (without cell_decode, cells and columns are zero).
template <typename scalar_t>
LIIF_SIMD_CLONES void first_layer_row(const scalar_t* src, scalar_t* row, int64_t width,
                                      scalar_t rel_y, scalar_t rel_x, const scalar_t* wy,
                                      const scalar_t* wx, scalar_t cell_y, scalar_t cell_x,
                                      const scalar_t* wcy, const scalar_t* wcx, bool relu) {
  for (int64_t n = 0; n < width; ++n) {
    const scalar_t v = src[n] + rel_y * wy[n] + rel_x * wx[n] + cell_y * wcy[n] + cell_x * wcx[n];
    row[n] = relu && v < scalar_t(0) ? scalar_t(0) : v;
  }
}

// Gathers the unfolded feature vector of LR cell (iy, ix) in the reference's column order
// c*9 + ky*3 + kx (3x3 taps around the cell, zero outside the map), or the C features without unfold.
template <typename scalar_t>
void gather_unfolded(const QueryPlan<scalar_t>& p, int64_t b, int64_t iy, int64_t ix,
                     bool feat_unfold, scalar_t* dst) {
  const scalar_t* base = p.feat + b * p.fs[0];
  const int64_t C = p.shape.channels, H = p.shape.height, W = p.shape.width;
  if (!feat_unfold) {
    for (int64_t c = 0; c < C; ++c) dst[c] = base[c * p.fs[1] + iy * p.fs[2] + ix * p.fs[3]];
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t ky = 0; ky < 3; ++ky) {
      const int64_t y = iy + ky - 1;
      for (int64_t kx = 0; kx < 3; ++kx) {
        const int64_t x = ix + kx - 1;
        const bool inside = y >= 0 && y < H && x >= 0 && x < W;
        dst[c * 9 + ky * 3 + kx] =
            inside ? base[c * p.fs[1] + y * p.fs[2] + x * p.fs[3]] : scalar_t(0);
      }
    }
  }
}

// A (rows x cols) view of a flat buffer whose rows are `pitch` apart (by default, contiguous).
inline at::Tensor rows_view(const at::Tensor& flat, int64_t rows, int64_t cols,
                            int64_t pitch = 0) {
  if (pitch == 0 || pitch == cols) return flat.narrow(0, 0, rows * cols).view({rows, cols});
  return flat.narrow(0, 0, rows * pitch).view({rows, pitch}).narrow(1, 0, cols);
}

// The plan of one call: everything a tile needs, read-only.
template <typename scalar_t>
QueryPlan<scalar_t> make_query_plan(const at::Tensor& feat, const at::Tensor& coords,
                                    const c10::optional<at::Tensor>& cells,
                                    const std::vector<at::Tensor>& weights,
                                    const std::vector<at::Tensor>& biases, bool local_ensemble,
                                    bool cell_decode, const QueryShape& shape) {
  QueryPlan<scalar_t> p;
  p.shape = shape;
  p.grid = make_feature_grid<scalar_t>(shape.height, shape.width, local_ensemble,
                                      cpu_grid_sample_fuses_index<scalar_t>());
  p.cell_decode = cell_decode;
  p.coords = strided3<scalar_t>(coords);
  if (cell_decode) p.cells = strided3<scalar_t>(*cells);
  p.feat = feat.const_data_ptr<scalar_t>();
  for (int d = 0; d < 4; ++d) p.fs[d] = feat.stride(d);
  for (size_t l = 0; l < weights.size(); ++l) {
    // Detached: the kernel computes values only (autograd is registered around the operator).
    p.weights.push_back(weights[l].detach().contiguous());
    p.biases.push_back(biases[l].detach().contiguous());
    p.max_width = std::max(p.max_width, shape.layer_widths[l]);
  }
  p.first_feature_weight = p.weights[0].narrow(1, 0, shape.feat_dim).contiguous();
  p.first_extra_columns = p.weights[0].narrow(1, shape.feat_dim, shape.in_dim - shape.feat_dim).t();
  if (!cell_decode) {
    p.first_extra_columns = at::cat({p.first_extra_columns, p.first_extra_columns.new_zeros(
                                                                {2, shape.layer_widths[0]})});
  }
  p.first_extra_columns = p.first_extra_columns.contiguous();
  const at::Tensor& extra = p.first_extra_columns;
  for (int64_t i = 0; i < extra.size(0); ++i) {
    p.extra_column[i] = extra.const_data_ptr<scalar_t>() + i * extra.size(1);
  }
  // Layer 0's feature columns precomputed per LR cell (the first-layer map P) where that is cheaper;
  // otherwise each row gathers its unfolded features (the direct path).
  p.precomputed = first_layer_map_pays_off(shape, local_ensemble);
  if (p.precomputed) {
    const int64_t k = shape.feat_dim == shape.channels ? 1 : 3;  // feat_dim is C or 9C
    p.first_feature_filter =
        p.first_feature_weight.view({shape.layer_widths[0], shape.channels, k, k})
            .contiguous(at::MemoryFormat::ChannelsLast);
  }

  return p;
}

// The geometry of queries [q0, q0 + nq) of batch element b: neighbours (a harmless cell 0 for a query
// with a non-finite coordinate, whose `valid` is 0) and the scaled cell (zeros without cell_decode).
template <typename scalar_t>
void tile_geometry(const QueryPlan<scalar_t>& p, int64_t b, int64_t q0, int64_t nq,
                   Neighbour<scalar_t>* neighbours, char* valid, scalar_t* cell) {
  const int nn = p.grid.num_neighbours;
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t q = q0 + i;
    Neighbour<scalar_t>* nb = &neighbours[i * nn];
    valid[i] = query_neighbours(p.grid, p.coords.at(b, q, 0), p.coords.at(b, q, 1), nb);
    if (!valid[i]) {
      // The output of this query is NaN; give its rows a harmless cell so the tile can run unchanged.
      for (int k = 0; k < nn; ++k) {
        nb[k] = Neighbour<scalar_t>{0, 0, scalar_t(0), scalar_t(0), scalar_t(0)};
      }
    }
    if (p.cell_decode) {
      scaled_cell(p.grid, p.cells.at(b, q, 0), p.cells.at(b, q, 1), &cell[2 * i]);
    } else {
      cell[2 * i] = cell[2 * i + 1] = scalar_t(0);  // meets the zero cell columns
    }
  }
}

// Layer 0 on the `rows` rows of a tile whose geometry is in `neighbours` and `cell` (tile_geometry),
// into act0 (rows x width0): the precomputed map's row, or the gathered unfolded features times the
// feature columns, plus the coordinate and cell terms, then ReLU unless it is the only layer, in one
// pass over the row. `map`: P of batch element b (precompute_first_layer), or nullptr for the direct
// path, which gathers into `unfolded` (room for rows x feat_dim).
template <typename scalar_t>
void tile_first_layer(const QueryPlan<scalar_t>& p, const scalar_t* map, int64_t b, int64_t rows,
                      const Neighbour<scalar_t>* neighbours, const scalar_t* cell,
                      const at::Tensor& unfolded, bool feat_unfold, at::Tensor& act0) {
  const int nn = p.grid.num_neighbours;
  const int64_t width0 = p.shape.layer_widths[0];
  const bool relu = p.weights.size() > 1;
  scalar_t* a = act0.template data_ptr<scalar_t>();
  if (map == nullptr) {
    at::Tensor u = rows_view(unfolded, rows, p.shape.feat_dim);
    scalar_t* ud = u.template data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      gather_unfolded(p, b, neighbours[r].iy, neighbours[r].ix, feat_unfold,
                      ud + r * p.shape.feat_dim);
    }
    at::addmm_out(act0, p.biases[0], u, p.first_feature_weight.t());
  }
  for (int64_t r = 0; r < rows; ++r) {
    const Neighbour<scalar_t>& nb = neighbours[r];
    scalar_t* row = a + r * width0;
    const scalar_t* src = map != nullptr ? map + (nb.iy * p.shape.width + nb.ix) * width0 : row;
    const scalar_t* c = &cell[2 * (r / nn)];
    first_layer_row(src, row, width0, nb.rel_y, nb.rel_x, p.extra_column[0], p.extra_column[1],
                    c[0], c[1], p.extra_column[2], p.extra_column[3], relu);
  }
}

// The MLP on the `rows` rows of a tile: layer 0 (tile_first_layer), then each further layer's
// product, bias and ReLU (none after the last). Layer l's output goes to the flat buffer output(l)
// (room for rows x width_l, not output(l - 1)'s); returns the last layer's buffer.
template <typename scalar_t, typename Output>
at::Tensor tile_mlp(const QueryPlan<scalar_t>& p, const scalar_t* map, int64_t b, int64_t rows,
                    const Neighbour<scalar_t>* neighbours, const scalar_t* cell,
                    const at::Tensor& unfolded, bool feat_unfold, Output&& output) {
  const int num_layers = static_cast<int>(p.weights.size());
  at::Tensor act0 = rows_view(output(0), rows, p.shape.layer_widths[0]);
  tile_first_layer(p, map, b, rows, neighbours, cell, unfolded, feat_unfold, act0);
  at::Tensor result = output(0);
  for (int l = 1; l < num_layers; ++l) {
    const int64_t out_w = p.shape.layer_widths[l];
    at::Tensor dst = rows_view(output(l), rows, out_w);
    const at::Tensor src = rows_view(output(l - 1), rows, p.shape.layer_widths[l - 1]);
    at::mm_out(dst, src, p.weights[l].t());
    add_bias_relu(dst.template data_ptr<scalar_t>(), p.biases[l].template const_data_ptr<scalar_t>(),
                  rows, out_w, l + 1 < num_layers);
    result = output(l);
  }
  return result;
}

// The bf16 path's layers between hidden layers (l = 1 .. L-2; none for an MLP of two layers),
// packed once per call as bf16::linear takes them. For the forward and the backward's bf16 mode.
inline std::vector<bf16::PackedLayer> pack_bf16_hidden_layers(const QueryPlan<float>& p) {
  std::vector<bf16::PackedLayer> hidden;
  for (size_t l = 1; l + 1 < p.weights.size(); ++l) {
    hidden.push_back(bf16::pack_layer(p.weights[l].const_data_ptr<float>(),
                                      p.biases[l].const_data_ptr<float>(),
                                      p.shape.layer_widths[l], p.shape.layer_widths[l - 1]));
  }
  return hidden;
}

// The bf16 path's MLP on a tile after layer 0 (act0: rows x width0, float32), the rounding model of
// the CUDA tensor-core kernel: layer 0's output rounded to bf16 into out(0), each layer l between
// hidden layers (`hidden`, pack_bf16_hidden_layers) from out(l - 1) into out(l) with bias and ReLU,
// out(l) being bf16 rows of pitch activation_pitch(width_l) for `rows` rows; the last layer in
// float32 on out(L - 2) into pred (rows x out_dim). Returns out(L - 2).
template <typename Output>
const uint16_t* tile_mlp_bf16(const QueryPlan<float>& p,
                              const std::vector<bf16::PackedLayer>& hidden, const float* act0,
                              int64_t rows, Output&& out, float* pred) {
  const int64_t width0 = p.shape.layer_widths[0];
  bf16::round_rows(act0, width0, rows, width0, out(0));
  const int last = static_cast<int>(p.weights.size()) - 1;
  for (int l = 1; l < last; ++l) {
    bf16::linear(out(l - 1), rows, hidden[l - 1], /*relu=*/true, out(l));
  }
  bf16::linear_float_out(out(last - 1), rows, p.shape.layer_widths[last - 1],
                         p.weights[last].const_data_ptr<float>(),
                         p.biases[last].const_data_ptr<float>(), p.shape.out_dim, pred);
  return out(last - 1);
}

// P for batch element b: the feature columns of layer 0 applied to every LR cell, bias included,
// (H * W, width0) rows in raster order. The feature columns c*9 + ky*3 + kx are exactly a (width0, C,
// 3, 3) convolution weight; with channels-last operands oneDNN writes the rows directly, faster here
// than one product per 3x3 tap (float64 takes ATen's own convolution). One image at a
// time, as the backward makes it again when it has no saved map: oneDNN's sums may depend on the
// batch it convolves, and the forward's map and the backward's must be the same numbers.
template <typename scalar_t>
at::Tensor precompute_first_layer(const at::Tensor& feat_b, const QueryPlan<scalar_t>& p) {
  const int64_t H = p.shape.height, W = p.shape.width;
  const int64_t pad = p.first_feature_filter.size(3) / 2;
  const at::Tensor input = feat_b.unsqueeze(0).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor map = at::convolution(input, p.first_feature_filter, p.biases[0], {1, 1},
                                         {pad, pad}, {1, 1}, false, {0, 0}, 1);
  return map.permute({0, 2, 3, 1}).reshape({H * W, p.shape.layer_widths[0]}).contiguous();
}

}  // namespace cpu
}  // namespace liif
