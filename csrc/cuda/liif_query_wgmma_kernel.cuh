// The wgmma tensor-core kernel of the fused query (sm_90a: H100, H200): the mma.sync kernel's
// shape, precisions bf16 and fp16, steps and roundings (python/liif_rounding_model.py), with the
// hidden layers multiplied by warpgroup MMA (wgmma), the Hopper instruction that feeds the tensor
// cores at their full rate (mma.sync reaches a fraction of it there):
//   - 128 (query, neighbour) rows per block, two warpgroups of 64 rows: each weight byte fetched
//     from L2 serves 128 rows, as in the mma.sync kernel;
//   - each warpgroup multiplies its 64 rows by a whole layer, one wgmma m64n256k16 per 16 inputs,
//     its activations never leaving registers: the accumulators of layer l, with bias, ReLU and
//     the rounding applied, are layer l+1's A operand in place (the accumulator and A layouts
//     coincide for 16-bit operands, liif_tensor_core.cuh); only layer 0 passes through shared
//     memory (it is computed per column, as in the mma.sync kernel, then loaded by ldmatrix);
//   - the hidden layers' weights (packed on the host as for the mma.sync kernel, chunks of 32
//     inputs of every output) stream through a ring of kWgmmaStages chunks by cp.async, placed
//     in wgmma's canonical K-major layout as they are copied; kWgmmaStages - 2 chunks are in
//     flight while the tensor cores work on one and may still finish the one before: one barrier
//     per chunk, the wgmmas of a chunk retired (wgmma_wait<1>) one chunk later;
//   - after the last hidden layer the last layer is folded into the epilogue (float32 weights):
//     each lane's dot products over its 64 columns, summed over the four lanes of a row by
//     shuffles; each row's whole sum stays in its warp, so no partial sums cross warps.
//     Deterministic: no atomics, fixed orders.
// 255 registers at most per thread (one block of 256 threads per SM): 128 accumulators and 64
// registers of A operands.
//
// Compiled by nvcc for sm_90a, and by the host execution harness, which runs wgmma
// asynchronously on each lane's own registers with the documented fragment layouts and decodes
// the shared-memory descriptor, so that a layout or ordering mistake fails in CI
// (tests/test_tensor_core_harness.py).
#pragma once

#include <cstdint>
#include <cstring>

#include "liif_query_mma_kernel.cuh"

namespace liif {
namespace cuda {

#if defined(LIIF_WGMMA)

static_assert(kWgmmaThreads == 2 * 128 && 2 * 64 == kMmaRows, "two warpgroups of 64 rows");

// Bytes of a chunk's k-step (16 inputs of 256 outputs) and the descriptor's offsets: the two core
// matrices of a k-step's 16 inputs 128 bytes apart (lbo), groups of 8 outputs 256 bytes apart (sbo).
constexpr int kWgmmaStepBytes = kFastWidth * 16 * 2;
constexpr uint32_t kWgmmaLbo = 128;
constexpr uint32_t kWgmmaSbo = 256;
static_assert(kWgmmaChunkBytes == 2 * kWgmmaStepBytes, "a chunk is two k-steps");

// Chunk `chunk` of the packed hidden-layer weights ([layer][chunk][out][32 inputs], 64 bytes per
// output) into a ring slot in the canonical layout: byte (step, n / 8, k / 8 % 2, n % 8) of the
// slot holds inputs 16 step + 8 (k / 8 % 2) .. +7 of output n, that is 16-byte unit
// u = 2 step + k / 8 % 2 of output n's 64 bytes. Each warp copies one group of 8 outputs, their
// 512 contiguous bytes (4 whole lines from L2; run 6 measured the wgmma kernels' L2 busy twice as
// long as mma.sync's when each warp read 32 bytes of 16 outputs, 8 lines): lane i takes unit i / 8
// of output i % 8, so that each 8 lanes fill 128 contiguous bytes of the slot (no bank
// conflicts). By kWgmmaThreads threads, of which this is `worker`.
__device__ __forceinline__ void wgmma_fetch_chunk(const unsigned char* weights, int chunk,
                                                  unsigned char* slot,
                                                  int worker = static_cast<int>(threadIdx.x)) {
  const unsigned char* src = weights + static_cast<int64_t>(chunk) * kWgmmaChunkBytes;
  constexpr int kCopies = kWgmmaChunkBytes / 16 / kWgmmaThreads;
  static_assert(kWgmmaThreads % 32 == 0 && kMmaChunkRowBytes == 4 * 16,
                "whole warps, four 16-byte units per output");
#pragma unroll
  for (int v = 0; v < kCopies; ++v) {
    const int copy = v * kWgmmaThreads + worker;
    const int group = copy / 32, lane = copy % 32;  // outputs 8 group .. 8 group + 7
    const int n = 8 * group + lane % 8, unit = lane / 8;
    async_copy_16(slot + (unit / 2) * kWgmmaStepBytes + group * static_cast<int>(kWgmmaSbo) +
                      (unit % 2) * static_cast<int>(kWgmmaLbo) + (n % 8) * 16,
                  src + n * kMmaChunkRowBytes + 16 * unit);
  }
}

// Two operands rounded and paired in one register, the first in the low 16 bits.
template <Precision P>
__device__ __forceinline__ uint32_t operand_pair(float lo, float hi) {
  using S = typename Operand<P>::storage;
  const OperandPair<S> pair{Operand<P>::store(lo), Operand<P>::store(hi)};
  uint32_t bits;
  std::memcpy(&bits, &pair, sizeof bits);
  return bits;
}

// A layer's accumulators started from its bias (element (row, column) from bias[column]; t: the
// lane's index in its group of 4): loaded into the accumulator registers themselves, where the
// epilogue would need 128 more registers beside them. Every accumulator is written before the
// wgmma.fence of the layer's first chunk, as PTX requires of registers a wgmma uses (without the
// register fences the compiler may place the copies after the fence).
__device__ __forceinline__ void start_from_bias(float (&acc)[128], const float* bias, int t) {
#pragma unroll
  for (int jn = 0; jn < 32; ++jn) {
    const float2 b = *reinterpret_cast<const float2*>(bias + 8 * jn + 2 * t);
    acc[4 * jn] = acc[4 * jn + 2] = b.x;
    acc[4 * jn + 1] = acc[4 * jn + 3] = b.y;
  }
#pragma unroll
  for (int e = 0; e < 128; ++e) fence_register(acc[e]);
}

// The last hidden layer's accumulators after ReLU and the rounding of the operand type, back in
// float32: rounded in pairs as the operands are, one packed conversion per two values (the fence
// keeps the compiler from splitting it into two single ones, each as slow).
template <Precision P>
__device__ __forceinline__ void round_as_operands(float (&acc)[128]) {
  using Op = Operand<P>;
#pragma unroll
  for (int e = 0; e < 128; e += 2) {
    uint32_t bits = operand_pair<P>(relu(acc[e]), relu(acc[e + 1]));
    fence_register(bits);
    OperandPair<typename Op::storage> pair;
    std::memcpy(&pair, &bits, sizeof pair);
    acc[e] = Op::load(pair.lo);
    acc[e + 1] = Op::load(pair.hi);
  }
}

// Layer 1's A operand of warp rows row0 .. +15 from layer 0's activations (`act`, rows of
// mma_act_pitch_bytes(P)), k-step by k-step: ldmatrix matrix j is rows 8 (j % 2) .. +7, 16-byte
// unit j / 2 of the step (a[s][0] .. a[s][3]).
template <Precision P>
__device__ __forceinline__ void wgmma_first_operands(uint32_t (&a)[kFastWidth / 16][4],
                                                     const unsigned char* act, int row0,
                                                     int lane) {
  const int j = lane / 8;
  const unsigned char* row = act + (row0 + lane % 8 + 8 * (j % 2)) * mma_act_pitch_bytes(P);
#pragma unroll
  for (int step = 0; step < kFastWidth / 16; ++step) {
    ldmatrix_x4(a[step], row + 16 * (2 * step + j / 2));
  }
}

// The next layer's A operand from a layer's accumulators, after ReLU and the rounding: k-step s is
// columns 16 s .. +15, accumulator blocks 2 s, 2 s + 1.
template <Precision P>
__device__ __forceinline__ void wgmma_next_operands(uint32_t (&a)[kFastWidth / 16][4],
                                                    const float (&acc)[128]) {
#pragma unroll
  for (int step = 0; step < kFastWidth / 16; ++step) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int jn = 2 * step + r / 2, h = r % 2;
      a[step][r] = operand_pair<P>(relu(acc[4 * jn + 2 * h]), relu(acc[4 * jn + 2 * h + 1]));
      fence_register(a[step][r]);  // written before the next layer's wgmma.fence
    }
  }
}

// The last layer folded into a warp's accumulators (its 16 rows' last hidden activations, as
// round_as_operands left them; `wt` the layer's float32 weight (256, outs)): for each output o,
// each lane's dot products over its 64 columns, summed over the 4 lanes of a row by shuffles, so
// that each row's whole sum stays in its warp; store(row of the warp, o, sum) by one lane per row.
template <typename Store>
__device__ __forceinline__ void wgmma_fold_last_layer(const float (&acc)[128], const float* wt,
                                                      int outs, int lane, Store store) {
  const int g = lane / 4, t = lane % 4;
  for (int o = 0; o < outs; ++o) {
    float part[2] = {0.f, 0.f};
#pragma unroll
    for (int jn = 0; jn < 32; ++jn) {
      const int col = 8 * jn + 2 * t;
      const float w0 = wt[col * outs + o];
      const float w1 = wt[(col + 1) * outs + o];
      part[0] += acc[4 * jn] * w0 + acc[4 * jn + 1] * w1;
      part[1] += acc[4 * jn + 2] * w0 + acc[4 * jn + 3] * w1;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = part[h];
      sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 1);
      sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 2);
      if (t == 0) store(g + 8 * h, o, sum);
    }
  }
}

template <Precision P>
__global__ void __launch_bounds__(kWgmmaThreads, 1)
    liif_query_wgmma_kernel(const QueryKernelParams<float> p) {
  static_assert(P == Precision::kBf16 || P == Precision::kFp16, "16-bit operands");
  constexpr int kChunksPerLayer = kFastWidth / mma_chunk_inputs(P);
  constexpr int kSteps = kFastWidth / 16;  // wgmma k-steps of a layer
  LIIF_DYNAMIC_SHARED(smem);
  const SharedLayout layout = wgmma_layout(P, p.grid.num_neighbours);
  const BlockShared<float, unsigned char> s = carve_shared<float, unsigned char>(smem, layout);
  unsigned char* ring = s.weights;
  const unsigned char* weights = static_cast<const unsigned char*>(p.operand_weights);
  const int hidden = p.num_layers - 2;
  const int chunks = hidden * kChunksPerLayer;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * layout.queries;
  // The chunks to copy: all, or none with the no-weight-loads timing probe (a bound rather than a
  // flag, which spills this kernel: 255 registers).
  const int copied_chunks = p.timing_probe & kProbeNoWeightLoads ? 0 : chunks;

  record_phase(p, kPhaseStart);
  record_phase(p, kPhaseTiles, 1);
  // The first chunks stream in while the geometry and layer 0 are computed. One group per chunk
  // slot, empty past the last chunk: chunk c has landed when at most kWgmmaStages - 3 groups are
  // pending at chunk c.
  for (int c = 0; c < kWgmmaStages - 2; ++c) {
    if (c < copied_chunks) wgmma_fetch_chunk(weights, c, ring + c * kWgmmaChunkBytes);
    async_copy_commit();
  }
  load_geometry_by_row<kWgmmaThreads>(p, s, first, layout.queries);
  __syncthreads();
  record_phase(p, kPhaseGeometry);
  mma_first_layer<P, kWgmmaThreads>(p, s, smem);
  __syncthreads();
  record_phase(p, kPhaseFirstLayer);

  // Warp w owns rows 16 w .. +15 (warpgroup w / 4, its warp w % 4).
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int row0 = 16 * warp;
  const int t = lane % 4;
  uint32_t a[kSteps][4];
  wgmma_first_operands<P>(a, s.act, row0, lane);

  auto out_dim = [&] { return p.widths[p.num_layers - 1]; };
  auto last_w = [&] { return p.weights + static_cast<int64_t>(hidden) * kFastWidth * kFastWidth; };
  auto last_b = [&] { return p.biases + static_cast<int64_t>(hidden) * kFastWidth; };
  // The rows' predictions (without the last bias) after the last layer, where layer 0's
  // activations were: every warp loaded its A operand from there before the first chunk's barrier.
  float* preds = reinterpret_cast<float*>(s.act);
  float acc[128];
  for (int l = 0; l < hidden; ++l) {
    start_from_bias(acc, p.biases + static_cast<int64_t>(l) * kFastWidth, t);
#pragma unroll
    for (int c = 0; c < kChunksPerLayer; ++c) {
      const int chunk = l * kChunksPerLayer + c;
      // This thread's copies of `chunk` have landed and are visible to the tensor cores (async
      // proxy); after the barrier everybody's are, and both warpgroups have retired the wgmmas of
      // chunk - 2, whose slot the next fetch refills.
      async_copy_wait<kWgmmaStages - 3>();
      fence_proxy_async();
      __syncthreads();
      if (chunk + kWgmmaStages - 2 < copied_chunks) {
        const int next = chunk + kWgmmaStages - 2;
        wgmma_fetch_chunk(weights, next, ring + (next % kWgmmaStages) * kWgmmaChunkBytes);
      }
      async_copy_commit();
      const uint32_t slot = shared_address(ring + (chunk % kWgmmaStages) * kWgmmaChunkBytes);
      wgmma_fence();
#pragma unroll
      for (int step = 0; step < 2; ++step) {
        wgmma_m64n256k16<P>(acc, a[2 * c + step],
                            wgmma_descriptor(slot + step * kWgmmaStepBytes, kWgmmaLbo, kWgmmaSbo));
      }
      wgmma_commit();
      wgmma_wait<1>();  // the wgmmas of chunk - 1 are done
    }
    wgmma_wait<0>();
#pragma unroll
    for (int e = 0; e < 128; ++e) fence_register(acc[e]);
    if (l + 1 < hidden) {
      wgmma_next_operands<P>(a, acc);
    } else {
      // The last hidden layer's activations, rounded as the operand type, then the last layer.
      round_as_operands<P>(acc);
      wgmma_fold_last_layer(acc, last_w(), out_dim(), lane, [&](int row, int o, float sum) {
        preds[(row0 + row) * out_dim() + o] = sum;
      });
    }
  }
  __syncthreads();
  record_phase(p, kPhaseLayers);

  blend_and_write(p, s, layout.queries, out_dim(), first,
                  [&](int r, int o) { return last_b()[o] + preds[r * out_dim() + o]; });
  phase_barrier(p);
  record_phase(p, kPhaseEnd);
}

#else
// Targets other than sm_90a (never launched there, see LIIF_WGMMA).
template <Precision P>
__global__ void liif_query_wgmma_kernel(const QueryKernelParams<float>) {
  __trap();
}
#endif  // LIIF_WGMMA

}  // namespace cuda
}  // namespace liif
