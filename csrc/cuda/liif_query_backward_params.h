// What the backward kernels (liif_query_backward_kernels.cuh) read and write for one chunk of
// queries: plain pointers, filled on the host by liif_query_backward.h. Rows are (query, neighbour)
// pairs of the chunk, row r = i * num_neighbours + k for the chunk's query i; queries are indexed
// over all batch elements (b * Q + q).
#pragma once

#include <cstdint>

#include "../liif_geometry.h"

namespace liif {
namespace cuda {

template <typename T>
struct BackwardChunkParams {
  FeatureGrid<T> grid;          // as the forward's (nearest index with the fused rounding)
  int64_t first_query = 0;      // the chunk: queries [first_query, first_query + queries)
  int64_t queries = 0;
  int64_t queries_per_image = 1;
  int64_t width0 = 0;           // layer 0's width
  int64_t out_dim = 0;
  int64_t pred_pitch = 0;       // row pitch of pred and grad_pred: out_dim, or padded (columns zero)
  int num_layers = 0;
  // Inputs.
  const T* coords = nullptr;        // (B * Q, 2)
  const T* cells = nullptr;         // (B * Q, 2), or null without cell_decode
  const T* grad_out = nullptr;      // (B * Q, out_dim)
  const T* map = nullptr;           // (B * H * W, width0): the first-layer map
  const T* first_bias = nullptr;    // (width0)
  const T* extra_columns = nullptr; // (4, width0): layer 0's rel_y, rel_x, cell_y, cell_x columns
  const T* pred = nullptr;          // (rows, pred_pitch): the last layer's output
  const T* grad_extra = nullptr;    // (rows, 4): gradient of layer 0's rank-4 input
  // Outputs (the geometry kernel's are inputs of the later ones).
  int* cell = nullptr;              // (rows): LR cell b*H*W + iy*W + ix, -1: query not decoded
  T* blend = nullptr;               // (rows)
  T* extra = nullptr;               // (rows, 4): rel_y, rel_x, cell_y * H, cell_x * W
  T* act0 = nullptr;                // (rows, width0): layer 0's output
  T* grad_pred = nullptr;           // (rows, pred_pitch), zero past out_dim
  T* grad_blend = nullptr;          // (rows)
  T* grad_coords = nullptr;         // (B * Q, 2), or null when not asked for
  T* grad_cells = nullptr;          // (B * Q, 2), or null when not asked for
};

// The backward kernels, in the order they run for a chunk.
enum class BackwardKernel { kGeometry, kFirstLayer, kBlend, kCoordinate };

// Their launch shape, on the GPU and in the host harness: blocks of kBackwardThreads threads, at most
// kBackwardMaxBlocks of them (the kernels loop over the rest).
constexpr int kBackwardThreads = 256;
constexpr int64_t kBackwardMaxBlocks = int64_t(1) << 16;

inline int64_t backward_blocks(int64_t threads) {
  const int64_t blocks = (threads + kBackwardThreads - 1) / kBackwardThreads;
  return blocks < kBackwardMaxBlocks ? blocks : kBackwardMaxBlocks;
}

}  // namespace cuda
}  // namespace liif
