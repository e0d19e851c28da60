// What the CUDA query kernels take and how they are launched: the parameter block, the shared-memory
// layout and the choice between the specialised and the generic kernel. Plain C++ without torch or
// CUDA headers, so that the CUDA launcher (liif_query_kernels.cu), the Tensor-level wrapper
// (liif_query_cuda.cpp) and the host execution harness (tests/harness) share one definition.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../liif_geometry.h"

namespace liif {
namespace cuda {

constexpr int kThreadsPerBlock = 256;
// Linear layers the parameter block describes (the widths travel by value so that a launch needs
// no host-to-device copy and can be captured in a CUDA graph).
constexpr int kMaxLayers = 64;

// The specialised kernel: every hidden layer 256 wide (the published MLP), 64 (query, neighbour)
// rows per block, weights streamed through shared memory in chunks of 16 input rows.
constexpr int kFastWidth = 256;
constexpr int kFastRows = 64;
constexpr int kFastChunk = 16;
// Its last layer keeps the rows' predictions in the weight buffers: 64 * out_dim <= 2 * 16 * 256.
constexpr int kFastMaxOutDim = 2 * kFastChunk * kFastWidth / kFastRows;

// The generic kernel: (query, neighbour) rows per block when they fit in shared memory.
constexpr int kGenericMaxRows = 64;

template <typename T>
struct QueryKernelParams {
  // Layer 0's feature part per LR cell, without bias: (B, H, W, width0) contiguous.
  const T* map = nullptr;
  const T* coords = nullptr;  // (B * Q, 2) contiguous
  const T* cells = nullptr;   // (B * Q, 2) contiguous, or nullptr without cell_decode
  // Layer 0's columns of rel_y, rel_x, cell_y * H, cell_x * W as four contiguous rows of width0
  // (the cell rows are zeros without cell_decode), and its bias.
  const T* extra_columns = nullptr;
  const T* first_bias = nullptr;
  // Layers 1 .. L-1: each weight transposed to (in, out) and stored one after the other; biases
  // likewise. Layer l's weight starts at sum_{m < l} in_m * out_m.
  const T* weights = nullptr;
  const T* biases = nullptr;
  T* out = nullptr;  // (B * Q, out_dim)
  FeatureGrid<T> grid{};
  int64_t total_queries = 0;  // B * Q
  int64_t queries_per_image = 0;
  int num_layers = 0;
  int widths[kMaxLayers] = {};  // output width of each layer; widths[num_layers - 1] = out_dim
  int act_pitch = 0;            // floats per activation row in shared memory
  int queries_per_block = 0;
};

enum class KernelPath : int { kNone = 0, kFast = 1, kGeneric = 2 };

struct LaunchPlan {
  KernelPath path = KernelPath::kNone;
  int queries_per_block = 0;
  int act_pitch = 0;
  int64_t blocks = 0;
  size_t shared_bytes = 0;
};

// Shared memory of one block, in this order: activation buffers, weight buffers (fast kernel),
// per row (LR cell index, rel_y, rel_x, blend weight), per query (cell_y, cell_x, state).
struct SharedLayout {
  int rows = 0;
  int queries = 0;
  int act_elements = 0;     // all activation buffers together
  int weight_elements = 0;  // the fast kernel's two weight chunks; 0 for the generic kernel
};

template <typename T>
inline size_t shared_bytes(const SharedLayout& s) {
  return sizeof(T) * (static_cast<size_t>(s.act_elements) + s.weight_elements + 3 * s.rows +
                      2 * s.queries) +
         sizeof(int) * (static_cast<size_t>(s.rows) + s.queries);
}

LIIF_HOST_DEVICE SharedLayout fast_layout(int num_neighbours) {
  return {kFastRows, kFastRows / num_neighbours, kFastRows * kFastWidth,
          2 * kFastChunk * kFastWidth};
}

LIIF_HOST_DEVICE SharedLayout generic_layout(int queries, int num_neighbours, int max_width) {
  const int rows = queries * num_neighbours;
  return {rows, queries, 2 * rows * max_width, 0};
}

// The specialised kernel runs the published MLP shape in float32: hidden layers all 256 wide.
template <typename T>
inline bool fast_path_applies(const QueryKernelParams<T>& p) {
  if (sizeof(T) != sizeof(float) || p.num_layers < 2) return false;
  for (int l = 0; l + 1 < p.num_layers; ++l) {
    if (p.widths[l] != kFastWidth) return false;
  }
  return p.widths[p.num_layers - 1] <= kFastMaxOutDim;
}

// Picks the kernel and its block size for a device that grants `max_shared_bytes` per block.
// Returns path kNone when not even one query's activations fit (an MLP thousands of units wide).
template <typename T>
inline LaunchPlan plan_launch(const QueryKernelParams<T>& p, size_t max_shared_bytes) {
  LaunchPlan plan;
  const int nn = p.grid.num_neighbours;
  if (fast_path_applies(p) && shared_bytes<float>(fast_layout(nn)) <= max_shared_bytes) {
    plan.path = KernelPath::kFast;
    plan.queries_per_block = kFastRows / nn;
    plan.act_pitch = kFastWidth;
    plan.shared_bytes = shared_bytes<float>(fast_layout(nn));
  } else {
    int max_width = 0;
    for (int l = 0; l < p.num_layers; ++l) max_width = max_width > p.widths[l] ? max_width : p.widths[l];
    for (int q = kGenericMaxRows / nn; q >= 1; --q) {
      const size_t bytes = shared_bytes<T>(generic_layout(q, nn, max_width));
      if (bytes <= max_shared_bytes) {
        plan.path = KernelPath::kGeneric;
        plan.queries_per_block = q;
        plan.act_pitch = max_width;
        plan.shared_bytes = bytes;
        break;
      }
    }
    if (plan.path == KernelPath::kNone) return plan;
  }
  plan.blocks = (p.total_queries + plan.queries_per_block - 1) / plan.queries_per_block;
  return plan;
}

}  // namespace cuda
}  // namespace liif
