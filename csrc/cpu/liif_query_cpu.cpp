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
//
// Precision "bf16" on a CPU with AVX512-BF16 (bf16_linear.h): layer 0 as above in float32, its
// output rounded to bf16, the hidden layers on the bf16 dot-product units, the last layer and the
// blend in float32: the rounding model of the CUDA tensor-core kernel. Elsewhere, and for "tf32" and
// "fp16", float32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../liif_query_entry_points.h"
#include "bf16_linear.h"
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
  std::vector<uint16_t> bf16_a, bf16_b;  // the bf16 path's activations

  TileScratch(const QueryPlan<scalar_t>& p, const at::TensorOptions& opts, bool bf16)
      : act_a(at::empty({kTileRows * p.max_width}, opts)),
        act_b(at::empty({kTileRows * p.max_width}, opts)),
        neighbours(kTileRows),
        cell(2 * kTileRows),
        valid(kTileRows) {
    if (!p.precomputed) unfolded = at::empty({kTileRows * p.shape.feat_dim}, opts);
    if (bf16) {
      bf16_a.resize(kTileRows * bf16::activation_pitch(p.max_width));
      bf16_b.resize(bf16_a.size());
    }
  }
};

// The bf16 path's MLP on a tile after layer 0 (in s.act_a), its bf16 activations alternating
// between two buffers, the last layer's output in s.act_b; returns s.act_b.
template <typename scalar_t>
const at::Tensor& tile_mlp_bf16(const QueryPlan<scalar_t>& p,
                                const std::vector<bf16::PackedLayer>& hidden, int64_t rows,
                                TileScratch<scalar_t>& s) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    cpu::tile_mlp_bf16(p, hidden, s.act_a.template const_data_ptr<float>(), rows,
                       [&](int l) { return l % 2 ? s.bf16_b.data() : s.bf16_a.data(); },
                       s.act_b.template data_ptr<float>());
    return s.act_b;
  } else {
    TORCH_CHECK(false, "liif_cuda.query: the CPU bf16 path takes float32 tensors");
  }
}

// The packed hidden layers of the bf16 path (none for an MLP of two layers), or nullopt where the
// path does not apply (float32): another precision or dtype, no native bf16 on this CPU, or an MLP of
// one layer.
template <typename scalar_t>
std::optional<std::vector<bf16::PackedLayer>> bf16_hidden_layers(const QueryPlan<scalar_t>& p,
                                                                 bool bf16) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (!bf16 || p.weights.size() < 2 || !bf16::native_available()) return std::nullopt;
    return pack_bf16_hidden_layers(p);
  } else {
    return std::nullopt;
  }
}

// Decodes queries [q0, q0 + nq) of batch element b into out (B, Q, out_dim).
// `precomputed_map` is P of batch element b (precompute_first_layer), when used.
template <typename scalar_t>
void decode_tile(const QueryPlan<scalar_t>& p, const scalar_t* precomputed_map, int64_t b,
                 int64_t q0, int64_t nq, bool feat_unfold,
                 const std::vector<bf16::PackedLayer>* bf16_hidden, TileScratch<scalar_t>& s,
                 scalar_t* out) {
  const int nn = p.grid.num_neighbours;
  const int64_t rows = nq * nn;

  // 1. Geometry of every (query, neighbour) row.
  tile_geometry(p, b, q0, nq, s.neighbours.data(), s.valid.data(), s.cell.data());

  // 2. The MLP, its activations alternating between two buffers.
  at::Tensor last;
  if (bf16_hidden != nullptr) {
    at::Tensor act0 = rows_view(s.act_a, rows, p.shape.layer_widths[0]);
    tile_first_layer(p, precomputed_map, b, rows, s.neighbours.data(), s.cell.data(),
                     s.unfolded, feat_unfold, act0);
    last = tile_mlp_bf16(p, *bf16_hidden, rows, s);
  } else {
    last = tile_mlp(p, precomputed_map, b, rows, s.neighbours.data(), s.cell.data(),
                    s.unfolded, feat_unfold,
                    [&](int l) -> at::Tensor& { return l % 2 ? s.act_b : s.act_a; });
  }

  // 3. Blend: out = sum_k pred_k * weight_k, accumulated in neighbour order like the reference.
  const int64_t od = p.shape.out_dim;
  const scalar_t* pred = last.const_data_ptr<scalar_t>();
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


// `saved_map`: where the precomputed path keeps every image's first-layer map, (B, H, W, width0),
// for the backward (query_saving_map); undefined to keep one image's at a time.
template <typename scalar_t>
void query_cpu_impl(const at::Tensor& feat, const at::Tensor& coords,
                    const c10::optional<at::Tensor>& cells, const std::vector<at::Tensor>& weights,
                    const std::vector<at::Tensor>& biases, bool local_ensemble, bool feat_unfold,
                    bool cell_decode, const QueryShape& shape, bool bf16, at::Tensor& out,
                    const at::Tensor& saved_map) {
  const QueryPlan<scalar_t> p =
      make_query_plan<scalar_t>(feat, coords, cells, weights, biases, local_ensemble, cell_decode,
                                shape);
  const std::optional<std::vector<bf16::PackedLayer>> bf16_hidden = bf16_hidden_layers(p, bf16);
  const int64_t queries_per_tile = kTileRows / p.grid.num_neighbours;
  const int64_t tiles = (shape.queries + queries_per_tile - 1) / queries_per_tile;
  scalar_t* out_data = out.data_ptr<scalar_t>();
  for (int64_t b = 0; b < shape.batch; ++b) {
    at::Tensor map;
    if (p.precomputed) {
      map = precompute_first_layer<scalar_t>(feat[b], p);
      if (saved_map.defined()) {
        saved_map[b].view_as(map).copy_(map);
        map = saved_map[b];
      }
    }
    const scalar_t* map_data = p.precomputed ? map.const_data_ptr<scalar_t>() : nullptr;
    // Each thread's call takes tiles from a shared counter rather than its own range, so a core
    // slowed by other work does not leave the other waiting at the end of the image.
    std::atomic<int64_t> next_tile{0};
    at::parallel_for(0, tiles, 1, [&](int64_t, int64_t) {
      // Worker threads do not inherit the caller's dispatch state: skip autograd in the ATen calls
      // below, as the calling thread does.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      TileScratch<scalar_t> scratch(p, feat.options(), bf16_hidden.has_value());
      for (int64_t t = next_tile++; t < tiles; t = next_tile++) {
        const int64_t q0 = t * queries_per_tile;
        const int64_t nq = std::min(queries_per_tile, shape.queries - q0);
        decode_tile(p, map_data, b, q0, nq, feat_unfold, bf16_hidden ? &*bf16_hidden : nullptr,
                    scratch, out_data);
      }
    });
  }
}

// query, and query_saving_map when `keep_map`: (out, the first-layer maps for the backward, or an
// empty tensor where the forward made none: the direct path, or nothing to compute).
std::tuple<at::Tensor, at::Tensor> query_cpu_keeping_map(
    const at::Tensor& feat, const at::Tensor& coords, const c10::optional<at::Tensor>& cells,
    at::TensorList weights, at::TensorList biases, bool local_ensemble, bool feat_unfold,
    bool cell_decode, c10::string_view precision, c10::string_view backward_precision,
    bool keep_map) {
  const std::vector<at::Tensor> w = weights.vec(), bs = biases.vec();
  const QueryShape shape = check_query_inputs(feat, coords, cells, w, bs, feat_unfold, cell_decode);
  // "bf16" runs the bf16 path where the CPU has it; every other precision computes float32 here.
  const bool bf16 = check_precision(feat, precision) == kPrecisionBf16;
  check_backward_precision(feat, backward_precision);  // used by autograd only
  TORCH_CHECK(feat.device().is_cpu(), "liif_cuda.query (CPU kernel): feat must be a CPU tensor");
  // No autocast kernel is registered: inside torch.autocast the dispatcher falls through to this one
  // with autocast still on, which must not reach the matrix products below.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::Tensor out = at::empty({shape.batch, shape.queries, shape.out_dim}, feat.options());
  at::Tensor saved_map = feat.new_empty({0});
  if (out.numel() == 0) return {out, saved_map};
  if (keep_map && first_layer_map_pays_off(shape, local_ensemble)) {
    saved_map = at::empty({shape.batch, shape.height, shape.width, shape.layer_widths[0]},
                          feat.options());
  }
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "liif_cuda_query_cpu", [&] {
    query_cpu_impl<scalar_t>(feat, coords, cells, w, bs, local_ensemble, feat_unfold, cell_decode,
                             shape, bf16, out, saved_map.numel() > 0 ? saved_map : at::Tensor());
  });
  return {out, saved_map};
}

}  // namespace
}  // namespace liif

TORCH_LIBRARY_IMPL(liif_cuda, CPU, m) {
  m.impl("query", &liif::query_entry<&liif::query_cpu_keeping_map>);
  m.impl("query_saving_map", &liif::query_saving_map_entry<&liif::query_cpu_keeping_map>);
}
