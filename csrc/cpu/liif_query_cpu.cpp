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

#include "liif_query_cpu_common.h"

namespace liif {
namespace {

using namespace cpu;

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
  tile_geometry(p, b, q0, nq, s.neighbours.data(), s.valid.data(), s.cell.data());

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


template <typename scalar_t>
void query_cpu_impl(const at::Tensor& feat, const at::Tensor& coords,
                    const c10::optional<at::Tensor>& cells, const std::vector<at::Tensor>& weights,
                    const std::vector<at::Tensor>& biases, bool local_ensemble, bool feat_unfold,
                    bool cell_decode, const QueryShape& shape, at::Tensor& out) {
  const QueryPlan<scalar_t> p =
      make_query_plan<scalar_t>(feat, coords, cells, weights, biases, local_ensemble, cell_decode,
                                shape);
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
