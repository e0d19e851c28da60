// The mma.sync tensor-core kernel of the fused query: the published shape (hidden layers 256 wide,
// out_dim <= kMmaMaxOutDim, at least one hidden layer between the first and the last) with tf32,
// bf16 or fp16 operands and float32 accumulation, sm_80 and newer. Same steps and roundings as the
// WMMA kernel of liif_query_kernel.cuh (python/liif_rounding_model.py states them), built for the
// data movement:
//   - 128 (query, neighbour) rows per block: each weight byte fetched from L2 serves 128 rows;
//   - the hidden layers' weights, packed on the host as [layer][chunk][out][kc] (chunks contiguous),
//     stream through a ring of kMmaStages shared-memory chunks by asynchronous copies, kMmaStages - 1
//     in flight, continuing across layer boundaries; the first ones are in flight while the geometry
//     and layer 0 are computed; one barrier per chunk;
//   - operands reach the tensor cores by ldmatrix (activations as the row-major A operand, weights
//     as (out, in) rows, which is the column-major B operand), products by mma.sync m16n8k16 (bf16,
//     fp16) or m16n8k8 (tf32); warp w owns rows R (w / 4) .. +R-1 and columns 64 (w % 4) .. +63 of
//     every layer: R/16 x 8 accumulator tiles in registers. R (WarpRows) is 64 (8 warps, 128
//     accumulator registers per thread: one block per SM) or 32 (16 warps and 64 accumulators per
//     thread, at most 128 registers: twice the warps per SM to hide latency, for the same 128-row
//     block and weight traffic; LIIF_CUDA_TENSOR_CORE_KERNEL=mma16);
//   - bias, ReLU and the rounding to the operand type are applied to the accumulators in registers
//     and written as the next layer's operands; after the last hidden layer the last layer is
//     folded into that epilogue (float32 weights, as in the rounding model): each lane's partial
//     dot products, summed over the four lanes of a row by shuffles, then over the four column
//     warps in a fixed order in the blend. Deterministic: no atomics.
//
// Compiled by nvcc and by the host execution harness (tests/harness/cuda_host_emulation.h), which
// runs ldmatrix, mma.sync and __shfl_xor_sync as warp-wide operations on each lane's own registers
// with their documented fragment layouts (liif_tensor_core.cuh), so a layout mistake fails there.
#pragma once

#include <cstdint>

#include "liif_query_kernel.cuh"
#include "liif_tensor_core.cuh"

namespace liif {
namespace cuda {

#if defined(LIIF_TENSOR_CORES)

constexpr int kMmaWarpCols = 64;  // columns of a warp's tile: 8 n8 tiles
static_assert(kMmaWarpsAlongColumns * kMmaWarpCols == kFastWidth, "warps tile 256 columns");
static_assert(mma_threads(64) == kThreadsPerBlock, "8 warps of 64 rows tile 128 rows");

// Two operands stored together (one 32-bit store), and four (layer 0's 8-byte store).
template <typename S>
struct alignas(2 * sizeof(S)) OperandPair {
  S lo, hi;
};
template <typename S>
struct alignas(4 * sizeof(S)) OperandQuad {
  S v[4];
};

// Chunk `chunk` of the packed hidden-layer weights into its ring slot: 256 rows of 64 bytes, 1024
// 16-byte copies shared by the block's `Threads` threads, consecutive threads on consecutive global
// addresses.
template <int Threads>
__device__ __forceinline__ void mma_fetch_chunk(const unsigned char* weights, int chunk,
                                                unsigned char* ring) {
  const unsigned char* src = weights + static_cast<int64_t>(chunk) * kFastWidth * kMmaChunkRowBytes;
  unsigned char* dst = ring + (chunk % kMmaStages) * kMmaChunkBytes;
  constexpr int kCopiesPerRow = kMmaChunkRowBytes / 16;
  constexpr int kCopies = kFastWidth * kCopiesPerRow / Threads;
  static_assert(kFastWidth * kCopiesPerRow % Threads == 0, "whole copies per thread");
#pragma unroll
  for (int v = 0; v < kCopies; ++v) {
    const int copy = v * Threads + static_cast<int>(threadIdx.x);
    const int row = copy / kCopiesPerRow;
    const int part = copy % kCopiesPerRow;
    async_copy_16(dst + row * kMmaChunkPitch + 16 * part, src + row * kMmaChunkRowBytes + 16 * part);
  }
}

// One element of layer 0 after ReLU: the map's value m plus the bias b and the coordinate terms
// (relative position ry, rx and cell size cy, cx by their columns' weights), summed in this order
// by every tensor-core kernel.
__device__ __forceinline__ float first_layer_term(float m, float b, float ry, float wy, float rx,
                                                  float wx, float cy, float wcy, float cx,
                                                  float wcx) {
  float v = m + b;
  v = v + ry * wy + rx * wx + cy * wcy + cx * wcx;
  return v < 0.f ? 0.f : v;  // keeps NaN, as torch.relu does
}

// Layer 0's parameters of four consecutive columns c .. c + 3: their bias and the weights of
// rel_y, rel_x, cell_y and cell_x.
struct FirstLayerColumns {
  float4 bias, wy, wx, wcy, wcx;
};
__device__ __forceinline__ FirstLayerColumns first_layer_columns(const QueryKernelParams<float>& p,
                                                                 int c) {
  auto at = [&](const float* v) { return *reinterpret_cast<const float4*>(v + c); };
  return {at(p.first_bias), at(p.extra_columns), at(p.extra_columns + kFastWidth),
          at(p.extra_columns + 2 * kFastWidth), at(p.extra_columns + 3 * kFastWidth)};
}

// The phase-clocks timing probe (liif_phase_clocks.h): thread 0 stamps the end of phase `slot`,
// or stores `value` (a count: tiles, staged rows) there.
__device__ __forceinline__ void record_phase(const QueryKernelParams<float>& p, int slot) {
  if (p.phase_clocks != nullptr && threadIdx.x == 0) {
    p.phase_clocks[static_cast<int64_t>(blockIdx.x) * kPhaseSlots + slot] = clock64();
  }
}
__device__ __forceinline__ void record_phase(const QueryKernelParams<float>& p, int slot,
                                             int64_t value) {
  if (p.phase_clocks != nullptr && threadIdx.x == 0) {
    p.phase_clocks[static_cast<int64_t>(blockIdx.x) * kPhaseSlots + slot] = value;
  }
}
// A barrier with the probe only, where the kernel has none but a phase ends for the whole block.
__device__ __forceinline__ void phase_barrier(const QueryKernelParams<float>& p) {
  if (p.phase_clocks != nullptr) __syncthreads();
}

// Map staging (LIIF_CUDA_STAGE_MAP): where in shared memory the block's staged map rows are.
struct StagedMap {
  int* slot_of_row;  // per row: its cell's slot, or -1 (no query, or past the slots: from global)
  int* cell_of_slot;
  int* new_cells;    // per warp of rows: how many of its rows are their cell's first
  float* rows;       // slot j: the map row of cell_of_slot[j], kFastWidth floats
};
__device__ __forceinline__ StagedMap staged_map(const QueryKernelParams<float>& p,
                                                unsigned char* smem) {
  unsigned char* base = smem + p.staged_offset;
  int* header = reinterpret_cast<int*>(base);
  return {header, header + kMmaRows, header + kMmaRows + kStagedCells,
          reinterpret_cast<float*>(base + kStageHeaderBytes)};
}

// Copies the distinct map rows of the block's 128 rows into shared memory once, the first
// p.staged_cells of them in row order, and gives each row its slot. A row is its cell's first if no
// earlier row has the cell (threads 0..127, one row each, compare with every earlier row); a
// ballot ranks the first rows within each warp, and the warps' counts order them across warps.
// The copies are plain loads, all of a thread's issued before its stores, so that the gather costs
// about one latency. Ends with a barrier.
template <int Threads>
__device__ void stage_map(const QueryKernelParams<float>& p,
                          const BlockShared<float, unsigned char>& s, unsigned char* smem) {
  static_assert(kMmaRows % 32 == 0 && Threads >= kMmaRows, "whole warps of rows, a thread each");
  const StagedMap st = staged_map(p, smem);
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32, warp = tid / 32;
  int cell = -1, first_of_cell = -1;  // this row's cell, and its first row
  if (tid < kMmaRows) {
    cell = s.cell[tid];
    first_of_cell = tid;
    for (int q = 0; q < tid && cell >= 0; ++q) {
      if (s.cell[q] == cell) {
        first_of_cell = q;
        break;
      }
    }
  }
  const bool first = cell >= 0 && first_of_cell == tid;
  unsigned ballot = 0;
  if (tid < kMmaRows) {
    ballot = __ballot_sync(0xFFFFFFFFu, first);
    if (lane == 0) st.new_cells[warp] = __popc(ballot);
  }
  __syncthreads();
  int slot = -1;
  if (first) {
    slot = __popc(ballot & ((1u << lane) - 1u));
    for (int w = 0; w < warp; ++w) slot += st.new_cells[w];
    if (slot >= p.staged_cells) slot = -1;
    if (slot >= 0) st.cell_of_slot[slot] = cell;
    st.slot_of_row[tid] = slot;
  }
  int staged = 0;  // the slots filled
  for (int w = 0; w < kMmaRows / 32; ++w) staged += st.new_cells[w];
  staged = staged < p.staged_cells ? staged : p.staged_cells;
  __syncthreads();
  if (tid < kMmaRows && cell >= 0 && !first) st.slot_of_row[tid] = st.slot_of_row[first_of_cell];
  if (tid < kMmaRows && cell < 0) st.slot_of_row[tid] = -1;
  if (p.phase_clocks != nullptr) {  // the phase-clocks probe counts the rows staged
    __syncthreads();
    int rows = 0;
    if (tid == 0) {
      for (int r = 0; r < kMmaRows; ++r) rows += st.slot_of_row[r] >= 0 ? 1 : 0;
    }
    // None for a tile without queries: a persistent block's last tile may be one, and its
    // record would hide the tile before's.
    if (rows > 0) record_phase(p, kPhaseStagedRows, rows);
  }
  // The copies: 16 bytes each, kFastWidth / 4 per slot, kBatch per thread in flight at once.
  constexpr int kPerRow = kFastWidth / 4;
  constexpr int kBatch = Threads > kThreadsPerBlock ? 4 : 8;
  float4* rows = reinterpret_cast<float4*>(st.rows);
  for (int base = tid; base < staged * kPerRow; base += kBatch * Threads) {
    float4 v[kBatch] = {};
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int copy = base + b * Threads;
      if (copy < staged * kPerRow) {
        const int64_t cell_of_copy = st.cell_of_slot[copy / kPerRow];
        v[b] = *reinterpret_cast<const float4*>(p.map + cell_of_copy * kFastWidth +
                                                4 * (copy % kPerRow));
      }
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      if (base + b * Threads < staged * kPerRow) rows[base + b * Threads] = v[b];
    }
  }
  __syncthreads();
}

// The map's values of row r at columns c .. c + 3 (zeros for a row without a query): from the
// staged rows where `st` has the row's cell, else from global memory.
__device__ __forceinline__ float4 first_layer_map(const QueryKernelParams<float>& p,
                                                  const BlockShared<float, unsigned char>& s,
                                                  int r, int c, const StagedMap* st = nullptr) {
  const int cell = s.cell[r];
  const int slot = st != nullptr ? st->slot_of_row[r] : -1;
  const float* row = slot >= 0 ? st->rows + slot * kFastWidth
                               : p.map + static_cast<int64_t>(cell) * kFastWidth;
  return cell >= 0 && !(p.timing_probe & kProbeNoMapLoads)
             ? *reinterpret_cast<const float4*>(row + c)
             : float4{0.f, 0.f, 0.f, 0.f};
}

// Row r's layer 0 at the columns `w` describes from its map values m, rounded as operands (zeros
// for a row without a query, which keep the following layers finite).
template <Precision P>
__device__ __forceinline__ OperandQuad<typename Operand<P>::storage> first_layer_quad(
    const QueryKernelParams<float>& p, const BlockShared<float, unsigned char>& s,
    const FirstLayerColumns& w, int r, const float4& m) {
  using Op = Operand<P>;
  float4 v = {0.f, 0.f, 0.f, 0.f};
  if (s.cell[r] >= 0) {
    const int q = p.grid.num_neighbours == 4 ? r / 4 : r;  // 1 or 4: no division by a variable
    const float ry = s.rel_y[r], rx = s.rel_x[r], cy = s.cell_y[q], cx = s.cell_x[q];
    v.x = first_layer_term(m.x, w.bias.x, ry, w.wy.x, rx, w.wx.x, cy, w.wcy.x, cx, w.wcx.x);
    v.y = first_layer_term(m.y, w.bias.y, ry, w.wy.y, rx, w.wx.y, cy, w.wcy.y, cx, w.wcx.y);
    v.z = first_layer_term(m.z, w.bias.z, ry, w.wy.z, rx, w.wx.z, cy, w.wcy.z, cx, w.wcx.z);
    v.w = first_layer_term(m.w, w.bias.w, ry, w.wy.w, rx, w.wx.w, cy, w.wcy.w, cx, w.wcx.w);
  }
  OperandQuad<typename Op::storage> quad;
  quad.v[0] = Op::store(v.x);
  quad.v[1] = Op::store(v.y);
  quad.v[2] = Op::store(v.z);
  quad.v[3] = Op::store(v.w);
  return quad;
}

// Layer 0 into the activations, as first_layer() computes it (map row + bias + coordinate and cell
// terms, ReLU, one rounding), four columns per thread: thread t always handles columns
// 4 (t % 64) .. +3, so its bias and weight columns stay in registers, and rows t / 64 + i Threads / 64.
// The map rows come from L2 (or HBM), or from the staged rows (kStaged): each thread issues the
// loads of kBatch rows before it uses any, so that their latencies overlap instead of adding up
// over its rows. With 8 warps, 16 rows: a thread's 32 rows in two rounds of L2 latency, not four
// (run 7: layer 0 took 8,700 cycles of the multicast kernel's tile; the accumulators are not live
// yet, so the 64 registers are there: ptxas, no spills, the same counts).
template <Precision P, int Threads, bool kStaged>
__device__ void mma_first_layer_rows(const QueryKernelParams<float>& p,
                                     const BlockShared<float, unsigned char>& s,
                                     const StagedMap& st) {
  using S = typename Operand<P>::storage;
  constexpr int kPitch = mma_act_pitch_bytes(P);
  constexpr int kGroups = kFastWidth / 4;
  constexpr int kStride = Threads / kGroups;  // rows between a thread's rows
  // 16 loads in flight per thread (4 with 16 warps, whose 128 registers hold no more).
  constexpr int kBatch = Threads > kThreadsPerBlock ? 4 : 16;
  static_assert(kMmaRows % (kStride * kBatch) == 0, "whole batches of rows");
  const int tid = static_cast<int>(threadIdx.x);
  const int c = 4 * (tid % kGroups);
  const FirstLayerColumns w = first_layer_columns(p, c);
  for (int first_row = tid / kGroups; first_row < kMmaRows; first_row += kStride * kBatch) {
    float4 m[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      m[b] = first_layer_map(p, s, first_row + kStride * b, c, kStaged ? &st : nullptr);
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int r = first_row + kStride * b;
      *reinterpret_cast<OperandQuad<S>*>(s.act + r * kPitch + c * static_cast<int>(sizeof(S))) =
          first_layer_quad<P>(p, s, w, r, m[b]);
    }
  }
}

// Layer 0 of the mma.sync and wgmma kernels: with map staging (p.staged_cells > 0), the tile's
// distinct map rows copied into shared memory first (stage_map), else gathered from global memory.
// Not compiled for tf32, whose block leaves no room for staging on any GPU (and whose 16-warp
// kernel would spill on sm_80).
template <Precision P, int Threads>
__device__ void mma_first_layer(const QueryKernelParams<float>& p,
                                const BlockShared<float, unsigned char>& s, unsigned char* smem) {
  if constexpr (P != Precision::kTf32) {
    if (p.staged_cells > 0) {
      stage_map<Threads>(p, s, smem);
      mma_first_layer_rows<P, Threads, true>(p, s, staged_map(p, smem));
      return;
    }
  }
  mma_first_layer_rows<P, Threads, false>(p, s, StagedMap{});
}

// One chunk of a hidden layer: acc += act[:, chunk's inputs] x w (the ring slot), two k-steps, for
// the warp's M m16 tiles of rows. `unit0`: the chunk's first 16-byte column unit in the activation
// rows.
template <Precision P, int M>
__device__ __forceinline__ void mma_chunk(float (&acc)[M][8][4], const unsigned char* act,
                                          const unsigned char* w, int unit0, int lane, int row0,
                                          int col0) {
  constexpr int kPitch = mma_act_pitch_bytes(P);
  const int j = lane / 8;  // the ldmatrix matrix this lane addresses a row of
#pragma unroll
  for (int step = 0; step < 2; ++step) {
    // A: matrix j is rows 8 (j % 2) .. +7, 16-byte unit j / 2 of the k-step (a[0] .. a[3]).
    uint32_t a[M][4];
#pragma unroll
    for (int i = 0; i < M; ++i) {
      const int row = row0 + 16 * i + lane % 8 + 8 * (j % 2);
      ldmatrix_x4(a[i], act + row * kPitch + 16 * (unit0 + 2 * step + j / 2));
    }
    // B, two n8 tiles at a time: matrix j is output columns 8 (j / 2) .. +7, unit j % 2.
#pragma unroll
    for (int pair = 0; pair < 4; ++pair) {
      uint32_t b[4];
      const int n = col0 + 16 * pair + lane % 8 + 8 * (j / 2);
      ldmatrix_x4(b, w + n * kMmaChunkPitch + 16 * (2 * step + j % 2));
#pragma unroll
      for (int i = 0; i < M; ++i) {
        mma_16x8<P>(acc[i][2 * pair], a[i], b[0], b[1]);
        mma_16x8<P>(acc[i][2 * pair + 1], a[i], b[2], b[3]);
      }
    }
  }
}

// The epilogue of a hidden layer followed by another: act <- round(relu(acc + bias)), each lane
// writing its accumulators' pairs of columns (one 32-bit store for 16-bit operands).
template <Precision P, int M>
__device__ __forceinline__ void mma_store_layer(const float (&acc)[M][8][4],
                                                const float* __restrict__ bias, unsigned char* act,
                                                int lane, int row0, int col0) {
  using Op = Operand<P>;
  using S = typename Op::storage;
  constexpr int kPitch = mma_act_pitch_bytes(P);
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int jn = 0; jn < 8; ++jn) {
    const int col = col0 + 8 * jn + 2 * t;
    const float2 b = *reinterpret_cast<const float2*>(bias + col);
#pragma unroll
    for (int i = 0; i < M; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + 16 * i + g + 8 * h;
        OperandPair<S> pair;
        pair.lo = Op::store(relu(acc[i][jn][2 * h] + b.x));
        pair.hi = Op::store(relu(acc[i][jn][2 * h + 1] + b.y));
        *reinterpret_cast<OperandPair<S>*>(act + row * kPitch + col * static_cast<int>(sizeof(S))) =
            pair;
      }
    }
  }
}

// The epilogue of the last hidden layer with the last layer folded in: h = round(relu(acc + bias))
// in registers, then for each output o this lane's partial dot products over its 16 columns with
// the float32 weights wt (in, out_dim), summed over the 4 lanes that share the rows, written by
// lane t = 0 to partials[warp column][row][o].
template <Precision P, int M>
__device__ __forceinline__ void mma_fold_last_layer(float (&acc)[M][8][4],
                                                    const float* __restrict__ bias,
                                                    const float* __restrict__ wt, int out_dim,
                                                    float* partials, int lane, int row0, int col0) {
  using Op = Operand<P>;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int jn = 0; jn < 8; ++jn) {
    const int col = col0 + 8 * jn + 2 * t;
    const float2 b = *reinterpret_cast<const float2*>(bias + col);
#pragma unroll
    for (int i = 0; i < M; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[i][jn][e] = Op::load(Op::store(relu(acc[i][jn][e] + (e % 2 == 0 ? b.x : b.y))));
      }
    }
  }
  float* mine = partials + (col0 / kMmaWarpCols) * kMmaRows * out_dim;
  for (int o = 0; o < out_dim; ++o) {
    float part[M][2] = {};
#pragma unroll
    for (int jn = 0; jn < 8; ++jn) {
      const int col = col0 + 8 * jn + 2 * t;
      const float w0 = wt[col * out_dim + o];
      const float w1 = wt[(col + 1) * out_dim + o];
#pragma unroll
      for (int i = 0; i < M; ++i) {
        part[i][0] += acc[i][jn][0] * w0 + acc[i][jn][1] * w1;
        part[i][1] += acc[i][jn][2] * w0 + acc[i][jn][3] * w1;
      }
    }
#pragma unroll
    for (int i = 0; i < M; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v = part[i][h];
        v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
        v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
        if (t == 0) mine[(row0 + 16 * i + g + 8 * h) * out_dim + o] = v;
      }
    }
  }
}

template <Precision P, int WarpRows>
__global__ void __launch_bounds__(mma_threads(WarpRows), 1)
    liif_query_mma_kernel(const QueryKernelParams<float> p) {
  constexpr int kThreads = mma_threads(WarpRows);
  constexpr int M = WarpRows / 16;  // m16 tiles of a warp
  LIIF_DYNAMIC_SHARED(smem);
  const SharedLayout layout = mma_layout(P, p.grid.num_neighbours);
  const BlockShared<float, unsigned char> s = carve_shared<float, unsigned char>(smem, layout);
  unsigned char* ring = s.weights;
  const unsigned char* weights = static_cast<const unsigned char*>(p.operand_weights);
  const int hidden = p.num_layers - 2;
  constexpr int kChunksPerLayer = kFastWidth / mma_chunk_inputs(P);
  const int chunks = hidden * kChunksPerLayer;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * layout.queries;
  // Whether to copy the weights: not with the no-weight-loads timing probe. (A flag, not the
  // wgmma kernel's bound on the chunks copied: the bound spills the 16-warp tf32 kernel on sm_80.)
  const bool copy_weights = !(p.timing_probe & kProbeNoWeightLoads);

  record_phase(p, kPhaseStart);
  record_phase(p, kPhaseTiles, 1);
  // The first chunks stream in while the geometry and layer 0 are computed. Every thread commits
  // one group per chunk slot, empty past the last chunk, so that "chunk c has landed" is always
  // "at most kMmaStages - 2 groups pending" at chunk c.
  for (int c = 0; c < kMmaStages - 1; ++c) {
    if (c < chunks && copy_weights) mma_fetch_chunk<kThreads>(weights, c, ring);
    async_copy_commit();
  }
  load_geometry_by_row<kThreads>(p, s, first, layout.queries);
  __syncthreads();
  record_phase(p, kPhaseGeometry);
  mma_first_layer<P, kThreads>(p, s, smem);
  phase_barrier(p);
  record_phase(p, kPhaseFirstLayer);

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int row0 = WarpRows * (warp / kMmaWarpsAlongColumns);
  const int col0 = kMmaWarpCols * (warp % kMmaWarpsAlongColumns);
  // The last layer's parameters and partial sums, read from the parameter block where used rather
  // than held in registers through the main loop (the 16-warp form has 128 registers in all).
  auto out_dim = [&] { return p.widths[p.num_layers - 1]; };
  auto last_w = [&] { return p.weights + static_cast<int64_t>(hidden) * kFastWidth * kFastWidth; };
  auto last_b = [&] { return p.biases + static_cast<int64_t>(hidden) * kFastWidth; };
  float* partials = reinterpret_cast<float*>(ring);
  float acc[M][8][4];
  int chunk = 0;
  for (int l = 0; l < hidden; ++l) {
#pragma unroll
    for (int i = 0; i < M; ++i) {
#pragma unroll
      for (int jn = 0; jn < 8; ++jn) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][jn][e] = 0.f;
      }
    }
    for (int c = 0; c < kChunksPerLayer; ++c, ++chunk) {
      // This thread's copies of `chunk` have landed; after the barrier everybody's have, the
      // activations written before it are visible, and every warp is done with chunk - 1, whose
      // slot the next fetch refills.
      async_copy_wait<kMmaStages - 2>();
      __syncthreads();
      if (chunk + kMmaStages - 1 < chunks && copy_weights) {
        mma_fetch_chunk<kThreads>(weights, chunk + kMmaStages - 1, ring);
      }
      async_copy_commit();
      mma_chunk<P, M>(acc, s.act, ring + (chunk % kMmaStages) * kMmaChunkBytes,
                   c * (kMmaChunkRowBytes / 16), lane, row0, col0);
    }
    // Every warp is done reading this layer's activations (overwritten next) and the ring (the
    // partial sums' place after the last layer); no copy is in flight after the last chunk.
    __syncthreads();
    const float* bias = p.biases + static_cast<int64_t>(l) * kFastWidth;
    if (l + 1 < hidden) {
      mma_store_layer<P, M>(acc, bias, s.act, lane, row0, col0);
    } else {
      mma_fold_last_layer<P, M>(acc, bias, last_w(), out_dim(), partials, lane, row0, col0);
    }
  }
  __syncthreads();
  record_phase(p, kPhaseLayers);

  // The blend; each prediction is the last layer's bias plus the four column warps' partial sums,
  // in a fixed order.
  blend_and_write(p, s, layout.queries, out_dim(), first, [&](int r, int o) {
    float pred = last_b()[o];
    for (int wc = 0; wc < kMmaWarpsAlongColumns; ++wc) {
      pred += partials[(wc * kMmaRows + r) * out_dim() + o];
    }
    return pred;
  });
  phase_barrier(p);
  record_phase(p, kPhaseEnd);
}

#else
// Targets older than sm_80 (never launched there, see LIIF_TENSOR_CORES).
template <Precision P, int WarpRows>
__global__ void liif_query_mma_kernel(const QueryKernelParams<float>) {
  __trap();
}
#endif  // LIIF_TENSOR_CORES

}  // namespace cuda
}  // namespace liif
