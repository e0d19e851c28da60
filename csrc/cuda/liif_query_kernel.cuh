// The CUDA kernels of the fused LIIF query (after the first-layer map, see liif_query_cuda.cpp).
//
// One block decodes a tile of consecutive queries (all batch elements flattened) in four steps:
//   1. geometry: one thread per query finds its (up to) four LR cells, relative coordinates and blend
//      weights (csrc/liif_geometry.h, shared with the CPU kernel) and keeps them in shared memory;
//   2. layer 0: each (query, neighbour) row reads its LR cell's row of the precomputed map and adds the
//      bias and the coordinate and cell terms, then ReLU, into shared memory;
//   3. hidden layers, on shared-memory activations: in the specialised kernel (published shape, every
//      hidden layer 256 wide, float32) as a register-tiled product whose weights stream through two
//      shared-memory chunks; in the tensor-core kernel (same shape, tf32 / bf16 / fp16 operands,
//      float32 accumulation) as WMMA tiles with the weights streamed by asynchronous copies; in the
//      generic kernel (any widths, float32 or float64) one output per thread and step, reading the
//      weights through the cache;
//   4. last layer and blend, in T (float32 for the tensor-core kernel): predictions per row, then each
//      thread blends one (query, channel) over the neighbours in the reference's order and writes the
//      output. Nothing else reaches global memory.
//
// This file is also compiled by the host compiler inside the host execution harness (tests/harness),
// which runs the kernels without a GPU. It therefore uses only what the harness emulates: blockIdx.x,
// threadIdx.x, blockDim.x, __syncthreads(), __syncwarp(), dynamic shared memory
// (LIIF_DYNAMIC_SHARED), float2/float4, __shfl_xor_sync over a whole warp (load_geometry_by_row),
// and what liif_tensor_core.cuh names (operand types, WMMA fragments, asynchronous copies). No other
// warp primitives, no atomics or static __shared__ arrays.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../liif_geometry.h"
#include "liif_query_launch.h"
#include "liif_tensor_core.cuh"

#if defined(__CUDACC__)
// 128-byte alignment: WMMA fragment pointers must be 32-byte aligned (the offsets are, by layout).
#define LIIF_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#elif !defined(LIIF_HOST_EXECUTION_HARNESS)
#error "liif_query_kernel.cuh: compile with nvcc, or include tests/harness/cuda_host_emulation.h first"
#endif

namespace liif {
namespace cuda {

// How activations are stored in shared memory: as T itself in the float32 / float64 kernels
// (Operand<P> of liif_tensor_core.cuh for the tensor-core kernel).
template <typename T>
struct Exact {
  using storage = T;
  static __device__ __forceinline__ T store(T v) { return v; }
  static __device__ __forceinline__ T load(T v) { return v; }
};

// Pointers into one block's shared memory, in the order of SharedLayout (liif_query_launch.h).
// A is the type of the activations and weight chunks; geometry is in T.
template <typename T, typename A = T>
struct BlockShared {
  A* act;        // activation buffer(s)
  A* weights;    // the two weight chunks (reused for the last layer's predictions, in T)
  T* rel_y;      // per row
  T* rel_x;      // per row
  T* blend;      // per row: blend weight of the row's prediction
  T* cell_y;     // per query: cell_y * H (0 without cell_decode)
  T* cell_x;     // per query: cell_x * W
  int* cell;     // per row: LR cell b*H*W + iy*W + ix, or -1 for rows without a decodable query
  int* state;    // per query: 1 decode, 0 write NaN (non-finite coordinate), -1 past the last query
};

template <typename T, typename A = T>
__device__ __forceinline__ BlockShared<T, A> carve_shared(unsigned char* base,
                                                          const SharedLayout& l) {
  BlockShared<T, A> s;
  s.act = reinterpret_cast<A*>(base);
  s.weights = reinterpret_cast<A*>(base + l.act_bytes);
  T* t = reinterpret_cast<T*>(base + l.act_bytes + l.weight_bytes);
  s.rel_y = t;
  t += l.rows;
  s.rel_x = t;
  t += l.rows;
  s.blend = t;
  t += l.rows;
  s.cell_y = t;
  t += l.queries;
  s.cell_x = t;
  t += l.queries;
  s.cell = reinterpret_cast<int*>(t);
  s.state = s.cell + l.rows;
  return s;
}

// Step 1: geometry of the block's queries [first, first + queries), by `workers` threads of which
// this is `worker` (by default the whole block).
template <typename T, typename A>
__device__ void load_geometry(const QueryKernelParams<T>& p, const BlockShared<T, A>& s, int64_t first,
                              int queries, int worker = static_cast<int>(threadIdx.x),
                              int workers = static_cast<int>(blockDim.x)) {
  const int nn = p.grid.num_neighbours;
  for (int i = worker; i < queries; i += workers) {
    const int64_t q = first + i;
    T cell[2] = {T(0), T(0)};
    int state = -1;
    const int64_t image = q / p.queries_per_image;
    if (q < p.total_queries) {
      // Each neighbour goes to shared memory as it is found (see visit_neighbours).
      state = visit_neighbours(
                  p.grid, p.coords[2 * q], p.coords[2 * q + 1],
                  [&](int k, int64_t iy, int64_t ix, T rel_y, T rel_x) {
                    const int r = i * nn + k;
                    // The host checks that B * H * W fits an int.
                    s.cell[r] = static_cast<int>((image * p.grid.height + iy) * p.grid.width + ix);
                    s.rel_y[r] = rel_y;
                    s.rel_x[r] = rel_x;
                  },
                  [&](int k) -> T& { return s.blend[i * nn + k]; })
                  ? 1
                  : 0;
      if (p.cells != nullptr) scaled_cell(p.grid, p.cells[2 * q], p.cells[2 * q + 1], cell);
    }
    s.state[i] = state;
    s.cell_y[i] = cell[0];
    s.cell_x[i] = cell[1];
    if (state != 1) {
      for (int k = 0; k < nn; ++k) {
        const int r = i * nn + k;
        s.cell[r] = -1;
        s.rel_y[r] = s.rel_x[r] = s.blend[r] = T(0);
      }
    }
  }
}

// Step 1 for the mma.sync and wgmma kernels' tiles (32 queries, 128 rows): one thread per (query,
// neighbour) row rather than per query, so that four warps share what one did alone while the
// others waited (run 7: about 4,300 of the multicast kernel's 37,600 cycles per tile). Row
// r = nn i + k of the tile is neighbour k of query i, as load_geometry orders them. With the local
// ensemble a query's four rows are four neighbouring lanes: each thread has the others' areas by
// shuffles, sums the four in neighbour order and divides the opposite neighbour's area by the sum:
// visit_neighbours' operations on the same values, so the same bits. A block of Threads threads
// and tiles of queries * nn = kMmaRows rows, whole warps of them, every lane taking part.
template <int Threads, typename A>
__device__ void load_geometry_by_row(const QueryKernelParams<float>& p,
                                     const BlockShared<float, A>& s, int64_t first, int queries) {
  static_assert(Threads >= kMmaRows && kMmaRows % 32 == 0, "a thread per row, whole warps");
  const int nn = p.grid.num_neighbours;
  const int r = static_cast<int>(threadIdx.x);
  if (r >= queries * nn) return;  // the warps past the tile's rows
  const int i = r / nn, k = r - i * nn;
  const int64_t q = first + i;
  const bool exists = q < p.total_queries;
  float cy = 0.f, cx = 0.f;
  if (exists) {
    cy = p.coords[2 * q];
    cx = p.coords[2 * q + 1];
  }
  const bool located = exists && is_finite(cy) && is_finite(cx);
  int cell = -1;
  float rel_y = 0.f, rel_x = 0.f, area = 0.f;
  if (located) {
    const int64_t image = q / p.queries_per_image;
    area = locate_neighbour(p.grid, cy, cx, k, [&](int64_t iy, int64_t ix, float ry, float rx) {
      // The host checks that B * H * W fits an int.
      cell = static_cast<int>((image * p.grid.height + iy) * p.grid.width + ix);
      rel_y = ry;
      rel_x = rx;
    });
  }
  // What is known now is stored now (the blend weight needs the other rows' areas): the query's
  // state and scaled cell by its first row's thread.
  s.cell[r] = located ? cell : -1;
  s.rel_y[r] = rel_y;
  s.rel_x[r] = rel_x;
  if (k == 0) {
    float scaled[2] = {0.f, 0.f};
    if (exists && p.cells != nullptr) scaled_cell(p.grid, p.cells[2 * q], p.cells[2 * q + 1], scaled);
    s.state[i] = exists ? (located ? 1 : 0) : -1;
    s.cell_y[i] = scaled[0];
    s.cell_x[i] = scaled[1];
  }
  // The total area (stack(areas).sum(0), in neighbour order) and the opposite neighbour's area.
  float total = add_rn(0.f, area), opposite = area;
  if (nn == kMaxNeighbours) {
    // Lane k ^ m of the group holds neighbour k ^ m: am is neighbour k ^ m's area. Selects, not
    // an array indexed by k, which would go to local memory.
    const float a1 = __shfl_xor_sync(0xFFFFFFFFu, area, 1);
    const float a2 = __shfl_xor_sync(0xFFFFFFFFu, area, 2);
    const float a3 = __shfl_xor_sync(0xFFFFFFFFu, area, 3);
    auto neighbour_area = [&](int j) {
      const int m = j ^ k;
      return m == 0 ? area : m == 1 ? a1 : m == 2 ? a2 : a3;
    };
    total = add_rn(add_rn(add_rn(add_rn(0.f, neighbour_area(0)), neighbour_area(1)),
                          neighbour_area(2)),
                   neighbour_area(3));
    opposite = a3;  // neighbour 3 - k = k ^ 3
  }
  s.blend[r] = located ? opposite / total : 0.f;
}

// Step 2: layer 0 of every row into s.act (row pitch `pitch`), computed in T and stored as
// Op::storage; ReLU unless it is the only layer. Rows without a query get zeros, which keep the
// following layers finite.
template <typename T, typename Op = Exact<T>>
__device__ void first_layer(const QueryKernelParams<T>& p,
                            const BlockShared<T, typename Op::storage>& s, int rows, int pitch) {
  const int width = p.widths[0];
  const int nn = p.grid.num_neighbours;
  const bool relu = p.num_layers > 1;
  const T* wy = p.extra_columns;
  const T* wx = wy + width;
  const T* wcy = wx + width;
  const T* wcx = wcy + width;
  for (int e = static_cast<int>(threadIdx.x); e < rows * width; e += static_cast<int>(blockDim.x)) {
    const int r = e / width;
    const int j = e - r * width;
    const int cell = s.cell[r];
    T v = T(0);
    if (cell >= 0) {
      const int q = r / nn;
      v = p.map[static_cast<int64_t>(cell) * width + j] + p.first_bias[j];
      v = v + s.rel_y[r] * wy[j] + s.rel_x[r] * wx[j] + s.cell_y[q] * wcy[j] + s.cell_x[q] * wcx[j];
      // `v < 0 ? 0 : v` keeps NaN, as torch.relu does.
      if (relu && v < T(0)) v = T(0);
    }
    s.act[r * pitch + j] = Op::store(v);
  }
}

__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

// Step 3, specialised: act (64 x 256) <- relu(act @ wt + bias) in place, wt being (256 in, 256 out).
//
// Thread t = 32 * rg + cg computes rows {4rg .. 4rg+3, 32+4rg .. 32+4rg+3} and columns
// {4cg .. 4cg+3, 128+4cg .. 128+4cg+3}: 64 accumulators in registers. All lanes of a warp share rg,
// so their activation loads are broadcasts; their weight loads are consecutive float4s, free of bank
// conflicts, and so are the float4 stores of the result. The weights stream in chunks of kFastChunk
// input rows, double-buffered: chunk c+1 is fetched through registers while chunk c is multiplied.
__device__ __forceinline__ int fast_row(int rg, int i) { return (i < 4 ? 0 : 32 - 4) + 4 * rg + i; }

__device__ void fast_hidden_layer(const float* __restrict__ wt, const float* __restrict__ bias,
                                  float* act, float* wbuf) {
  constexpr int kChunkVectors = kFastChunk * kFastWidth / 4;
  constexpr int kVectorsPerThread = kChunkVectors / kThreadsPerBlock;
  constexpr int kChunks = kFastWidth / kFastChunk;
  static_assert(kChunkVectors % kThreadsPerBlock == 0, "a chunk is copied in whole float4s");
  const int tid = static_cast<int>(threadIdx.x);
  const int cg = tid % 32;
  const int rg = tid / 32;
  const float4* wt4 = reinterpret_cast<const float4*>(wt);
  float4* wbuf4 = reinterpret_cast<float4*>(wbuf);

  // Half a chunk in flight per thread at a time: the whole chunk would not fit 128 registers next
  // to the 64 accumulators.
  constexpr int kHalf = kVectorsPerThread / 2;
  float4 staged[kHalf];
  auto fetch = [&](int chunk, int half) {
#pragma unroll
    for (int v = 0; v < kHalf; ++v) {
      staged[v] = wt4[chunk * kChunkVectors + (half * kHalf + v) * kThreadsPerBlock + tid];
    }
  };
  auto store = [&](int chunk, int half) {
#pragma unroll
    for (int v = 0; v < kHalf; ++v) {
      wbuf4[(chunk & 1) * kChunkVectors + (half * kHalf + v) * kThreadsPerBlock + tid] = staged[v];
    }
  };
  fetch(0, 0);
  store(0, 0);
  fetch(0, 1);
  store(0, 1);
  __syncthreads();

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[i][c] = 0.f;
  }

  for (int chunk = 0; chunk < kChunks; ++chunk) {
    // Chunk + 1 goes to the other buffer, which nobody reads during this chunk: its first half is
    // fetched now and stored halfway through, the second half fetched then and stored at the end.
    const bool more = chunk + 1 < kChunks;
    if (more) fetch(chunk + 1, 0);
    const float* w = wbuf + (chunk & 1) * kFastChunk * kFastWidth;
    const float* a_chunk = act + chunk * kFastChunk;
#pragma unroll
    for (int kk = 0; kk < kFastChunk; kk += 2) {
      if (kk == kFastChunk / 2 && more) {
        store(chunk + 1, 0);
        fetch(chunk + 1, 1);
      }
      // Two inputs per activation load: float4 would halve the loads again but, with the staged
      // weights and the 64 accumulators, not fit 128 registers.
      float2 a[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        a[i] = *reinterpret_cast<const float2*>(a_chunk + fast_row(rg, i) * kFastWidth + kk);
      }
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const float* w_row = w + (kk + k) * kFastWidth;
        const float4 lo = *reinterpret_cast<const float4*>(w_row + 4 * cg);
        const float4 hi = *reinterpret_cast<const float4*>(w_row + 128 + 4 * cg);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float x = k == 0 ? a[i].x : a[i].y;
          acc[i][0] += x * lo.x;
          acc[i][1] += x * lo.y;
          acc[i][2] += x * lo.z;
          acc[i][3] += x * lo.w;
          acc[i][4] += x * hi.x;
          acc[i][5] += x * hi.y;
          acc[i][6] += x * hi.z;
          acc[i][7] += x * hi.w;
        }
      }
    }
    if (more) store(chunk + 1, 1);
    // Chunk `chunk + 1` is in place and every thread is done with chunk `chunk` (and, after the
    // last chunk, with the activations, which are overwritten next).
    __syncthreads();
  }

  const float4 bias_lo = *reinterpret_cast<const float4*>(bias + 4 * cg);
  const float4 bias_hi = *reinterpret_cast<const float4*>(bias + 128 + 4 * cg);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float* row = act + fast_row(rg, i) * kFastWidth;
    float4 lo, hi;
    lo.x = relu(acc[i][0] + bias_lo.x);
    lo.y = relu(acc[i][1] + bias_lo.y);
    lo.z = relu(acc[i][2] + bias_lo.z);
    lo.w = relu(acc[i][3] + bias_lo.w);
    hi.x = relu(acc[i][4] + bias_hi.x);
    hi.y = relu(acc[i][5] + bias_hi.y);
    hi.z = relu(acc[i][6] + bias_hi.z);
    hi.w = relu(acc[i][7] + bias_hi.w);
    *reinterpret_cast<float4*>(row + 4 * cg) = lo;
    *reinterpret_cast<float4*>(row + 128 + 4 * cg) = hi;
  }
  __syncthreads();
}

// Step 3, generic: dst = relu(src @ wt + bias) for `rows` rows, wt being (in, out).
template <typename T>
__device__ void generic_hidden_layer(const T* __restrict__ wt, const T* __restrict__ bias, int in,
                                     int out, const T* src, T* dst, int rows, int pitch) {
  for (int e = static_cast<int>(threadIdx.x); e < rows * out; e += static_cast<int>(blockDim.x)) {
    const int r = e / out;
    const int j = e - r * out;
    const T* a = src + r * pitch;
    T sum = T(0);
    for (int k = 0; k < in; ++k) sum += a[k] * wt[static_cast<int64_t>(k) * out + j];
    const T v = sum + bias[j];
    dst[r * pitch + j] = v < T(0) ? T(0) : v;
  }
  __syncthreads();
}

// The blend of the block's `queries` queries (from `first`), one thread per (query, channel): out =
// sum over the neighbours k of pred(row, channel) * blend weight, accumulated in neighbour order as
// the reference does (ret = 0; ret = ret + pred_k * weight_k); NaN for a query whose coordinate is
// not finite, nothing for the block's rows past the last query. Shared by every kernel; by
// `workers` threads of which this is `worker` (by default the whole block).
template <typename T, typename S, typename Pred>
__device__ __forceinline__ void blend_and_write(const QueryKernelParams<T>& p,
                                                const BlockShared<T, S>& s, int queries,
                                                int out_dim, int64_t first, Pred pred,
                                                int worker = static_cast<int>(threadIdx.x),
                                                int workers = static_cast<int>(blockDim.x)) {
  const int nn = p.grid.num_neighbours;
  for (int e = worker; e < queries * out_dim; e += workers) {
    const int q = e / out_dim;
    const int o = e - q * out_dim;
    const int state = s.state[q];
    if (state < 0) continue;
    T v;
    if (state == 0) {
      v = T(NAN);
    } else {
      v = T(0);
      for (int k = 0; k < nn; ++k) {
        const int r = q * nn + k;
        v = v + pred(r, o) * s.blend[r];
      }
    }
    p.out[(first + q) * out_dim + o] = v;
  }
}

// Step 4: the last layer (unless layer 0 is the only one) into `preds`, then the blend, in T.
// `act` holds the last hidden activations as Op::storage (row pitch `pitch`); wt (in, out_dim) and
// bias are the last layer's; `preds` has room for rows * out_dim values and is not `act`.
template <typename T, typename Op = Exact<T>>
__device__ void last_layer_and_blend(const QueryKernelParams<T>& p,
                                     const BlockShared<T, typename Op::storage>& s,
                                     const SharedLayout& layout,
                                     const typename Op::storage* act, int pitch,
                                     const T* __restrict__ wt, const T* __restrict__ bias, T* preds,
                                     int64_t first) {
  const int od = p.widths[p.num_layers - 1];
  const T* pred = preds;
  int pred_pitch = od;
  if constexpr (std::is_same_v<typename Op::storage, T>) {
    // A one-layer MLP: layer 0's outputs are the predictions.
    if (p.num_layers == 1) {
      pred = act;
      pred_pitch = pitch;
    }
  }
  if (p.num_layers > 1) {
    const int in = p.widths[p.num_layers - 2];
    for (int e = static_cast<int>(threadIdx.x); e < layout.rows * od;
         e += static_cast<int>(blockDim.x)) {
      const int r = e / od;
      const int o = e - r * od;
      const typename Op::storage* a = act + r * pitch;
      // Lanes work on different rows; each starts at its own input so that they read different
      // shared-memory banks instead of queueing on one.
      int k = static_cast<int>(threadIdx.x % 32) % in;
      T sum = T(0);
      for (int t = 0; t < in; ++t) {
        sum += Op::load(a[k]) * wt[k * od + o];
        if (++k == in) k = 0;
      }
      preds[r * od + o] = sum + bias[o];
    }
    __syncthreads();
  }
  blend_and_write(p, s, layout.queries, od, first,
                  [&](int r, int o) { return pred[r * pred_pitch + o]; });
}

// The published shape in float32: hidden layers 256 wide, out_dim <= kFastMaxOutDim; 64 rows per
// block. Two blocks fit an H100 SM (registers capped at 128 per thread for that).
__global__ void __launch_bounds__(kThreadsPerBlock, 2)
    liif_query_fast_kernel(const QueryKernelParams<float> p) {
  LIIF_DYNAMIC_SHARED(smem);
  const SharedLayout layout = fast_layout(p.grid.num_neighbours);
  const BlockShared<float> s = carve_shared<float>(smem, layout);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * layout.queries;
  load_geometry(p, s, first, layout.queries);
  __syncthreads();
  first_layer(p, s, layout.rows, kFastWidth);
  __syncthreads();
  const float* w = p.weights;
  const float* b = p.biases;
  for (int l = 1; l + 1 < p.num_layers; ++l) {
    fast_hidden_layer(w, b, s.act, s.weights);
    w += kFastWidth * kFastWidth;
    b += kFastWidth;
  }
  last_layer_and_blend(p, s, layout, s.act, kFastWidth, w, b, s.weights, first);
}

// Any widths, depth and out_dim, float32 or float64: p.queries_per_block queries per block and two
// activation buffers of p.act_pitch (the widest layer) per row.
template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    liif_query_generic_kernel(const QueryKernelParams<T> p) {
  LIIF_DYNAMIC_SHARED(smem);
  const SharedLayout layout =
      generic_layout<T>(p.queries_per_block, p.grid.num_neighbours, p.act_pitch);
  const BlockShared<T> s = carve_shared<T>(smem, layout);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * layout.queries;
  load_geometry(p, s, first, layout.queries);
  __syncthreads();
  first_layer(p, s, layout.rows, p.act_pitch);
  __syncthreads();
  T* cur = s.act;
  T* nxt = s.act + layout.rows * p.act_pitch;
  const T* w = p.weights;
  const T* b = p.biases;
  for (int l = 1; l + 1 < p.num_layers; ++l) {
    const int in = p.widths[l - 1];
    const int out = p.widths[l];
    generic_hidden_layer(w, b, in, out, cur, nxt, layout.rows, p.act_pitch);
    T* t = cur;
    cur = nxt;
    nxt = t;
    w += static_cast<int64_t>(in) * out;
    b += out;
  }
  last_layer_and_blend(p, s, layout, cur, p.act_pitch, w, b, nxt, first);
}

#if defined(LIIF_TENSOR_CORES)
// Step 3 on tensor cores: act (64 x 256, pitch tensor_core_pitch(P)) <- relu(act @ wt + bias) in
// place; wt is (256 in, 256 out) in the operand type in global memory, bias float32. Accumulation in
// float32; the result is rounded to the operand type once, when stored.
//
// Warp w = 4 * wm + wn computes rows 32wm .. 32wm+31 and columns 64wn .. 64wn+63 as 2 x 4 WMMA
// accumulator tiles of 16 x 16. The weights stream through two shared-memory chunks of
// tensor_core_chunk(P) input rows (16 KiB each), filled by asynchronous copies: chunk c+1 is in
// flight while chunk c is multiplied, with one barrier per chunk.
template <Precision P>
__device__ void tensor_core_hidden_layer(const typename Operand<P>::storage* __restrict__ wt,
                                         const float* __restrict__ bias,
                                         typename Operand<P>::storage* act,
                                         typename Operand<P>::storage* wbuf) {
  namespace wmma = nvcuda::wmma;
  using Op = Operand<P>;
  using S = typename Op::storage;
  constexpr int kPitch = tensor_core_pitch(P);
  constexpr int kChunk = tensor_core_chunk(P);
  constexpr int kChunks = kFastWidth / kChunk;
  constexpr int kPerCopy = 16 / static_cast<int>(sizeof(S));  // operands per 16-byte copy
  constexpr int kCopiesPerRow = kFastWidth / kPerCopy;
  constexpr int kCopiesPerThread = kChunk * kCopiesPerRow / kThreadsPerBlock;
  static_assert(kChunk * kCopiesPerRow % kThreadsPerBlock == 0, "a chunk is copied by all threads");
  static_assert(kFastWidth % kChunk == 0 && kChunk % Op::k == 0, "chunks hold whole k-steps");
  // The k-steps of a chunk, unrolled, except for tf32, whose fragment loads (no ldmatrix for 32-bit
  // operands) would then need more than 128 registers.
  constexpr int kStepsUnrolled = P == Precision::kTf32 ? 1 : kChunk / Op::k;

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int row0 = 32 * (warp / 4);
  const int col0 = 64 * (warp % 4);

  auto fetch = [&](int chunk) {
    S* dst = wbuf + (chunk & 1) * kChunk * kPitch;
    const S* src = wt + chunk * kChunk * kFastWidth;
#pragma unroll
    for (int v = 0; v < kCopiesPerThread; ++v) {
      const int copy = v * kThreadsPerBlock + tid;
      const int row = copy / kCopiesPerRow;
      const int col = (copy % kCopiesPerRow) * kPerCopy;
      async_copy_16(dst + row * kPitch + col, src + row * kFastWidth + col);
    }
    async_copy_commit();
  };

  wmma::fragment<wmma::accumulator, 16, 16, Op::k, float> acc[2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  fetch(0);
  for (int chunk = 0; chunk < kChunks; ++chunk) {
    // This thread's copies of `chunk` have landed; after the barrier everybody's have, and every
    // warp is done with chunk - 1, whose buffer the next fetch overwrites.
    async_copy_wait<0>();
    __syncthreads();
    if (chunk + 1 < kChunks) fetch(chunk + 1);
    const S* w = wbuf + (chunk & 1) * kChunk * kPitch;
#pragma unroll(kStepsUnrolled)
    for (int kk = 0; kk < kChunk; kk += Op::k) {
      // One B fragment at a time next to both A fragments: fewer live registers than loading all
      // four first (128 per thread, for two blocks per SM).
      wmma::fragment<wmma::matrix_a, 16, 16, Op::k, typename Op::fragment_type, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, Op::k, typename Op::fragment_type, wmma::row_major> b;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], act + (row0 + 16 * i) * kPitch + chunk * kChunk + kk, kPitch);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::load_matrix_sync(b, w + kk * kPitch + col0 + 16 * j, kPitch);
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], a[i], b, acc[i][j]);
      }
    }
  }
  // Every warp is done reading the activations (overwritten next) and the weight chunks (the
  // per-warp staging area of the results below).
  __syncthreads();

  // Fragment element positions are opaque: each tile goes through a 16 x 16 float32 staging area
  // of the warp, from which each lane takes 8 elements, adds the bias, applies ReLU and stores.
  float* staging = reinterpret_cast<float*>(wbuf) + warp * 16 * 16;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wmma::store_matrix_sync(staging, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 16 * 16; e += 32) {
        const int r = row0 + 16 * i + e / 16;
        const int c = col0 + 16 * j + e % 16;
        act[r * kPitch + c] = Op::store(relu(staging[e] + bias[c]));
      }
      __syncwarp();
    }
  }
  __syncthreads();
}

// The published shape on tensor cores (a reduced `precision`): hidden layers 256 wide, out_dim <=
// kTensorCoreMaxOutDim, 64 rows per block; layer 0, the last layer and the blend in float32.
template <Precision P>
__global__ void __launch_bounds__(kThreadsPerBlock, 2)
    liif_query_tensor_core_kernel(const QueryKernelParams<float> p) {
  using Op = Operand<P>;
  using S = typename Op::storage;
  LIIF_DYNAMIC_SHARED(smem);
  const SharedLayout layout = tensor_core_layout(P, p.grid.num_neighbours);
  const BlockShared<float, S> s = carve_shared<float, S>(smem, layout);
  constexpr int kPitch = tensor_core_pitch(P);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * layout.queries;
  load_geometry(p, s, first, layout.queries);
  __syncthreads();
  first_layer<float, Op>(p, s, layout.rows, kPitch);
  __syncthreads();
  const S* w = static_cast<const S*>(p.operand_weights);
  const float* b = p.biases;
  for (int l = 1; l + 1 < p.num_layers; ++l) {
    tensor_core_hidden_layer<P>(w, b, s.act, s.weights);
    w += kFastWidth * kFastWidth;
    b += kFastWidth;
  }
  const float* last_w = p.weights + static_cast<int64_t>(p.num_layers - 2) * kFastWidth * kFastWidth;
  last_layer_and_blend<float, Op>(p, s, layout, s.act, kPitch, last_w, b,
                                  reinterpret_cast<float*>(s.weights), first);
}
#else
// Targets older than sm_80 (never launched there, see LIIF_TENSOR_CORES).
template <Precision P>
__global__ void liif_query_tensor_core_kernel(const QueryKernelParams<float>) {
  __trap();
}
#endif  // LIIF_TENSOR_CORES

}  // namespace cuda
}  // namespace liif
