// Fused LIIF query on the CPU: gather, relative coordinate and cell, MLP and four-neighbour blend in
// one pass over tiles of queries, never materialising the unfolded map or any per-query tensor of the
// whole query set.
//
// The first layer is split by its inputs (spec section 3):
//   - the 9C (or C) feature columns act on features of the LR cell only, so when there are more
//     (query, neighbour) rows than LR pixels they are computed once per pixel as a 3x3 (or 1x1)
//     convolution, the "precomputed first-layer map" P (one batch element at a time, H x (W+2) x width);
//     otherwise each row gathers its unfolded feature vector and multiplies it in the tile;
//   - the coordinate and cell columns add a rank-4 term per row.
// Each tile of kTileRows (query, neighbour) rows then runs the remaining layers as in-cache matrix
// products (ATen/BLAS, single-threaded inside the parallel region) and blends the four predictions.
// Tiles are distributed over threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "../liif_geometry.h"
#include "../liif_query_checks.h"
#include "grid_sample_rounding.h"

namespace liif {
namespace {

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

// Per-thread working memory of one tile.
template <typename scalar_t>
struct TileScratch {
  at::Tensor act_a, act_b, unfolded;
  std::vector<Neighbour<scalar_t>> neighbours;
  std::vector<scalar_t> cell;  // (cell_y*H, cell_x*W) per query
  std::vector<char> valid;     // coordinates finite

  TileScratch(const QueryPlan<scalar_t>& p, const at::TensorOptions& opts)
      : act_a(at::empty({kTileRows * p.max_width}, opts)),
        act_b(at::empty({kTileRows * p.max_width}, opts)),
        neighbours(kTileRows),
        cell(2 * kTileRows),
        valid(kTileRows) {
    if (!p.precomputed) unfolded = at::empty({kTileRows, p.shape.feat_dim}, opts);
  }
};

template <typename scalar_t>
at::Tensor rows_view(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// Decodes queries [q0, q0 + nq) of batch element b into out (B, Q, out_dim).
// `precomputed_map` is P of batch element b, (H, W + 2*pad, width0) flattened to rows, when used.
template <typename scalar_t>
void decode_tile(const QueryPlan<scalar_t>& p, const scalar_t* precomputed_map, int64_t map_pitch,
                 int64_t b, int64_t q0, int64_t nq, bool feat_unfold, TileScratch<scalar_t>& s,
                 scalar_t* out) {
  const int nn = p.grid.num_neighbours;
  const int64_t rows = nq * nn;
  const int64_t width0 = p.shape.layer_widths[0];
  const int num_layers = static_cast<int>(p.weights.size());

  // 1. Geometry of every (query, neighbour) row.
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t q = q0 + i;
    Neighbour<scalar_t>* nb = &s.neighbours[i * nn];
    s.valid[i] = query_neighbours(p.grid, p.coords.at(b, q, 0), p.coords.at(b, q, 1), nb);
    if (!s.valid[i]) {
      // The output of this query is NaN; give its rows a harmless cell so the tile can run unchanged.
      for (int k = 0; k < nn; ++k) {
        nb[k] = Neighbour<scalar_t>{0, 0, scalar_t(0), scalar_t(0), scalar_t(0)};
      }
    }
    if (p.cell_decode) {
      scaled_cell(p.grid, p.cells.at(b, q, 0), p.cells.at(b, q, 1), &s.cell[2 * i]);
    } else {
      s.cell[2 * i] = s.cell[2 * i + 1] = scalar_t(0);  // meets the zero cell columns
    }
  }

  // 2. Layer 0: feature part (precomputed row, or gathered unfolded vector times the feature
  //    columns), plus the coordinate and cell terms, plus ReLU unless it is the only layer, written
  //    in one pass over the row.
  const bool relu0 = num_layers > 1;
  scalar_t* a = s.act_a.template data_ptr<scalar_t>();
  if (precomputed_map == nullptr) {
    at::Tensor u = s.unfolded.narrow(0, 0, rows);
    scalar_t* ud = u.template data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      gather_unfolded(p, b, s.neighbours[r].iy, s.neighbours[r].ix, feat_unfold,
                      ud + r * p.shape.feat_dim);
    }
    at::Tensor act0 = rows_view<scalar_t>(s.act_a, rows, width0);
    at::addmm_out(act0, p.biases[0], u, p.first_feature_weight.t());
  }
  const scalar_t* wy = p.extra_column[0];
  const scalar_t* wx = p.extra_column[1];
  const scalar_t* wcy = p.extra_column[2];
  const scalar_t* wcx = p.extra_column[3];
  for (int64_t r = 0; r < rows; ++r) {
    const Neighbour<scalar_t>& nb = s.neighbours[r];
    scalar_t* row = a + r * width0;
    const scalar_t* src =
        precomputed_map != nullptr ? precomputed_map + (nb.iy * map_pitch + nb.ix) * width0 : row;
    const scalar_t* cell = &s.cell[2 * (r / nn)];
    first_layer_row(src, row, width0, nb.rel_y, nb.rel_x, wy, wx, cell[0], cell[1], wcy, wcx,
                    relu0);
  }

  // 3. Remaining layers: product, then bias and ReLU (not after the last layer) in one pass.
  at::Tensor* cur = &s.act_a;
  at::Tensor* nxt = &s.act_b;
  int64_t width = width0;
  for (int l = 1; l < num_layers; ++l) {
    const int64_t out_w = p.shape.layer_widths[l];
    at::Tensor dst = rows_view<scalar_t>(*nxt, rows, out_w);
    at::mm_out(dst, rows_view<scalar_t>(*cur, rows, width), p.weights[l].t());
    add_bias_relu(dst.template data_ptr<scalar_t>(), p.biases[l].template const_data_ptr<scalar_t>(),
                  rows, out_w, l + 1 < num_layers);
    std::swap(cur, nxt);
    width = out_w;
  }

  // 4. Blend: out = sum_k pred_k * weight_k, accumulated in neighbour order like the reference.
  const int64_t od = p.shape.out_dim;
  const scalar_t* pred = cur->const_data_ptr<scalar_t>();
  for (int64_t i = 0; i < nq; ++i) {
    scalar_t* o = out + (b * p.shape.queries + q0 + i) * od;
    if (!s.valid[i]) {
      std::fill(o, o + od, std::numeric_limits<scalar_t>::quiet_NaN());
      continue;
    }
    for (int64_t c = 0; c < od; ++c) {
      scalar_t acc = scalar_t(0);
      for (int k = 0; k < nn; ++k) {
        acc += pred[(i * nn + k) * od + c] * s.neighbours[i * nn + k].weight;
      }
      o[c] = acc;
    }
  }
}

// P for batch element b: the feature columns of layer 0 applied to every LR cell, bias included.
// Computed as one matrix product per 3x3 tap over a zero-padded channels-last copy of the map: with
// rows of pitch W + 2, tap (dy, dx) of output pixel (y, x) is input row (y + dy) * pitch + x + dx,
// so each tap is a single product over contiguous rows. The 2 extra columns per row are unused.
template <typename scalar_t>
at::Tensor precompute_first_layer(const at::Tensor& feat_b, const QueryPlan<scalar_t>& p,
                                  bool feat_unfold, int64_t* pitch) {
  const int64_t C = p.shape.channels, H = p.shape.height, W = p.shape.width;
  const int64_t pad = feat_unfold ? 1 : 0;
  const int64_t taps_per_side = 2 * pad + 1;
  *pitch = W + 2 * pad;
  const int64_t out_rows = H * *pitch;
  // Padded rows plus the 2*pad rows read by the last output row's unused columns.
  at::Tensor padded = at::zeros({(H + 2 * pad) * *pitch + 2 * pad, C}, feat_b.options());
  padded.narrow(0, 0, (H + 2 * pad) * *pitch)
      .view({H + 2 * pad, *pitch, C})
      .narrow(0, pad, H)
      .narrow(1, pad, W)
      .copy_(feat_b.permute({1, 2, 0}));
  // Feature columns c*taps + tap -> one contiguous (width0, C) matrix per tap.
  const int64_t width0 = p.shape.layer_widths[0];
  const at::Tensor tap_weights =
      p.first_feature_weight.view({width0, C, taps_per_side * taps_per_side})
          .permute({2, 0, 1})
          .contiguous();
  // A fresh buffer: `contiguous()` of the expanded bias would alias the bias itself for one row.
  at::Tensor map = at::empty({out_rows, width0}, feat_b.options());
  map.copy_(p.biases[0].unsqueeze(0).expand({out_rows, width0}));
  for (int64_t dy = 0; dy < taps_per_side; ++dy) {
    for (int64_t dx = 0; dx < taps_per_side; ++dx) {
      const int64_t tap = dy * taps_per_side + dx;
      map.addmm_(padded.narrow(0, dy * *pitch + dx, out_rows), tap_weights[tap].t());
    }
  }
  return map;
}

template <typename scalar_t>
void query_cpu_impl(const at::Tensor& feat, const at::Tensor& coords,
                    const c10::optional<at::Tensor>& cells, const std::vector<at::Tensor>& weights,
                    const std::vector<at::Tensor>& biases, bool local_ensemble, bool feat_unfold,
                    bool cell_decode, const QueryShape& shape, at::Tensor& out) {
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
  // Precompute when there are more (query, neighbour) rows than LR cells: then the per-cell product
  // is cheaper than the per-row one.
  const int64_t rows_per_image = shape.queries * p.grid.num_neighbours;
  p.precomputed = rows_per_image > shape.height * shape.width;

  const int64_t queries_per_tile = kTileRows / p.grid.num_neighbours;
  const int64_t tiles = (shape.queries + queries_per_tile - 1) / queries_per_tile;
  scalar_t* out_data = out.data_ptr<scalar_t>();
  for (int64_t b = 0; b < shape.batch; ++b) {
    at::Tensor map;
    int64_t pitch = 0;
    if (p.precomputed) map = precompute_first_layer<scalar_t>(feat[b], p, feat_unfold, &pitch);
    const scalar_t* map_data = p.precomputed ? map.const_data_ptr<scalar_t>() : nullptr;
    // Each thread's call takes tiles from a shared counter rather than its own range, so a core
    // slowed by other work does not leave the other waiting at the end of the image.
    std::atomic<int64_t> next_tile{0};
    at::parallel_for(0, tiles, 1, [&](int64_t, int64_t) {
      // Worker threads do not inherit the caller's dispatch state: skip autograd in the ATen calls
      // below, as the calling thread does.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      TileScratch<scalar_t> scratch(p, feat.options());
      for (int64_t t = next_tile++; t < tiles; t = next_tile++) {
        const int64_t q0 = t * queries_per_tile;
        const int64_t nq = std::min(queries_per_tile, shape.queries - q0);
        decode_tile(p, map_data, pitch, b, q0, nq, feat_unfold, scratch, out_data);
      }
    });
  }
}

at::Tensor query_cpu(const at::Tensor& feat, const at::Tensor& coords,
                     const c10::optional<at::Tensor>& cells, at::TensorList weights,
                     at::TensorList biases, bool local_ensemble, bool feat_unfold,
                     bool cell_decode, c10::string_view precision) {
  const std::vector<at::Tensor> w = weights.vec(), bs = biases.vec();
  const QueryShape shape = check_query_inputs(feat, coords, cells, w, bs, feat_unfold, cell_decode);
  // Every precision computes float32 here: the reduced ones are a CUDA tensor-core matter.
  check_precision(feat, precision);
  TORCH_CHECK(feat.device().is_cpu(), "liif_cuda.query (CPU kernel): feat must be a CPU tensor");
  // No autocast kernel is registered: inside torch.autocast the dispatcher falls through to this one
  // with autocast still on, which must not reach the matrix products below.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::Tensor out = at::empty({shape.batch, shape.queries, shape.out_dim}, feat.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "liif_cuda_query_cpu", [&] {
    query_cpu_impl<scalar_t>(feat, coords, cells, w, bs, local_ensemble, feat_unfold, cell_decode,
                             shape, out);
  });
  return out;
}

}  // namespace
}  // namespace liif

TORCH_LIBRARY_IMPL(liif_cuda, CPU, m) { m.impl("query", &liif::query_cpu); }
