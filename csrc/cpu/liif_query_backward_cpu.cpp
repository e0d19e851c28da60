// Fused backward of the LIIF query on the CPU (liif_cuda::query_backward): gradients of feat, coords,
// cells and every MLP weight and bias, each only when asked for, in one pass over the forward's tiles.
//
// Per tile of (query, neighbour) rows it recomputes the forward in cache (layer 0 from the
// first-layer map the forward saved (query_saving_map), made again when there is none, or from the
// gathered features, the hidden layers as BLAS products, keeping
// each layer's activations), then back-propagates: through the blend (the predictions' and the blend
// weights' gradients), the last and hidden layers (weight gradients G^T A, input gradients G W masked
// by the ReLUs), layer 0's coordinate and cell columns, and the geometry (areas and relative
// coordinates) to the coordinates. Only as deep as a gradient is asked for: with frozen lower layers
// and no feat / coords / cells gradient the propagation stops early.
//
// The first-layer map's gradient (or, without the map, the unfolded features' gradient) is gathered per
// LR cell and finished by the convolution's own backward (feat and the feature columns of layer 0).
//
// The bf16 mode (precision "bf16", on a CPU with AVX512-BF16 and an MLP with a layer between hidden
// layers) recomputes the forward with the bf16 forward's kernels (the same activations, rounded to
// bf16), and multiplies the layers between hidden layers' output gradients, rounded to bf16, by
// their bf16 activations (weight gradients, both packed in pairs of rows) and weights (input
// gradients, with the ReLU's mask in the kernel's epilogue) with float32 results
// (bf16::product_float); layer 0's gradients stay float32, except that the first-layer map's
// gradient goes through the convolution's backward in bf16 (oneDNN, as under autocast).
// python/liif_rounding_model's Bf16BackwardRounding states these gradients on the reference, but
// for that convolution.
//
// Deterministic: tiles run in waves of kWaveTiles; tile t of an image adds its weight and bias
// gradients into accumulator slot t % kWaveTiles (one tile per slot and wave), writes its per-cell
// gradient rows into the wave's buffer, and after the wave those rows are added in tile and row order;
// the slots are summed in slot order at the end. No atomics, and the same sums whatever the number of
// threads (the convolution's backward, ATen's, is reproducible for a given number of threads).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "../liif_backward_needs.h"
#include "bf16_linear.h"
#include "liif_query_cpu_common.h"

namespace liif {
namespace {

using namespace cpu;

constexpr int64_t kWaveTiles = 16;

// One accumulator slot: weight and bias gradients of the layers that need them. Weight gradients
// accumulate in the dtype (a slot adds one tile per wave: tens of products of hundreds of rows);
// bias gradients, plain sums over rows that often cancel, in float64, and the slots are summed in
// float64.
template <typename scalar_t>
struct GradSlot {
  std::vector<at::Tensor> weight, bias;  // layer l: (out, in) / (out,), undefined where not needed
  at::Tensor first_extra;                // (4, width0): coordinate and cell columns of layer 0
  at::Tensor first_features;             // (width0, feat_dim): direct path only
};

// Per-thread working memory for one tile.
template <typename scalar_t>
struct BackwardScratch {
  // acts[l]: output of layer l after ReLU, l = 0 .. L-2 (flat); in the bf16 mode only layer 0's
  // and the last hidden layer's (the others are bf16_acts alone).
  std::vector<at::Tensor> acts;
  at::Tensor pred;               // last layer's output (rows x out_dim, flat)
  // Output gradients, ping-pong: rows x width, or rows of pitch activation_pitch(width) where the
  // bf16 mode's products write them.
  at::Tensor grad_a, grad_b;
  at::Tensor unfolded;           // direct path: gathered features (rows x feat_dim, flat)
  at::Tensor extra;              // (rows x 4): rel_y, rel_x, cell_y*H, cell_x*W
  at::Tensor grad_extra;         // (rows x 4)
  std::vector<Neighbour<scalar_t>> neighbours;
  std::vector<scalar_t> cell;
  std::vector<char> valid;
  std::vector<scalar_t> grad_blend;
  // The bf16 mode: layers 0 .. L-2's activations as bf16 rows (pitch activation_pitch(width)); an
  // output gradient rounded to bf16 rows; an output gradient and an activation packed in row
  // pairs (bf16::pack_row_pairs).
  std::vector<std::vector<uint16_t>> bf16_acts;
  std::vector<uint16_t> g_rows, g_pairs, a_pairs;

  BackwardScratch(const QueryPlan<scalar_t>& p, const at::TensorOptions& opts, bool bf16)
      : neighbours(kTileRows), cell(2 * kTileRows), valid(kTileRows), grad_blend(kTileRows) {
    const int num_layers = static_cast<int>(p.weights.size());
    for (int l = 0; l + 1 < num_layers; ++l) {
      const bool used = !bf16 || l == 0 || l + 2 == num_layers;
      acts.push_back(used ? at::empty({kTileRows * p.shape.layer_widths[l]}, opts) : at::Tensor());
    }
    pred = at::empty({kTileRows * p.shape.out_dim}, opts);
    const int64_t pitch = bf16::activation_pitch(p.max_width);
    grad_a = at::empty({kTileRows * pitch}, opts);
    grad_b = at::empty({kTileRows * pitch}, opts);
    if (bf16) {
      for (int l = 0; l + 1 < num_layers; ++l) {
        bf16_acts.emplace_back(kTileRows * bf16::activation_pitch(p.shape.layer_widths[l]));
      }
      g_rows.resize(kTileRows * pitch);
      g_pairs.resize((kTileRows + 1) / 2 * pitch * 2);
      a_pairs.resize(g_pairs.size());
    }
    if (!p.precomputed) unfolded = at::empty({kTileRows * p.shape.feat_dim}, opts);
    extra = at::empty({kTileRows, 4}, opts);
    grad_extra = at::empty({kTileRows, 4}, opts);
  }
};

// What a tile hands over for the per-cell scatter after its wave: the rows' gradients with respect to
// the first-layer map (precomputed path) or to the unfolded features (direct path), and their cells.
template <typename scalar_t>
struct WaveRows {
  at::Tensor rows;               // (kWaveTiles * kTileRows, width): tile t at row t * kTileRows
  std::vector<int64_t> iy, ix;   // per row
  std::vector<int64_t> count;    // rows per tile
};

template <typename scalar_t>
struct BackwardPlan {
  QueryPlan<scalar_t> q;
  BackwardNeeds needs;
  Strided3<scalar_t> grad_out{};
  bool feat_unfold = true;
  // Where the per-cell scatter goes: grad_map (H*W, width0) of the current image (precomputed path)
  // or grad_feat (direct path).
  bool scatter = false;
  // The bf16 mode (precision "bf16" on a CPU with bf16 products): each layer between hidden
  // layers (l = 1 .. L-2, at index l - 1) packed as the bf16 forward packs it, for the forward
  // again, and its transpose (in, out) packed without bias, for the input gradient G W. Empty: the
  // exact backward.
  std::vector<bf16::PackedLayer> bf16_hidden, bf16_transposed;
  bool bf16() const { return !bf16_hidden.empty(); }
};

// The bf16 mode's forward again, exactly as the bf16 forward computes it (tile_mlp_bf16 of the
// forward kernel): layer 0 in float32 (s.acts[0]), its output and each hidden layer's rounded to bf16
// (kept in s.bf16_acts), the last layer in float32 into s.pred; and the last hidden layer's
// activations widened to float32 (s.acts[L-2]) for the last layer's gradients.
template <typename scalar_t>
void tile_mlp_bf16_keep(const BackwardPlan<scalar_t>& bp, const scalar_t* map, int64_t b,
                        int64_t rows, BackwardScratch<scalar_t>& s) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const QueryPlan<float>& p = bp.q;
    at::Tensor act0 = rows_view(s.acts[0], rows, p.shape.layer_widths[0]);
    tile_first_layer(p, map, b, rows, s.neighbours.data(), s.cell.data(), s.unfolded,
                     bp.feat_unfold, act0);
    const uint16_t* last_hidden =
        tile_mlp_bf16(p, bp.bf16_hidden, act0.const_data_ptr<float>(), rows,
                      [&](int l) { return s.bf16_acts[l].data(); },
                      s.pred.template data_ptr<float>());
    const int last = static_cast<int>(p.weights.size()) - 1;
    const int64_t in_w = p.shape.layer_widths[last - 1];
    bf16::widen_rows(last_hidden, bf16::activation_pitch(in_w), rows, in_w,
                     s.acts[last - 1].template data_ptr<float>(), in_w);
  } else {
    TORCH_CHECK(false, "liif_cuda.query backward: the bf16 mode takes float32 tensors");
  }
}

// The bf16 mode's step through hidden layer l (between hidden layers): with G its output gradient
// (rows x out_w, float32, rows G.stride(0) apart), adds G^T A to `weight_grad` (out_w rows of pitch
// activation_pitch(in_w)) when given, and, when `grad_in` is given, writes the input gradient
// (G W masked by the ReLU of A) there (rows of pitch activation_pitch(in_w)). Both products take G
// rounded to bf16 and A (layer l - 1's bf16 activations) with float32 accumulation and results.
template <typename scalar_t>
void hidden_layer_backward_bf16(const BackwardPlan<scalar_t>& bp, int l, int64_t rows,
                                const at::Tensor& G, BackwardScratch<scalar_t>& s,
                                float* weight_grad, float* grad_in) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const int64_t out_w = bp.q.shape.layer_widths[l], in_w = bp.q.shape.layer_widths[l - 1];
    const int64_t out_pitch = bf16::activation_pitch(out_w);
    const int64_t in_pitch = bf16::activation_pitch(in_w);
    const float* g = G.const_data_ptr<float>();
    const uint16_t* a = s.bf16_acts[l - 1].data();
    if (weight_grad != nullptr) {
      // dW[o][i] += sum_r G[r][o] A[r][i]: both packed in pairs of rows, G read as its transpose.
      bf16::pack_row_pairs(g, G.stride(0), rows, out_w, s.g_pairs.data());
      bf16::pack_row_pairs(a, in_pitch, rows, in_w, s.a_pairs.data());
      bf16::product_float({s.g_pairs.data(), 2, 2 * out_pitch}, out_w, (rows + 1) / 2,
                          s.a_pairs.data(), in_pitch, /*accumulate=*/true, nullptr, 0,
                          weight_grad, in_pitch);
    }
    if (grad_in != nullptr) {
      bf16::round_rows(g, G.stride(0), rows, out_w, s.g_rows.data());
      const bf16::PackedLayer& wt = bp.bf16_transposed[l - 1];
      bf16::product_float({s.g_rows.data(), out_pitch, 2}, rows, (out_w + 1) / 2,
                          wt.weight.data(), wt.out_pitch, /*accumulate=*/false, a, in_pitch,
                          grad_in, in_pitch);
    }
  } else {
    TORCH_CHECK(false, "liif_cuda.query backward: the bf16 mode takes float32 tensors");
  }
}

// One tile: recompute, back-propagate, accumulate into `slot`, and hand the per-cell rows to `wave`.
template <typename scalar_t>
void backward_tile(const BackwardPlan<scalar_t>& bp, const scalar_t* map, int64_t b,
                   int64_t q0, int64_t nq, BackwardScratch<scalar_t>& s, GradSlot<scalar_t>& slot,
                   WaveRows<scalar_t>& wave, int64_t wave_tile, scalar_t* grad_coords,
                   scalar_t* grad_cells) {
  const QueryPlan<scalar_t>& p = bp.q;
  const BackwardNeeds& need = bp.needs;
  const int nn = p.grid.num_neighbours;
  const int64_t rows = nq * nn;
  const int num_layers = static_cast<int>(p.weights.size());
  const int64_t od = p.shape.out_dim;
  const int lowest = need.lowest_layer();

  // 1. Geometry, and the rank-4 input of layer 0's coordinate and cell columns.
  tile_geometry(p, b, q0, nq, s.neighbours.data(), s.valid.data(), s.cell.data());
  scalar_t* extra = s.extra.template data_ptr<scalar_t>();
  for (int64_t r = 0; r < rows; ++r) {
    extra[4 * r + 0] = s.neighbours[r].rel_y;
    extra[4 * r + 1] = s.neighbours[r].rel_x;
    extra[4 * r + 2] = s.cell[2 * (r / nn)];
    extra[4 * r + 3] = s.cell[2 * (r / nn) + 1];
  }

  // 2. The forward again, keeping every layer's activations (the last layer's output is `pred`).
  if (bp.bf16()) {
    tile_mlp_bf16_keep(bp, map, b, rows, s);
  } else {
    tile_mlp(p, map, b, rows, s.neighbours.data(), s.cell.data(), s.unfolded,
             bp.feat_unfold,
             [&](int l) -> at::Tensor& { return l + 1 < num_layers ? s.acts[l] : s.pred; });
  }

  // 3. Blend: out_q = sum_k pred_k * weight_k. The predictions' gradient, and the blend weights'.
  const scalar_t* pred = s.pred.template const_data_ptr<scalar_t>();
  at::Tensor g_top = rows_view(s.grad_a, rows, od);
  scalar_t* gp = g_top.template data_ptr<scalar_t>();
  for (int64_t i = 0; i < nq; ++i) {
    for (int k = 0; k < nn; ++k) {
      const int64_t r = i * nn + k;
      scalar_t blend_grad = scalar_t(0);
      for (int64_t c = 0; c < od; ++c) {
        const scalar_t g = s.valid[i] ? bp.grad_out.at(b, q0 + i, c) : scalar_t(0);
        gp[r * od + c] = g * s.neighbours[r].weight;
        blend_grad += g * pred[r * od + c];
      }
      s.grad_blend[r] = blend_grad;
    }
  }

  // 4. Down the layers: weight and bias gradients, then the input gradient through the ReLU.
  at::Tensor* g = &s.grad_a;  // holds G (unless G is the wave's rows)
  at::Tensor* g_next = &s.grad_b;
  // G0, layer 0's output gradient, goes straight into the wave's buffer where the per-cell scatter
  // takes it (precomputed path).
  const int64_t base = wave_tile * kTileRows;
  const bool g0_in_wave = map != nullptr && bp.scatter;
  at::Tensor G = g_top;
  for (int l = num_layers - 1; l >= 1 && l >= lowest; --l) {
    const int64_t in_w = p.shape.layer_widths[l - 1];
    if (need.bias[l]) slot.bias[l].add_(G.sum(0, false, at::kDouble));
    if (bp.bf16() && l + 1 < num_layers) {
      // The bf16 mode's products between hidden layers (bf16 operands, float32 results).
      const int64_t in_pitch = bf16::activation_pitch(in_w);
      const bool input_grad = l != lowest;
      // G0 straight into the wave's buffer where its rows need no padding.
      const bool into_wave = l == 1 && g0_in_wave;
      at::Tensor G_in = !input_grad ? at::Tensor()
                        : into_wave && in_pitch == in_w ? wave.rows.narrow(0, base, rows)
                                                        : rows_view(*g_next, rows, in_w, in_pitch);
      hidden_layer_backward_bf16(
          bp, l, rows, G, s,
          need.weight[l] ? reinterpret_cast<float*>(slot.weight[l].data_ptr()) : nullptr,
          input_grad ? reinterpret_cast<float*>(G_in.data_ptr()) : nullptr);
      if (!input_grad) break;
      if (into_wave && in_pitch != in_w) wave.rows.narrow(0, base, rows).copy_(G_in);
      G = G_in;
      std::swap(g, g_next);
      continue;
    }
    const at::Tensor A = rows_view(s.acts[l - 1], rows, in_w);
    if (need.weight[l]) slot.weight[l].addmm_(G.t(), A);
    if (l == lowest) break;
    at::Tensor G_in = l == 1 && g0_in_wave ? wave.rows.narrow(0, base, rows)
                                           : rows_view(*g_next, rows, in_w);
    at::mm_out(G_in, G, p.weights[l]);
    relu_backward(G_in.template data_ptr<scalar_t>(), A.template const_data_ptr<scalar_t>(),
                  rows * in_w);
    G = G_in;
    std::swap(g, g_next);
  }
  if (lowest != 0) return;

  // 5. Layer 0: G0 is the gradient of its output before the ReLU (rows x width0).
  if (num_layers == 1 && g0_in_wave) wave.rows.narrow(0, base, rows).copy_(G);
  const at::Tensor G0 = G;
  const at::Tensor X = s.extra.narrow(0, 0, rows);
  if (need.bias[0]) slot.bias[0].add_(G0.sum(0, false, at::kDouble));
  if (need.weight[0]) slot.first_extra.addmm_(X.t(), G0);
  if (bp.scatter || (map == nullptr && need.weight[0])) {
    if (map == nullptr) {
      const at::Tensor U = rows_view(s.unfolded, rows, p.shape.feat_dim);
      if (need.weight[0]) slot.first_features.addmm_(G0.t(), U);
      if (need.feat) {
        at::Tensor grad_u = wave.rows.narrow(0, base, rows);
        at::mm_out(grad_u, G0, p.first_feature_weight);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      wave.iy[base + r] = s.valid[r / nn] ? s.neighbours[r].iy : -1;  // -1: contributes nothing
      wave.ix[base + r] = s.neighbours[r].ix;
    }
    wave.count[wave_tile] = rows;
  }
  if (!need.coords && !need.cells) return;

  // 6. The coordinate and cell columns' input gradient, then the geometry: relative coordinates
  //    (directly and through the areas of the blend weights) and scaled cells.
  at::Tensor GX = s.grad_extra.narrow(0, 0, rows);
  at::mm_out(GX, G0, p.first_extra_columns.t());
  const scalar_t* gx = GX.template const_data_ptr<scalar_t>();
  const scalar_t H = p.grid.size_y, W = p.grid.size_x;
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t q = q0 + i;
    scalar_t* gc = grad_coords + (b * p.shape.queries + q) * 2;
    if (!s.valid[i]) {
      if (need.coords) gc[0] = gc[1] = std::numeric_limits<scalar_t>::quiet_NaN();
      if (need.cells) {
        scalar_t* gl = grad_cells + (b * p.shape.queries + q) * 2;
        gl[0] = gl[1] = scalar_t(0);
      }
      continue;
    }
    if (need.coords) {
      scalar_t grad_rel_y[kMaxNeighbours], grad_rel_x[kMaxNeighbours];
      for (int k = 0; k < nn; ++k) {
        grad_rel_y[k] = gx[4 * (i * nn + k) + 0];
        grad_rel_x[k] = gx[4 * (i * nn + k) + 1];
      }
      coordinate_gradient(p.grid, &s.neighbours[i * nn], grad_rel_y, grad_rel_x,
                          &s.grad_blend[i * nn], gc);
    }
    if (need.cells) {
      scalar_t cy = scalar_t(0), cx = scalar_t(0);
      for (int k = 0; k < nn; ++k) {
        cy += gx[4 * (i * nn + k) + 2];
        cx += gx[4 * (i * nn + k) + 3];
      }
      scalar_t* gl = grad_cells + (b * p.shape.queries + q) * 2;
      gl[0] = cy * H;
      gl[1] = cx * W;
    }
  }
}

template <typename scalar_t>
std::vector<at::Tensor> query_backward_impl(const at::Tensor& grad_out, const at::Tensor& feat,
                                            const at::Tensor& coords,
                                            const c10::optional<at::Tensor>& cells,
                                            const std::vector<at::Tensor>& weights,
                                            const std::vector<at::Tensor>& biases,
                                            bool local_ensemble, bool feat_unfold,
                                            bool cell_decode, const BackwardNeeds& needs,
                                            const QueryShape& shape, bool bf16,
                                            const at::Tensor& saved_map) {
  BackwardPlan<scalar_t> bp;
  bp.q = make_query_plan<scalar_t>(feat, coords, cells, weights, biases, local_ensemble,
                                   cell_decode, shape);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (bf16) bp.bf16_hidden = pack_bf16_hidden_layers(bp.q);
    for (size_t l = 1; bf16 && l + 1 < weights.size(); ++l) {
      const at::Tensor wt = bp.q.weights[l].t().contiguous();
      const int64_t out = wt.size(1), in = wt.size(0);
      const std::vector<float> no_bias(in, 0.0f);
      bp.bf16_transposed.push_back(bf16::pack_layer(wt.const_data_ptr<float>(), no_bias.data(),
                                                    in, out));
    }
  }
  bp.needs = needs;
  bp.grad_out = strided3<scalar_t>(grad_out);
  bp.feat_unfold = feat_unfold;
  const QueryPlan<scalar_t>& p = bp.q;
  const int num_layers = static_cast<int>(weights.size());
  const int64_t width0 = shape.layer_widths[0];
  const int64_t C = shape.channels, H = shape.height, W = shape.width;
  const auto opts = feat.options();

  // Outputs, zero where they accumulate.
  at::Tensor grad_feat = needs.feat ? at::zeros({shape.batch, C, H, W}, opts) : at::Tensor();
  at::Tensor grad_coords = needs.coords ? at::empty({shape.batch, shape.queries, 2}, opts)
                                        : at::Tensor();
  at::Tensor grad_cells = needs.cells ? at::empty({shape.batch, shape.queries, 2}, opts)
                                      : at::Tensor();
  at::Tensor grad_first_features;  // (width0, feat_dim), precomputed path: from the convolution
  const int lowest = needs.lowest_layer();
  const bool direct = !p.precomputed;
  // The per-cell scatter: the map's gradient feeds feat's and the feature columns' (precomputed
  // path); the unfolded features' gradient feeds feat's (direct path).
  bp.scatter = lowest == 0 && (direct ? needs.feat : (needs.feat || needs.first_feature_columns()));

  const int64_t queries_per_tile = kTileRows / p.grid.num_neighbours;
  const int64_t tiles = (shape.queries + queries_per_tile - 1) / queries_per_tile;
  const int64_t slots_used = std::min<int64_t>(kWaveTiles, std::max<int64_t>(tiles, 1));
  std::vector<GradSlot<scalar_t>> slots(slots_used);
  for (GradSlot<scalar_t>& slot : slots) {
    slot.weight.resize(num_layers);
    slot.bias.resize(num_layers);
    for (int l = 0; l < num_layers; ++l) {
      // The bf16 mode's products write whole 32-column blocks: rows of pitch
      // activation_pitch(in) (the padding columns stay zero).
      const bool padded = bp.bf16() && l + 1 < num_layers;
      const int64_t out = p.weights[l].size(0), in = p.weights[l].size(1);
      if (needs.weight[l] && l > 0) {
        slot.weight[l] = at::zeros({out, padded ? bf16::activation_pitch(in) : in}, opts);
      }
      if (needs.bias[l]) slot.bias[l] = at::zeros_like(p.biases[l], at::kDouble);
    }
    if (needs.weight[0]) {
      slot.first_extra = at::zeros({4, width0}, opts);
      if (direct) slot.first_features = at::zeros({width0, shape.feat_dim}, opts);
    }
  }
  WaveRows<scalar_t> wave;
  if (bp.scatter || (direct && needs.weight[0])) {
    const int64_t row_width = direct ? shape.feat_dim : width0;
    wave.rows = at::empty({kWaveTiles * kTileRows, row_width}, opts);
    wave.iy.assign(kWaveTiles * kTileRows, -1);
    wave.ix.assign(kWaveTiles * kTileRows, 0);
    wave.count.assign(kWaveTiles, 0);
  }
  const int k = feat_unfold ? 3 : 1;
  // The feature columns as a convolution's weight, for the map's gradient (channels-last; `to`
  // keeps the layout).
  const at::ScalarType conv_dtype = bp.bf16() ? at::kBFloat16 : feat.scalar_type();
  const at::Tensor conv_filter = direct ? at::Tensor() : p.first_feature_filter.to(conv_dtype);

  std::vector<std::unique_ptr<BackwardScratch<scalar_t>>> scratch(at::get_num_threads());
  scalar_t* gc = needs.coords ? grad_coords.data_ptr<scalar_t>() : nullptr;
  scalar_t* gl = needs.cells ? grad_cells.data_ptr<scalar_t>() : nullptr;
  if (lowest < num_layers) {
    for (int64_t b = 0; b < shape.batch; ++b) {
      // The forward's map where it was saved (the same numbers), else made again.
      at::Tensor map;
      if (!direct) {
        map = saved_map.defined() ? saved_map[b]
                                  : precompute_first_layer<scalar_t>(feat[b], p);
      }
      const scalar_t* map_data = direct ? nullptr : map.const_data_ptr<scalar_t>();
      at::Tensor grad_map = bp.scatter && !direct ? at::zeros({H * W, width0}, opts) : at::Tensor();
      for (int64_t first_tile = 0; first_tile < tiles; first_tile += kWaveTiles) {
        const int64_t wave_tiles = std::min(kWaveTiles, tiles - first_tile);
        std::atomic<int64_t> next{0};
        at::parallel_for(0, wave_tiles, 1, [&](int64_t, int64_t) {
          at::AutoDispatchBelowADInplaceOrView below_autograd;
          std::unique_ptr<BackwardScratch<scalar_t>>& mine = scratch[at::get_thread_num()];
          if (!mine) mine = std::make_unique<BackwardScratch<scalar_t>>(p, opts, bp.bf16());
          for (int64_t w = next++; w < wave_tiles; w = next++) {
            const int64_t t = first_tile + w;
            const int64_t q0 = t * queries_per_tile;
            const int64_t nq = std::min(queries_per_tile, shape.queries - q0);
            backward_tile(bp, map_data, b, q0, nq, *mine, slots[t % kWaveTiles], wave, w,
                          gc, gl);
          }
        });
        // The wave's per-cell rows, added in tile and row order.
        if (wave.rows.defined() && (bp.scatter)) {
          const scalar_t* src = wave.rows.template const_data_ptr<scalar_t>();
          const int64_t rw = wave.rows.size(1);
          if (!direct) {
            // Threads take separate column blocks, each adding every row in order.
            scalar_t* dst = grad_map.template data_ptr<scalar_t>();
            at::parallel_for(0, width0, 64, [&](int64_t j0, int64_t j1) {
              for (int64_t w = 0; w < wave_tiles; ++w) {
                for (int64_t r = w * kTileRows; r < w * kTileRows + wave.count[w]; ++r) {
                  if (wave.iy[r] < 0) continue;
                  scalar_t* d = dst + (wave.iy[r] * W + wave.ix[r]) * width0;
                  const scalar_t* s = src + r * rw;
                  for (int64_t j = j0; j < j1; ++j) d[j] += s[j];
                }
              }
            });
          } else {
            scalar_t* dst = grad_feat.template data_ptr<scalar_t>() + b * C * H * W;
            for (int64_t w = 0; w < wave_tiles; ++w) {
              for (int64_t r = w * kTileRows; r < w * kTileRows + wave.count[w]; ++r) {
                if (wave.iy[r] < 0) continue;
                const scalar_t* s = src + r * rw;
                for (int64_t c = 0; c < C; ++c) {
                  for (int64_t ky = 0; ky < k; ++ky) {
                    const int64_t y = wave.iy[r] + ky - k / 2;
                    for (int64_t kx = 0; kx < k; ++kx) {
                      const int64_t x = wave.ix[r] + kx - k / 2;
                      if (y < 0 || y >= H || x < 0 || x >= W) continue;
                      dst[(c * H + y) * W + x] += s[(c * k + ky) * k + kx];
                    }
                  }
                }
              }
            }
          }
          std::fill(wave.count.begin(), wave.count.end(), 0);
        }
      }
      // Through the convolution that made the map: feat's and the feature columns' gradients.
      // All operands channels-last, as the map's gradient is: oneDNN convolves them about 1.4x
      // faster than mixed layouts. In the bf16 mode with bf16 operands and results (oneDNN's bf16
      // convolution, as under torch.autocast: about half the time of the float32 one here).
      if (grad_map.defined()) {
        const at::Tensor g_map =
            grad_map.view({1, H, W, width0}).permute({0, 3, 1, 2}).to(conv_dtype);
        const at::Tensor input =
            feat.narrow(0, b, 1).to(conv_dtype).contiguous(at::MemoryFormat::ChannelsLast);
        auto result = at::convolution_backward(
            g_map, input, conv_filter, c10::nullopt, {1, 1}, {k / 2, k / 2}, {1, 1}, false,
            {0, 0}, 1, {needs.feat, needs.first_feature_columns(), false});
        if (needs.feat) grad_feat.narrow(0, b, 1).copy_(std::get<0>(result));
        if (needs.first_feature_columns()) {
          const at::Tensor gw =
              std::get<1>(result).to(feat.scalar_type()).reshape({width0, shape.feat_dim});
          grad_first_features = grad_first_features.defined() ? grad_first_features.add_(gw) : gw;
        }
      }
    }
  }

  // Sum the slots in slot order.
  std::vector<at::Tensor> grad_w(num_layers), grad_b(num_layers);
  for (int l = 0; l < num_layers; ++l) {
    if (needs.weight[l] && l > 0) {
      at::Tensor sum = at::zeros_like(p.weights[l], at::kDouble);
      for (const GradSlot<scalar_t>& s : slots) {
        sum.add_(s.weight[l].narrow(1, 0, p.weights[l].size(1)));
      }
      grad_w[l] = sum.to(feat.scalar_type());
    }
    if (needs.bias[l]) {
      at::Tensor sum = at::zeros_like(p.biases[l], at::kDouble);
      for (const GradSlot<scalar_t>& s : slots) sum.add_(s.bias[l]);
      grad_b[l] = sum.to(feat.scalar_type());
    }
  }
  if (needs.weight[0]) {
    at::Tensor extra = at::zeros({4, width0}, opts.dtype(at::kDouble));
    at::Tensor features = at::zeros({width0, shape.feat_dim}, opts.dtype(at::kDouble));
    for (const GradSlot<scalar_t>& s : slots) {
      extra.add_(s.first_extra);
      if (direct) features.add_(s.first_features);
    }
    if (!direct && grad_first_features.defined()) features = grad_first_features;
    const int64_t extra_cols = shape.in_dim - shape.feat_dim;  // 2, or 4 with cell_decode
    grad_w[0] = at::cat({features.to(feat.scalar_type()),
                         extra.narrow(0, 0, extra_cols).t().to(feat.scalar_type())},
                        1);
  }
  std::vector<at::Tensor> grads;
  grads.push_back(needs.feat ? grad_feat : feat.new_empty({0}));
  grads.push_back(needs.coords ? grad_coords : coords.new_empty({0}));
  grads.push_back(needs.cells ? grad_cells : coords.new_empty({0}));
  for (int l = 0; l < num_layers; ++l) {
    grads.push_back(needs.weight[l] ? grad_w[l] : weights[l].new_empty({0}));
  }
  for (int l = 0; l < num_layers; ++l) {
    grads.push_back(needs.bias[l] ? grad_b[l] : biases[l].new_empty({0}));
  }
  return grads;
}

std::vector<at::Tensor> query_backward_cpu(const at::Tensor& grad_out, const at::Tensor& feat,
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
  TORCH_CHECK(feat.device().is_cpu(),
              "liif_cuda.query backward (CPU kernel): feat must be a CPU tensor");
  const at::Tensor saved_map = saved_first_layer_map(first_layer_map, feat, shape);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int num_layers = static_cast<int>(w.size());
  const BackwardNeeds needs = backward_needs(needs_grad, num_layers, cell_decode);
  // The bf16 mode where the CPU multiplies bf16 natively (as the forward's bf16 path; with no
  // layer between hidden layers it changes nothing), else the exact backward.
  const bool bf16 = check_backward_precision(feat, precision) && num_layers > 2 &&
                    cpu::bf16::native_available();
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "liif_cuda_query_backward_cpu", [&] {
    grads = query_backward_impl<scalar_t>(grad_out.contiguous(), feat, coords, cells, w, bs,
                                          local_ensemble, feat_unfold, cell_decode, needs, shape,
                                          bf16, saved_map);
  });
  return grads;
}

}  // namespace
}  // namespace liif

TORCH_LIBRARY_IMPL(liif_cuda, CPU, m) { m.impl("query_backward", &liif::query_backward_cpu); }
