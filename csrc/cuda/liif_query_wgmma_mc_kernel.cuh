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
//   - each of the kWgmmaMcStages ring slots has a full mbarrier (one arrival, this block's
//     refiller, thread 0, announcing the chunk's 16 KiB; complete once both parts have landed) and
//     an empty one (an arrival from each warp of each block of the cluster once its wgmmas reading
//     the slot are retired). The refiller of each block refills a slot with its part of the chunk
//     S ahead once its own empty mbarrier says every block of the cluster is done with it, one
//     chunk behind the releases (so that it rarely waits). No block-wide barrier per chunk: a
//     warpgroup waits for its chunk's full mbarrier only;
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
// The ping-pong schedule (kPingPong, LIIF_CUDA_TENSOR_CORE_KERNEL=wgmma_pp; not yet measured): the
// two warpgroups of the kernel above wait for the same chunks, so they reach the end of each layer
// together, and the tensor cores idle while both add the bias, apply the ReLU and round the next
// layer's operands. Here the second warpgroup starts each hidden layer only once the first has
// issued the layer's first kWgmmaPpLead chunks (a named barrier), and the ring has kWgmmaPpStages
// slots, so that the first can run that far ahead: each warpgroup's end of a layer runs while the
// other's products keep the tensor cores busy (FlashAttention-3's ping-pong of two warpgroups).
// Refills are the trailing warpgroup's (its thread 128): the leading one's thread 0, waiting for a
// release by the trailing warpgroup while that one waits for the leading one, would deadlock. At
// each layer's start the refiller also makes the refill its next release would, so that the
// leading warpgroup's last chunk of the layer is on its way early. The same products in the same
// order: the same bits.
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
static_assert(kWgmmaMcStages >= 2 && kWgmmaPpStages >= 2,
              "a chunk in flight while one is multiplied");

// The ping-pong schedule's named barriers (0 is __syncthreads()'s).
constexpr int kPpLeadBarrier = 1;  // the leading warpgroup issued a layer's first chunks
constexpr int kPpFoldBarrier = 2;  // the leading warpgroup's warps, before its last-layer fold

template <Precision P, bool kPingPong>
__global__ void __launch_bounds__(kWgmmaThreads, 1)
    liif_query_wgmma_mc_kernel(const QueryKernelParams<float> p) {
  static_assert(P == Precision::kBf16 || P == Precision::kFp16, "16-bit operands");
  constexpr int kChunksPerLayer = kFastWidth / mma_chunk_inputs(P);
  constexpr int kStages = wgmma_mc_stages(kPingPong);
  static_assert(kChunksPerLayer >= kStages,
                "a hidden layer has at least as many chunks as the ring has slots (the first fill, "
                "the exit's wait)");
  // Ping-pong: chunk Y of the stream past the first fill is fetched once the refiller (in the
  // trailing warpgroup) has released chunk Y - kStages + 1, or at the start of the layer that
  // chunk Y - kStages + 1 begins, all of the layer before released. So the leading warpgroup can
  // issue a layer's chunk kWgmmaPpLead - 1 while the trailing one waits at the layer's start: no
  // deadlock. And the chunk after which it arrives for layer l + 1 (past the first fill) is
  // fetched after the trailing one's wait for layer l: one barrier id serves every layer.
  static_assert(!kPingPong || (kWgmmaPpLead >= 1 && kWgmmaPpLead <= kStages &&
                               kWgmmaPpLead < kChunksPerLayer &&
                               kStages < kChunksPerLayer + kWgmmaPpLead),
                "the ping-pong lead fits the ring");
  // The thread that refills the ring (above).
  constexpr unsigned kRefiller = kPingPong ? 128 : 0;
  static_assert(kMmaRows * kMmaMaxOutDim * 4 <= (kMmaRows / 2) * mma_act_pitch_bytes(P),
                "the predictions go over the leading warpgroup's rows only");
  constexpr int kSteps = kFastWidth / 16;  // wgmma k-steps of a layer
  constexpr int kPart = kWgmmaChunkBytes / kWgmmaMcCluster;
  constexpr uint32_t kWholeCluster = (1u << kWgmmaMcCluster) - 1;
  constexpr int kWarps = kWgmmaThreads / 32;
  LIIF_DYNAMIC_SHARED(smem);
  const SharedLayout layout = wgmma_mc_layout(P, p.grid.num_neighbours, kPingPong);
  const BlockShared<float, unsigned char> s = carve_shared<float, unsigned char>(smem, layout);
  unsigned char* ring = s.weights;
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + kStages * kWgmmaChunkBytes);
  uint64_t* empty = full + kStages;
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

  // The refiller's place in the stream, counted rather than divided (on its path, once per chunk):
  // the next chunk to fetch, the same within its tile (the stream repeats a tile's chunks), its
  // ring slot and the parity of the slot's empty mbarrier phase that the chunk waits for (the
  // release of the chunk kStages before it; the first kStages chunks wait for none).
  int next = 0, fetched = 0, fetch_slot = 0;
  uint32_t fetch_parity = 1;
  // Chunk `next` into its slot: announced on this block's full mbarrier, this block's part copied
  // into the slot of every block of the cluster.
  auto fetch = [&] {
    mbarrier_arrive_expect_tx(full + fetch_slot, chunk_bytes);
    if (chunk_bytes != 0) {
      bulk_copy(ring + fetch_slot * kWgmmaChunkBytes + rank * kPart,
                weights + static_cast<int64_t>(fetched) * kWgmmaChunkBytes + rank * kPart,
                kPart, full + fetch_slot, kWholeCluster);
    }
    ++next;
    if (++fetched == chunks) fetched = 0;
    if (++fetch_slot == kStages) {
      fetch_slot = 0;
      fetch_parity ^= 1u;
    }
  };
  // The stream's chunks up to `last` (those the stream has), each once the refiller's own empty
  // mbarrier has every warp of the cluster's release of the chunk kStages before it.
  auto refill_to = [&](int last) {
    while (next <= last && next < stream) {
      mbarrier_wait(empty + fetch_slot, fetch_parity);
      fetch();
    }
  };

  if (threadIdx.x == 0) {
    for (int slot = 0; slot < kStages; ++slot) {
      mbarrier_init(full + slot, 1);
      mbarrier_init(empty + slot, kWgmmaMcCluster * kWarps);
    }
    fence_mbarrier_init();
  }
  cluster_sync();
  // The first chunks stream in while the first tile's geometry and layer 0 are computed.
  if (threadIdx.x == kRefiller) {
    for (int c = 0; c < kStages; ++c) fetch();
  }

  // Warp w owns rows 16 w .. +15 of each tile (warpgroup w / 4, its warp w % 4).
  const int row0 = 16 * warp;
  const int warpgroup = warp / 4;
  const int t = lane % 4;
  // The ring's position, counted rather than divided: the slot of the next chunk to multiply and
  // the parity of its phase, and the same for the next chunk to release.
  int slot = 0, released = 0, release_slot = 0;
  uint32_t parity = 0, release_parity = 0;
  // This warp's wgmmas reading the next chunk to release are retired: lane 0 arrives on the slot's
  // empty mbarrier in every block of the cluster. Then the refiller refills the slot of the chunk
  // before it with the chunk kStages after that one: one chunk behind, so that the refiller (and
  // with it its warpgroup) rarely waits there for the other warpgroup or the other block.
  auto release = [&] {
    if (lane == 0) {
      for (uint32_t block = 0; block < kWgmmaMcCluster; ++block) {
        mbarrier_arrive(empty + release_slot, block);
      }
    }
    if (threadIdx.x == kRefiller) refill_to(released - 1 + kStages);
    __syncwarp();  // lane 0 rejoins its warp before the next warpgroup-wide (.aligned) instruction
    ++released;
    if (++release_slot == kStages) {
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
      if constexpr (kPingPong) {
        if (warpgroup == 1) {
          // The refill its next release would make, now: it waits for nothing of the leading
          // warpgroup's, which thus has the layer's last chunk on its way while it issues the
          // first ones (else fetched only once the trailing warpgroup released its first).
          if (threadIdx.x == kRefiller) refill_to(released - 1 + kStages);
          __syncwarp();  // (bar.sync is .aligned)
          // The trailing warpgroup starts the layer once the leading one has issued its first
          // kWgmmaPpLead chunks (the bias loads above on their way meanwhile).
          named_barrier_sync(kPpLeadBarrier, kWgmmaThreads);
        }
      }
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
        if constexpr (kPingPong) {
          if (c == kWgmmaPpLead - 1 && warpgroup == 0) {
            named_barrier_arrive(kPpLeadBarrier, kWgmmaThreads);
          }
        }
        wgmma_wait<1>();  // the wgmmas of the chunk before are done
        if (c > 0) release();
        if (++slot == kStages) {
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
        // whose predictions go over layer 0's activations (the leading warpgroup's rows: at most
        // 16 KiB of its 33) once every warp has loaded its own (no barrier per chunk orders the
        // warps here). With the ping-pong schedule, the leading warpgroup's warps wait for each
        // other only: the trailing one's waited for all of them (after their loads) at this
        // layer's start, and it loaded its own rows, which no prediction overwrites.
        round_as_operands<P>(acc);
        if constexpr (kPingPong) {
          if (warpgroup == 0) named_barrier_sync(kPpFoldBarrier, 128);
        } else {
          __syncthreads();
        }
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
  // kStages chunks (the others were waited for by the refills): then no arrival of the
  // peer is still on its way to this block's mbarriers, and this block's copies into the peer
  // have landed (the peer released them after its full mbarrier saw them). Cheaper than a
  // cluster barrier here (a MEMBAR.ALL.GPU after the outputs' stores), and the other threads exit.
  if (threadIdx.x == 0) {
    for (int c = stream - kStages; c < stream; ++c) {
      mbarrier_wait(empty + c % kStages, static_cast<uint32_t>(c / kStages) & 1u);
    }
  }
}

#else
// Targets other than sm_90a (never launched there, see LIIF_WGMMA).
template <Precision P, bool kPingPong>
__global__ void liif_query_wgmma_mc_kernel(const QueryKernelParams<float>) {
  __trap();
}
#endif  // LIIF_WGMMA

}  // namespace cuda
}  // namespace liif
