// The wgmma kernel with its weights multicast across a cluster (sm_90a: H100, H200; bf16 and fp16):
// the wgmma kernel's tiles of 128 rows, geometry, layer 0, products, roundings and last-layer fold
// (liif_query_wgmma_kernel.cuh), with another weight stream. At 45% of the dense peak the wgmma
// kernel's stream (every block fetches each layer's 128 KiB from L2 for its 128 rows) would move
// about 3.4 TB/s from L2 at 1080p, near what L2 delivers; here each byte serves two blocks:
//   - blocks come in clusters of kWgmmaMcCluster (2, on neighbouring SMs). A chunk of the hidden
//     layers' weights (16 KiB, packed on the host as the exact image of a ring slot in wgmma's
//     canonical layout) is copied by the TMA unit: block r of the cluster copies part r of it, one
//     cp.async.bulk, into the same slot of every block of the cluster (.multicast::cluster). Each
//     byte fetched from L2 serves 2 x 128 rows, and a chunk costs each SM one instruction instead
//     of the wgmma kernel's 1024 16-byte copies;
//   - each of the kWgmmaMcStages ring slots has a full mbarrier (one arrival, this block's thread
//     0 announcing the chunk's 16 KiB; complete once both parts have landed) and an empty one (an
//     arrival from each warp of each block of the cluster once its wgmmas reading the slot are
//     retired). Thread 0 of each block refills a slot with its part of the chunk S ahead once its
//     own empty mbarrier says every block of the cluster is done with it, one chunk behind the
//     releases (so that it rarely waits). No block-wide barrier per chunk: a warpgroup waits for
//     its chunk's full mbarrier only;
//   - persistent: the grid is as many clusters as the device runs at once (launch_blocks), and
//     each cluster loops over pairs of tiles, block r of the cluster taking tile r of each pair,
//     with one weight stream through all of them (the next tile's first chunks stream in while
//     the tile before is finished and the next one's geometry and layer 0 are computed). Run 7
//     measured a block per tile: its phases summed to about 37,600 cycles per tile, its time to
//     about 43,000 (1080p on an H200, docs/gpu.md), the difference most likely each block's start
//     (launch, mbarrier initialisation, cluster barrier, the ring's first chunks) and end;
//   - the cluster synchronises when the mbarriers are initialised (before a copy or an arrival
//     can reach a peer's); before a block exits, its thread 0 waits for the cluster's release of
//     the last chunks (arrivals for them may still be on their way to its mbarriers). A block
//     past the last tile (an odd number of tiles) takes part in the stream and writes nothing.
// Deterministic, the same bits as the wgmma kernel: the same products in the same order.
//
// Compiled by nvcc for sm_90a, and by the host execution harness, which runs a cluster's blocks
// together, with mbarriers that count arrivals and transaction bytes and bulk copies that land at
// the latest moment (or, in reversed order, at once), so that a wait, an arrival or a refill out of
// place fails in CI (tests/test_tensor_core_harness.py).
#pragma once

#include <cstdint>

#include "liif_query_wgmma_kernel.cuh"

namespace liif {
namespace cuda {

#if defined(LIIF_WGMMA)

static_assert(kWgmmaChunkBytes % (16 * kWgmmaMcCluster) == 0, "whole 16-byte units per part");
static_assert(kWgmmaMcStages >= 2, "a chunk in flight while one is multiplied");
static_assert(kFastWidth / mma_chunk_inputs(Precision::kBf16) >= kWgmmaMcStages &&
                  kFastWidth / mma_chunk_inputs(Precision::kFp16) >= kWgmmaMcStages,
              "a hidden layer has at least as many chunks as the ring has slots (the first fill, the "
              "exit's wait)");

template <Precision P>
__global__ void __launch_bounds__(kWgmmaThreads, 1)
    liif_query_wgmma_mc_kernel(const QueryKernelParams<float> p) {
  static_assert(P == Precision::kBf16 || P == Precision::kFp16, "16-bit operands");
  constexpr int kChunksPerLayer = kFastWidth / mma_chunk_inputs(P);
  constexpr int kSteps = kFastWidth / 16;  // wgmma k-steps of a layer
  constexpr int kPart = kWgmmaChunkBytes / kWgmmaMcCluster;
  constexpr uint32_t kWholeCluster = (1u << kWgmmaMcCluster) - 1;
  constexpr int kWarps = kWgmmaThreads / 32;
  LIIF_DYNAMIC_SHARED(smem);
  const SharedLayout layout = wgmma_mc_layout(P, p.grid.num_neighbours);
  const BlockShared<float, unsigned char> s = carve_shared<float, unsigned char>(smem, layout);
  unsigned char* ring = s.weights;
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + kWgmmaMcStages * kWgmmaChunkBytes);
  uint64_t* empty = full + kWgmmaMcStages;
  const unsigned char* weights = static_cast<const unsigned char*>(p.operand_weights);
  const int hidden = p.num_layers - 2;
  const int chunks = hidden * kChunksPerLayer;  // per tile
  const uint32_t rank = cluster_rank();
  // The cluster's pairs of tiles: pair k + i K for i = 0 .. its iterations - 1, of K clusters.
  // launch_blocks launches no more clusters than pairs, so every cluster has one at least.
  const int64_t tiles = (p.total_queries + layout.queries - 1) / layout.queries;
  const int64_t pairs = (tiles + kWgmmaMcCluster - 1) / kWgmmaMcCluster;
  const int64_t clusters = gridDim.x / kWgmmaMcCluster;
  const int64_t cluster = blockIdx.x / kWgmmaMcCluster;
  const int iterations = static_cast<int>((pairs - cluster + clusters - 1) / clusters);
  // The chunks this block's ring carries: an int even on one cluster (wgmma_mc_path_applies).
  const int stream = iterations * chunks;
  // No copies with the no-weight-loads timing probe: the announcement alone completes a phase.
  const uint32_t chunk_bytes = p.timing_probe & kProbeNoWeightLoads ? 0 : kWgmmaChunkBytes;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;

  // The next chunk of the stream into ring slot `slot` (its index in the stream modulo
  // kWgmmaMcStages), by thread 0: the chunk announced on this block's full mbarrier, this block's
  // part copied into the slot of every block of the cluster. The stream repeats a tile's chunks:
  // `fetched` counts them within the tile, rather than a division per chunk on thread 0's path.
  int fetched = 0;
  auto fetch = [&](int slot) {
    mbarrier_arrive_expect_tx(full + slot, chunk_bytes);
    if (chunk_bytes != 0) {
      bulk_copy(ring + slot * kWgmmaChunkBytes + rank * kPart,
                weights + static_cast<int64_t>(fetched) * kWgmmaChunkBytes + rank * kPart,
                kPart, full + slot, kWholeCluster);
    }
    if (++fetched == chunks) fetched = 0;
  };

  if (threadIdx.x == 0) {
    for (int slot = 0; slot < kWgmmaMcStages; ++slot) {
      mbarrier_init(full + slot, 1);
      mbarrier_init(empty + slot, kWgmmaMcCluster * kWarps);
    }
    fence_mbarrier_init();
  }
  cluster_sync();
  // The first chunks stream in while the first tile's geometry and layer 0 are computed.
  if (threadIdx.x == 0) {
    for (int c = 0; c < kWgmmaMcStages; ++c) fetch(c);
  }

  // Warp w owns rows 16 w .. +15 of each tile (warpgroup w / 4, its warp w % 4).
  const int row0 = 16 * warp;
  const int t = lane % 4;
  // The ring's position, counted rather than divided: the slot of the next chunk to multiply and
  // the parity of its phase, and the same for the next chunk to release.
  int slot = 0, released = 0, release_slot = 0;
  uint32_t parity = 0, release_parity = 0;
  // This warp's wgmmas reading the next chunk to release are retired: lane 0 arrives on the slot's
  // empty mbarrier in every block of the cluster. Then thread 0 refills the slot of the chunk
  // before it with the chunk kWgmmaMcStages after that one, once its own empty mbarrier has every
  // warp of the cluster's arrival for it: one chunk behind, so that thread 0 (and with it its
  // warpgroup) rarely waits there for the other warpgroup or the other block.
  auto release = [&] {
    if (lane == 0) {
      for (uint32_t block = 0; block < kWgmmaMcCluster; ++block) {
        mbarrier_arrive(empty + release_slot, block);
      }
    }
    if (threadIdx.x == 0 && released > 0 && released - 1 + kWgmmaMcStages < stream) {
      const int before = release_slot == 0 ? kWgmmaMcStages - 1 : release_slot - 1;
      mbarrier_wait(empty + before, release_slot == 0 ? release_parity ^ 1u : release_parity);
      fetch(before);  // chunk released - 1 + kWgmmaMcStages of the stream
    }
    __syncwarp();  // lane 0 rejoins its warp before the next warpgroup-wide (.aligned) instruction
    ++released;
    if (++release_slot == kWgmmaMcStages) {
      release_slot = 0;
      release_parity ^= 1u;
    }
  };

  auto out_dim = [&] { return p.widths[p.num_layers - 1]; };
  auto last_w = [&] { return p.weights + static_cast<int64_t>(hidden) * kFastWidth * kFastWidth; };
  auto last_b = [&] { return p.biases + static_cast<int64_t>(hidden) * kFastWidth; };
  // The rows' predictions (without the last bias) after the last layer, where layer 0's
  // activations were.
  float* preds = reinterpret_cast<float*>(s.act);
  for (int i = 0; i < iterations; ++i) {
    const int64_t first = ((cluster + i * clusters) * kWgmmaMcCluster + rank) * layout.queries;
    // The phase clocks of a block's last tile (each tile overwrites them); none past the last tile.
    const bool clocked = first < p.total_queries;
    if (clocked) {
      record_phase(p, kPhaseStart);
      record_phase(p, kPhaseTiles, 1);
    }
    load_geometry_by_row<kWgmmaThreads>(p, s, first, layout.queries);
    __syncthreads();
    if (clocked) record_phase(p, kPhaseGeometry);
    mma_first_layer<P, kWgmmaThreads>(p, s, smem);
    __syncthreads();
    if (clocked) record_phase(p, kPhaseFirstLayer);

    uint32_t a[kSteps][4];
    wgmma_first_operands<P>(a, s.act, row0, lane);
    float acc[128];
    for (int l = 0; l < hidden; ++l) {
      start_from_bias(acc, p.biases + static_cast<int64_t>(l) * kFastWidth, t);
#pragma unroll
      for (int c = 0; c < kChunksPerLayer; ++c) {
        // Both parts of this chunk have landed in this block's slot (the full mbarrier's phase).
        mbarrier_wait(full + slot, parity);
        const uint32_t address = shared_address(ring + slot * kWgmmaChunkBytes);
        wgmma_fence();
#pragma unroll
        for (int step = 0; step < 2; ++step) {
          wgmma_m64n256k16<P>(
              acc, a[2 * c + step],
              wgmma_descriptor(address + step * kWgmmaStepBytes, kWgmmaLbo, kWgmmaSbo));
        }
        wgmma_commit();
        wgmma_wait<1>();  // the wgmmas of the chunk before are done
        if (c > 0) release();
        if (++slot == kWgmmaMcStages) {
          slot = 0;
          parity ^= 1u;
        }
      }
      wgmma_wait<0>();
      release();  // the layer's last chunk
#pragma unroll
      for (int e = 0; e < 128; ++e) fence_register(acc[e]);
      if (l + 1 < hidden) {
        wgmma_next_operands<P>(a, acc);
      } else {
        // The last hidden layer's activations, rounded as the operand type, then the last layer,
        // whose predictions go over layer 0's activations once every warp has loaded its own (no
        // barrier per chunk orders the warps here).
        round_as_operands<P>(acc);
        __syncthreads();
        wgmma_fold_last_layer(acc, last_w(), out_dim(), lane, [&](int row, int o, float sum) {
          preds[(row0 + row) * out_dim() + o] = sum;
        });
      }
    }
    __syncthreads();
    if (clocked) record_phase(p, kPhaseLayers);

    blend_and_write(p, s, layout.queries, out_dim(), first,
                    [&](int r, int o) { return last_b()[o] + preds[r * out_dim() + o]; });
    // The blend has read the predictions and the geometry before the next tile overwrites them.
    __syncthreads();
    if (clocked) record_phase(p, kPhaseEnd);
  }
  // Before the block exits, thread 0 waits for every warp of the cluster's release of the last
  // kWgmmaMcStages chunks (the others were waited for by the refills): then no arrival of the
  // peer is still on its way to this block's mbarriers, and this block's copies into the peer
  // have landed (the peer released them after its full mbarrier saw them). Cheaper than a
  // cluster barrier here (a MEMBAR.ALL.GPU after the outputs' stores), and the other threads exit.
  if (threadIdx.x == 0) {
    for (int c = stream - kWgmmaMcStages; c < stream; ++c) {
      mbarrier_wait(empty + c % kWgmmaMcStages, static_cast<uint32_t>(c / kWgmmaMcStages) & 1u);
    }
  }
}

#else
// Targets other than sm_90a (never launched there, see LIIF_WGMMA).
template <Precision P>
__global__ void liif_query_wgmma_mc_kernel(const QueryKernelParams<float>) {
  __trap();
}
#endif  // LIIF_WGMMA

}  // namespace cuda
}  // namespace liif
