// The warp-specialised, persistent form of the wgmma kernel (sm_90a: H100, H200; bf16 and fp16):
// the wgmma kernel's tiles of 128 (query, neighbour) rows, weights, products and roundings
// (python/liif_rounding_model.py), with the work that leaves the tensor cores idle in that kernel
// (each tile's geometry, its layer 0 gathered from the first-layer map, its blend) done by a third
// warpgroup while the other two multiply:
//   - one block per SM, looping over the tiles blockIdx.x, blockIdx.x + gridDim.x, ...;
//   - the producer warpgroup (threads 0 .. 127) computes the geometry and layer 0 of tile k into
//     one of two tile buffers while the consumers multiply tile k - 1 out of the other, then blends
//     and writes tile k - 1 once the consumers are done with it;
//   - the two consumer warpgroups (threads 128 .. 383) each own 64 rows of a tile and multiply
//     them by every hidden layer, one wgmma m64n256k16 per 16 inputs with both operands in shared
//     memory: each layer's accumulators, with bias, ReLU and the rounding applied, are written back
//     over that layer's operands (the products of the layer are done) as the next layer's; the
//     weights stream through a ring of kWgmmaWsStages chunks by cp.async (the wgmma kernel's
//     copies), kWgmmaWsStages - 2 in flight, the stream running on from one tile into the next;
//     after the last hidden layer each warp folds the last layer into its rows' predictions;
//   - they hand tiles over through named barriers (bar.arrive by one side, bar.sync by the other;
//     the ids below), so that no thread waits for work it does not depend on.
// Deterministic: no atomics, every sum in a fixed order. 384 threads of 168 registers at launch;
// the producer gives some to the consumers (setmaxnreg), whose 128 accumulators are most of theirs
// (their A operand is in shared memory).
//
// Compiled by nvcc for sm_90a, and by the host execution harness, which runs wgmma asynchronously
// with both descriptors decoded and the named barriers as the GPU counts them
// (tests/test_tensor_core_harness.py).
#pragma once

#include <cstdint>

#include "liif_query_wgmma_kernel.cuh"

namespace liif {
namespace cuda {

#if defined(LIIF_WGMMA)

static_assert(kWgmmaWsThreads == 3 * 128, "a producer and two consumer warpgroups");
static_assert(kWgmmaWsStages >= 3, "a chunk in flight while one is multiplied and one retired");

// The named barriers (0 is __syncthreads()'s, which this kernel does not use).
constexpr int kWsRingBarrier = 1;       // the consumers: a chunk landed, the slot of chunk - 2 free
constexpr int kWsProducerBarrier = 2;   // the producer: a tile's geometry written, or read
constexpr int kWsWarpgroupBarrier = 3;  // + v: consumer warpgroup v wrote its next operands
constexpr int kWsFullBarrier = 5;       // + b: tile buffer b holds a tile's layer 0
constexpr int kWsDoneBarrier = 7;       // + b: the consumers are done with buffer b's tile
constexpr int kWsConsumers = 2 * 128;

// Registers per thread: 168 at launch (384 threads, one block per SM); the producer gives up what
// the consumers' accumulators, their addresses and the last layer's fold need beside them. The
// consumers' count is the one without spills (ptxas, CUDA 13.0), the producer keeps the rest. The
// launcher checks that the kernel really has kWgmmaWsLaunchRegisters (with fewer, the consumers
// would wait forever for registers the pool does not have).
constexpr int kWsProducerRegisters = 88;
constexpr int kWsConsumerRegisters = 208;
static_assert(128 * kWsProducerRegisters + kWsConsumers * kWsConsumerRegisters ==
                  kWgmmaWsThreads * kWgmmaWsLaunchRegisters,
              "the consumers take what the producer gives up");

// A tile's operands: 128 rows of 256 16-bit inputs in wgmma's canonical K-major layout without
// swizzling, k-step by k-step (16 inputs, kWsStepBytes); in a step the 16 groups of 8 rows are
// kWgmmaSbo bytes apart, in a group the two core matrices (8 inputs) kWgmmaLbo apart, as in the
// weight ring. Consumer warpgroup v's 64 rows are groups 8 v .. 8 v + 7: its A operand of k-step s
// starts at byte s kWsStepBytes + v kWsWarpgroupBytes.
constexpr int kWsStepBytes = kMmaRows * 16 * 2;
constexpr int kWsWarpgroupBytes = kWsStepBytes / 2;
constexpr int kWsTileBytes = kWsStepBytes * (kFastWidth / 16);
static_assert(kWsStepBytes == (kMmaRows / 8) * kWgmmaSbo && kWgmmaSbo == 2 * kWgmmaLbo,
              "the operands' layout is the weights'");

__device__ __forceinline__ int ws_operand_offset(int row, int k) {
  return (k / 16) * kWsStepBytes + (row / 8) * static_cast<int>(kWgmmaSbo) +
         (k / 8 % 2) * static_cast<int>(kWgmmaLbo) + (row % 8) * 16 + (k % 8) * 2;
}

// Where the prediction o of a tile's row goes after the last layer: over the operands, each
// warpgroup within the bytes of its own rows (the other one may still be multiplying its own).
// Value i of warpgroup v's rows is float i % 512 of k-step i / 512's part of v.
__device__ __forceinline__ float* ws_prediction(unsigned char* tile, int row, int out_dim, int o) {
  const int i = (row % 64) * out_dim + o;
  return reinterpret_cast<float*>(tile + (i / 512) * kWsStepBytes +
                                  (row / 64) * kWsWarpgroupBytes) +
         i % 512;
}
static_assert(64 * kMmaMaxOutDim <= 512 * (kFastWidth / 16), "the predictions fit");

// The first query of the block's k-th tile.
__device__ __forceinline__ int64_t ws_tile_first(int k, int queries) {
  return (static_cast<int64_t>(blockIdx.x) + static_cast<int64_t>(k) * gridDim.x) * queries;
}

// Tile buffer b (0 or 1) and its geometry: the two buffers lead the layout, then the ring, then
// the two tiles' geometry, the first where carve_shared puts a block's, the second right after it.
// (Computed where used: an array of them indexed by b would live in local memory. Only the
// geometry's pointers of the second are meaningful: its act and weights point into tile 0.)
__device__ __forceinline__ unsigned char* ws_tile(unsigned char* smem, int b) {
  return smem + b * kWsTileBytes;
}
__device__ __forceinline__ BlockShared<float, unsigned char> ws_geometry(unsigned char* smem,
                                                                         const SharedLayout& l,
                                                                         int b) {
  return carve_shared<float, unsigned char>(smem + b * geometry_bytes(l), l);
}

// Layer 0 of a tile into its operands, as mma_first_layer computes it, by the producer's 128
// threads (`tid`): warp w takes k-steps w, w + 4, ...; in each, lane l owns inputs
// 16 s + 8 (l / 16) + 4 (l % 2) .. +3 (its bias and weight columns loaded once per step) of row
// (l / 2) % 8 of each group of 8 rows, so that a warp writes the group's 256 contiguous bytes (no
// bank conflicts); kBatch map rows loaded before any is used.
template <Precision P>
__device__ void ws_first_layer(const QueryKernelParams<float>& p,
                               const BlockShared<float, unsigned char>& s, unsigned char* tile,
                               int tid) {
  using S = typename Operand<P>::storage;
  constexpr int kBatch = 8;
  constexpr int kGroups = kMmaRows / 8;
  static_assert(kGroups % kBatch == 0, "whole batches of row groups");
  const int warp = tid / 32, lane = tid % 32;
  const int in_group = (lane / 2) % 8;
  for (int step = warp; step < kFastWidth / 16; step += 4) {
    const int c = 16 * step + 8 * (lane / 16) + 4 * (lane % 2);
    const FirstLayerColumns w = first_layer_columns(p, c);
    for (int group0 = 0; group0 < kGroups; group0 += kBatch) {
      float4 m[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) m[b] = first_layer_map(p, s, 8 * (group0 + b) + in_group, c);
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int r = 8 * (group0 + b) + in_group;
        *reinterpret_cast<OperandQuad<S>*>(tile + ws_operand_offset(r, c)) =
            first_layer_quad<P>(p, s, w, r, m[b]);
      }
    }
  }
}

// The producer warpgroup: tile k's geometry and layer 0 into buffer k % 2, handed to the
// consumers; then the blend of tile k - 1 once they are done with it. Buffer k % 2 is free when
// tile k is produced: the blend of tile k - 2, done before, waited for the consumers to be done.
template <Precision P>
__device__ void ws_producer(const QueryKernelParams<float>& p, unsigned char* smem,
                            const SharedLayout& layout, int my_tiles) {
  const int tid = static_cast<int>(threadIdx.x);
  const int queries = layout.queries;
  const int outs = p.widths[p.num_layers - 1];
  const float* last_b = p.biases + static_cast<int64_t>(p.num_layers - 2) * kFastWidth;
  auto blend = [&](int k) {
    const int b = k % 2;
    unsigned char* tile = ws_tile(smem, b);
    named_barrier_sync(kWsDoneBarrier + b, kWgmmaWsThreads);
    blend_and_write(
        p, ws_geometry(smem, layout, b), queries, outs, ws_tile_first(k, queries),
        [&](int r, int o) { return last_b[o] + *ws_prediction(tile, r, outs, o); }, tid, 128);
  };
  for (int k = 0; k < my_tiles; ++k) {
    const int b = k % 2;
    const BlockShared<float, unsigned char> s = ws_geometry(smem, layout, b);
    named_barrier_sync(kWsProducerBarrier, 128);  // the blend of tile k - 2 read this geometry
    load_geometry(p, s, ws_tile_first(k, queries), queries, tid, 128);
    named_barrier_sync(kWsProducerBarrier, 128);
    ws_first_layer<P>(p, s, ws_tile(smem, b), tid);
    fence_proxy_async();  // the tensor cores read these operands next
    named_barrier_arrive(kWsFullBarrier + b, kWgmmaWsThreads);
    if (k > 0) blend(k - 1);
  }
  blend(my_tiles - 1);
}

// Consumer warpgroup v (0 or 1): rows 64 v .. 64 v + 63 of each of the block's tiles through the
// hidden layers and the last one.
template <Precision P>
__device__ void ws_consumer(const QueryKernelParams<float>& p, unsigned char* smem,
                            unsigned char* ring, int my_tiles, int v) {
  constexpr int kChunksPerLayer = kFastWidth / mma_chunk_inputs(P);
  const int worker = static_cast<int>(threadIdx.x) - 128;  // of the ring's copies
  const int warp = static_cast<int>(threadIdx.x / 32 % 4);
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int g = lane / 4, t = lane % 4;
  const unsigned char* weights = static_cast<const unsigned char*>(p.operand_weights);
  const int hidden = p.num_layers - 2;
  const int chunks = hidden * kChunksPerLayer;  // per tile
  // The chunk stream: the next fetch's chunk of the tile and ring slot, counted rather than
  // divided (a 64-bit division per chunk), and how many chunks are left to fetch.
  int fetch_chunk = 0, fetch_slot = 0;
  // (None with the no-weight-loads timing probe.)
  int64_t unfetched =
      p.timing_probe & kProbeNoWeightLoads ? 0 : static_cast<int64_t>(my_tiles) * chunks;
  auto fetch_next = [&] {
    if (unfetched > 0) {
      wgmma_fetch_chunk(weights, fetch_chunk, ring + fetch_slot * kWgmmaChunkBytes, worker);
      --unfetched;
    }
    fetch_chunk = fetch_chunk + 1 == chunks ? 0 : fetch_chunk + 1;
    fetch_slot = fetch_slot + 1 == kWgmmaWsStages ? 0 : fetch_slot + 1;
    async_copy_commit();
  };
  // One group per chunk, empty past the last one: chunk c has landed when at most
  // kWgmmaWsStages - 3 groups are pending at chunk c.
  for (int c = 0; c < kWgmmaWsStages - 2; ++c) fetch_next();
  const int outs = p.widths[p.num_layers - 1];
  const float* last_w = p.weights + static_cast<int64_t>(hidden) * kFastWidth * kFastWidth;
  int slot_index = 0;  // the ring slot of the chunk being multiplied
  float acc[128];
  for (int k = 0; k < my_tiles; ++k) {
    const int b = k % 2;
    unsigned char* tile = ws_tile(smem, b);
    named_barrier_sync(kWsFullBarrier + b, kWgmmaWsThreads);
    const uint32_t a_base = shared_address(tile) + v * kWsWarpgroupBytes;
    // Where this thread's elements of the next layer's operands go (ws_operand_offset of its
    // rows 16 warp + g (+ 8) and inputs 2 t, +1 (+ 8 jn)), as a base and compile-time offsets.
    unsigned char* next = tile + (8 * v + 2 * warp) * kWgmmaSbo + 16 * g + 4 * t;
    for (int l = 0; l < hidden; ++l) {
      start_from_bias(acc, p.biases + static_cast<int64_t>(l) * kFastWidth, t);
#pragma unroll
      for (int c = 0; c < kChunksPerLayer; ++c) {
        // This thread's copies of this chunk have landed and are visible to the tensor cores;
        // after the barrier everybody's are, and both warpgroups have retired the wgmmas of the
        // chunk two before, whose slot the next fetch refills.
        async_copy_wait<kWgmmaWsStages - 3>();
        fence_proxy_async();
        named_barrier_sync(kWsRingBarrier, kWsConsumers);
        fetch_next();  // the chunk kWgmmaWsStages - 2 ahead, into the slot of the one 2 behind
        const uint32_t slot = shared_address(ring + slot_index * kWgmmaChunkBytes);
        slot_index = slot_index + 1 == kWgmmaWsStages ? 0 : slot_index + 1;
        wgmma_fence();
#pragma unroll
        for (int step = 0; step < 2; ++step) {
          const uint32_t a = a_base + (2 * c + step) * kWsStepBytes;
          wgmma_m64n256k16_ss<P>(acc, wgmma_descriptor(a, kWgmmaLbo, kWgmmaSbo),
                                 wgmma_descriptor(slot + step * kWgmmaStepBytes, kWgmmaLbo,
                                                  kWgmmaSbo));
        }
        wgmma_commit();
        wgmma_wait<1>();  // the wgmmas of chunk - 1 are done
      }
      wgmma_wait<0>();  // and this layer's
#pragma unroll
      for (int e = 0; e < 128; ++e) fence_register(acc[e]);
      // Every warp of the warpgroup has retired this layer's wgmmas, which read all its 64 rows:
      // their operands may be overwritten, by the next layer's or by the predictions (which do not
      // keep to their warp's rows).
      named_barrier_sync(kWsWarpgroupBarrier + v, 128);
      if (l + 1 < hidden) {
        // The next layer's operands over this layer's: elements (row 16 warp + g + 8 h, columns
        // 8 jn + 2 t, +1) of the accumulators, rounded and paired.
#pragma unroll
        for (int jn = 0; jn < 32; ++jn) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            *reinterpret_cast<uint32_t*>(next + (jn / 2) * kWsStepBytes + (jn % 2) * kWgmmaLbo +
                                         h * kWgmmaSbo) =
                operand_pair<P>(relu(acc[4 * jn + 2 * h]), relu(acc[4 * jn + 2 * h + 1]));
          }
        }
        fence_proxy_async();  // the tensor cores read them next
        named_barrier_sync(kWsWarpgroupBarrier + v, 128);
      } else {
        // The last hidden layer's activations, rounded as the operand type, then the last layer.
        round_as_operands<P>(acc);
        wgmma_fold_last_layer(acc, last_w, outs, lane, [&](int row, int o, float sum) {
          *ws_prediction(tile, 64 * v + 16 * warp + row, outs, o) = sum;
        });
      }
    }
    named_barrier_arrive(kWsDoneBarrier + b, kWgmmaWsThreads);
  }
}

template <Precision P>
__global__ void __launch_bounds__(kWgmmaWsThreads, 1)
    liif_query_wgmma_ws_kernel(const QueryKernelParams<float> p) {
  static_assert(P == Precision::kBf16 || P == Precision::kFp16, "16-bit operands");
  LIIF_DYNAMIC_SHARED(smem);
  const SharedLayout layout = wgmma_ws_layout(P, p.grid.num_neighbours);
  const int64_t all_tiles = (p.total_queries + layout.queries - 1) / layout.queries;
  // The launch has at most one block per tile (launch_blocks), so every block has one at least.
  const int my_tiles = static_cast<int>((all_tiles - blockIdx.x + gridDim.x - 1) / gridDim.x);
  if (my_tiles <= 0) return;  // the whole block (its hand-overs would wait forever)
  record_phase(p, kPhaseStart);  // (the phase-clocks probe: start, end and tiles only)
  record_phase(p, kPhaseTiles, my_tiles);
  if (threadIdx.x < 128) {
    release_registers<kWsProducerRegisters>();
    ws_producer<P>(p, smem, layout, my_tiles);
    record_phase(p, kPhaseEnd);  // the producer's blend of the last tile ends the block
  } else {
    claim_registers<kWsConsumerRegisters>();
    ws_consumer<P>(p, smem, smem + layout.act_bytes, my_tiles,
                   static_cast<int>(threadIdx.x) / 128 - 1);
  }
}

#else
// Targets other than sm_90a (never launched there, see LIIF_WGMMA).
template <Precision P>
__global__ void liif_query_wgmma_ws_kernel(const QueryKernelParams<float>) {
  __trap();
}
#endif  // LIIF_WGMMA

}  // namespace cuda
}  // namespace liif
