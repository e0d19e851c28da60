// The CUDA kernels of the query's backward (liif_query_backward.h runs them around cuBLAS products):
// the per-row work that is neither a matrix product nor a convolution. One thread per query or per
// row of a chunk of queries (all batch elements flattened); no shared memory, no atomics, no
// barriers. Also compiled by the host compiler in the host execution harness (tests/harness), like
// liif_query_kernel.cuh: only blockIdx.x, blockDim.x, gridDim.x and threadIdx.x are used.
#pragma once

#include <cstdint>

#include "../liif_geometry.h"
#include "liif_query_backward_params.h"

namespace liif {
namespace cuda {

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Per query of the chunk: the neighbours' LR cells (-1 for every row of a query whose coordinate is
// not finite), blend weights and layer 0's rank-4 input (rel_y, rel_x, cell_y * H, cell_x * W; zeros
// for such a query), exactly as the forward kernels compute them (csrc/liif_geometry.h).
template <typename T>
__global__ void backward_geometry_kernel(const BackwardChunkParams<T> p) {
  const int nn = p.grid.num_neighbours;
  for (int64_t i = global_thread(); i < p.queries; i += grid_threads()) {
    const int64_t q = p.first_query + i;
    T cell[2] = {T(0), T(0)};
    if (p.cells != nullptr) scaled_cell(p.grid, p.cells[2 * q], p.cells[2 * q + 1], cell);
    const int64_t image = q / p.queries_per_image;
    // Each neighbour is stored as it is found (see visit_neighbours).
    const bool valid = visit_neighbours(
        p.grid, p.coords[2 * q], p.coords[2 * q + 1],
        [&](int k, int64_t iy, int64_t ix, T rel_y, T rel_x) {
          const int64_t r = i * nn + k;
          T* x = p.extra + 4 * r;
          p.cell[r] = static_cast<int>((image * p.grid.height + iy) * p.grid.width + ix);
          x[0] = rel_y;
          x[1] = rel_x;
          x[2] = cell[0];
          x[3] = cell[1];
        },
        [&](int k) -> T& { return p.blend[i * nn + k]; });
    if (!valid) {
      for (int k = 0; k < nn; ++k) {
        const int64_t r = i * nn + k;
        T* x = p.extra + 4 * r;
        p.cell[r] = -1;
        p.blend[r] = T(0);
        x[0] = x[1] = x[2] = x[3] = T(0);
      }
    }
  }
}

// Per (row, output) of layer 0: its LR cell's row of the first-layer map plus the bias and the
// coordinate and cell columns, in the forward kernels' order (liif_query_kernel.cuh, first_layer),
// then ReLU unless it is the only layer; zero for the rows of a query that is not decoded.
template <typename T>
__global__ void backward_first_layer_kernel(const BackwardChunkParams<T> p) {
  const int64_t width = p.width0;
  const int64_t total = p.queries * p.grid.num_neighbours * width;
  const T* wy = p.extra_columns;
  const T* wx = wy + width;
  const T* wcy = wx + width;
  const T* wcx = wcy + width;
  for (int64_t e = global_thread(); e < total; e += grid_threads()) {
    const int64_t r = e / width;
    const int64_t j = e - r * width;
    const int cell = p.cell[r];
    T v = T(0);
    if (cell >= 0) {
      const T* x = p.extra + 4 * r;
      v = p.map[static_cast<int64_t>(cell) * width + j] + p.first_bias[j];
      v = v + x[0] * wy[j] + x[1] * wx[j] + x[2] * wcy[j] + x[3] * wcx[j];
      if (p.num_layers > 1 && v < T(0)) v = T(0);  // keeps NaN, as torch.relu does
    }
    p.act0[e] = v;
  }
}

// Per row: the gradient of its prediction (the query's output gradient times the row's blend weight)
// and of its blend weight (the output gradient dotted with the prediction); zero for the rows of a
// query that is not decoded, whose output (NaN) does not depend on anything.
template <typename T>
__global__ void backward_blend_kernel(const BackwardChunkParams<T> p) {
  const int nn = p.grid.num_neighbours;
  const int64_t od = p.out_dim;
  const int64_t rows = p.queries * nn;
  for (int64_t r = global_thread(); r < rows; r += grid_threads()) {
    const T* g = p.grad_out + (p.first_query + r / nn) * od;
    const T* pred = p.pred + r * p.pred_pitch;
    T* gp = p.grad_pred + r * p.pred_pitch;
    const bool valid = p.cell[r] >= 0;
    const T w = p.blend[r];
    T blend_grad = T(0);
    for (int64_t c = 0; c < od; ++c) {
      const T go = valid ? g[c] : T(0);
      gp[c] = go * w;
      blend_grad += go * pred[c];
    }
    for (int64_t c = od; c < p.pred_pitch; ++c) gp[c] = T(0);
    p.grad_blend[r] = blend_grad;
  }
}

// Per query: the coordinate and cell gradients from the gradients of layer 0's rank-4 input
// (grad_extra, rows x 4) and of the blend weights; NaN coordinate gradients and zero cell gradients
// for a query whose coordinate is not finite (as the CPU kernel and the recompute backward).
template <typename T>
__global__ void backward_coordinate_kernel(const BackwardChunkParams<T> p) {
  const int nn = p.grid.num_neighbours;
  for (int64_t i = global_thread(); i < p.queries; i += grid_threads()) {
    const int64_t q = p.first_query + i;
    Neighbour<T> nb[kMaxNeighbours];
    const bool valid = query_neighbours(p.grid, p.coords[2 * q], p.coords[2 * q + 1], nb);
    const T* gx = p.grad_extra + 4 * i * nn;
    if (p.grad_coords != nullptr) {
      T* gc = p.grad_coords + 2 * q;
      if (valid) {
        T grad_rel_y[kMaxNeighbours], grad_rel_x[kMaxNeighbours];
        for (int k = 0; k < nn; ++k) {
          grad_rel_y[k] = gx[4 * k];
          grad_rel_x[k] = gx[4 * k + 1];
        }
        coordinate_gradient(p.grid, nb, grad_rel_y, grad_rel_x, p.grad_blend + i * nn, gc);
      } else {
        gc[0] = gc[1] = T(NAN);
      }
    }
    if (p.grad_cells != nullptr) {
      T cy = T(0), cx = T(0);
      if (valid) {
        for (int k = 0; k < nn; ++k) {
          cy += gx[4 * k + 2];
          cx += gx[4 * k + 3];
        }
      }
      p.grad_cells[2 * q] = cy * p.grid.size_y;
      p.grad_cells[2 * q + 1] = cx * p.grid.size_x;
    }
  }
}

}  // namespace cuda
}  // namespace liif
