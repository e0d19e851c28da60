// What the CUDA query kernels take and how they are launched: the parameter block, the shared-memory
// layout and the choice between the specialised and the generic kernel. Plain C++ without torch or
// CUDA headers, so that the CUDA launcher (liif_query_kernels.cu), the Tensor-level wrapper
// (liif_query_cuda.cpp) and the host execution harness (tests/harness) share one definition.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../liif_geometry.h"
#include "liif_phase_clocks.h"

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

// Arithmetic of the hidden layers (liif_cuda.query's `precision`). kFp32 is exact; the others run
// the tensor-core kernel when it applies (tensor_core_path_applies) and float32 otherwise.
enum class Precision : int { kFp32 = 0, kTf32 = 1, kBf16 = 2, kFp16 = 3 };

// The tensor-core kernel: the published shape (hidden layers 256 wide) with 64 rows per block; the
// activations live in shared memory as the operand type (2 bytes for bf16/fp16, a float rounded to
// tf32), weights stream through two chunks of kTensorCoreChunk(P) input rows. Rows are padded by 16
// bytes so that the fragment loads of 8 consecutive rows hit different banks.
constexpr int kTensorCoreRows = 64;
constexpr int kTensorCoreMaxOutDim = 128;

LIIF_HOST_DEVICE constexpr int operand_bytes(Precision p) { return p == Precision::kTf32 ? 4 : 2; }
LIIF_HOST_DEVICE constexpr int tensor_core_pitch(Precision p) {
  return kFastWidth + 16 / operand_bytes(p);
}
// One chunk is 16 KiB of weights in global memory in either case: 1024 16-byte copies.
LIIF_HOST_DEVICE constexpr int tensor_core_chunk(Precision p) {
  return 16 * 1024 / (kFastWidth * operand_bytes(p));
}

// The mma.sync tensor-core kernel (same shape and precisions, sm_80+), built for the data movement:
// 128 (query, neighbour) rows per block, so that each weight byte fetched from L2 serves 128 rows;
// activations in shared memory as the operand type, rows padded by 16 bytes (ldmatrix's eight row
// addresses then fall in distinct banks); the hidden layers' weights streamed through a ring of
// kMmaStages chunks by asynchronous copies, kMmaStages - 1 chunks in flight. A chunk holds, for each
// of the 256 output columns, 64 bytes of its inputs (32 bf16 / fp16 or 16 tf32 operands: two mma
// k-steps), stored in rows padded to 80 bytes (again distinct banks). The last layer's per-warp
// partial sums reuse the ring, which bounds out_dim.
constexpr int kMmaRows = 128;
constexpr int kMmaStages = 4;
constexpr int kMmaChunkRowBytes = 64;
constexpr int kMmaChunkPitch = kMmaChunkRowBytes + 16;
constexpr int kMmaChunkBytes = kFastWidth * kMmaChunkPitch;
constexpr int kMmaWarpsAlongColumns = 4;  // each warp: 64 columns of a layer's outputs
// Threads of a block whose warps own `warp_rows` rows each (64: 8 warps; 32: 16 warps).
LIIF_HOST_DEVICE constexpr int mma_threads(int warp_rows) {
  return 32 * kMmaWarpsAlongColumns * (kMmaRows / warp_rows);
}
constexpr int kMmaMaxOutDim = 32;
static_assert(kMmaWarpsAlongColumns * kMmaRows * kMmaMaxOutDim * 4 <= kMmaStages * kMmaChunkBytes,
              "the last layer's partial sums fit the weight ring");

// The wgmma kernel (bf16 and fp16 on sm_90a): the same 128 rows per block as two warpgroups of 64,
// the same packed weights, streamed through kWgmmaStages chunks of 16 KiB (unpadded: wgmma reads
// them in its canonical layout); the activations live in registers, only layer 0's in shared
// memory (as the mma.sync kernel's).
constexpr int kWgmmaThreads = 256;
constexpr int kWgmmaStages = 6;
constexpr int kWgmmaChunkBytes = kFastWidth * kMmaChunkRowBytes;

// Its warp-specialised, persistent form (liif_query_wgmma_ws_kernel.cuh): a producer warpgroup
// (geometry, layer 0 and the blend of the block's tiles of 128 rows) beside two consumer
// warpgroups (the hidden layers by wgmma, both operands in shared memory), each block looping over
// tiles; two tiles' operands in shared memory (one being produced while the other is multiplied)
// and a ring of kWgmmaWsStages weight chunks.
constexpr int kWgmmaWsThreads = 384;
constexpr int kWgmmaWsStages = 5;
// Its registers per thread at launch (one block of 384 threads per SM): setmaxnreg then moves
// some from the producer to the consumers, which needs the whole pool.
constexpr int kWgmmaWsLaunchRegisters = 65536 / kWgmmaWsThreads / 8 * 8;

// The wgmma kernel with its weights multicast (liif_query_wgmma_mc_kernel.cuh): the wgmma kernel's
// block, in clusters of kWgmmaMcCluster blocks that share each weight chunk: every block copies its
// part of a chunk by one bulk copy (the TMA unit) into the ring of every block of the cluster, so
// that each weight byte fetched from L2 serves kWgmmaMcCluster x 128 rows. A ring of
// kWgmmaMcStages chunks with a full and an empty mbarrier per slot.
constexpr int kWgmmaMcCluster = 2;
constexpr int kWgmmaMcStages = 6;
// Its ping-pong form (the same kernel with kPingPong): the second warpgroup starts each hidden layer
// kWgmmaPpLead chunks after the first, so that one warpgroup's end of a layer (bias, ReLU, the next
// operands) runs while the other's products keep the tensor cores busy. A ring of kWgmmaPpStages
// chunks: the leading warpgroup may run kWgmmaPpStages - 1 chunks ahead of the other's releases.
constexpr int kWgmmaPpStages = 8;
constexpr int kWgmmaPpLead = 4;

LIIF_HOST_DEVICE constexpr int mma_chunk_inputs(Precision p) {
  return kMmaChunkRowBytes / operand_bytes(p);
}
LIIF_HOST_DEVICE constexpr int mma_act_pitch_bytes(Precision p) {
  return kFastWidth * operand_bytes(p) + 16;
}

// Which tensor-core kernel runs the reduced precisions where several could (liif_cuda.query reads
// it from LIIF_CUDA_TENSOR_CORE_KERNEL): the default (kAuto: what an H200 measured fastest, see
// plan_launch), mma.sync with 8 warps per block (kMma), the same with 16 warps of half the rows each
// (kMma16), the WMMA kernel mma.sync replaced, or the wgmma kernel, its warp-specialised form or
// its form with multicast weights, or that form's ping-pong schedule (bf16 and fp16 on sm_90a builds
// and GPUs; elsewhere, and for tf32, the mma.sync kernel runs).
enum class TensorCoreKernel : int {
  kMma = 0,
  kWmma = 1,
  kMma16 = 2,
  kWgmma = 3,
  kWgmmaWs = 4,
  kAuto = 5,
  kWgmmaMc = 6,
  kWgmmaPp = 7
};

// The kernel a name ("auto", "mma", "mma16", "wmma", "wgmma", "wgmma_ws", "wgmma_mc" or
// "wgmma_pp"; empty or null: "auto") selects, into *kernel; false for any other name. Shared by
// liif_cuda.query (the environment variable) and the host harness (its argument).
inline bool tensor_core_kernel_named(const char* name, TensorCoreKernel* kernel) {
  if (name == nullptr || name[0] == '\0' || std::strcmp(name, "auto") == 0) {
    *kernel = TensorCoreKernel::kAuto;
  } else if (std::strcmp(name, "mma") == 0) {
    *kernel = TensorCoreKernel::kMma;
  } else if (std::strcmp(name, "mma16") == 0) {
    *kernel = TensorCoreKernel::kMma16;
  } else if (std::strcmp(name, "wmma") == 0) {
    *kernel = TensorCoreKernel::kWmma;
  } else if (std::strcmp(name, "wgmma") == 0) {
    *kernel = TensorCoreKernel::kWgmma;
  } else if (std::strcmp(name, "wgmma_ws") == 0) {
    *kernel = TensorCoreKernel::kWgmmaWs;
  } else if (std::strcmp(name, "wgmma_mc") == 0) {
    *kernel = TensorCoreKernel::kWgmmaMc;
  } else if (std::strcmp(name, "wgmma_pp") == 0) {
    *kernel = TensorCoreKernel::kWgmmaPp;
  } else {
    return false;
  }
  return true;
}

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
  // The tensor-core kernel's operands: layers 1 .. L-2 (the hidden ones) as `weights`, converted to
  // the operand type of `precision` (__half, __nv_bfloat16, or float rounded to tf32).
  const void* operand_weights = nullptr;
  Precision precision = Precision::kFp32;
  T* out = nullptr;  // (B * Q, out_dim)
  FeatureGrid<T> grid{};
  int64_t total_queries = 0;  // B * Q
  int64_t queries_per_image = 0;
  int num_layers = 0;
  int widths[kMaxLayers] = {};  // output width of each layer; widths[num_layers - 1] = out_dim
  int act_pitch = 0;            // floats per activation row in shared memory
  int queries_per_block = 0;
  // Timing probes (LIIF_CUDA_TIMING_PROBE, for benchmarks/bench_gpu.py's probe-* rows only; the
  // outputs are then wrong), bits of kProbe*: each takes one of the tensor-core kernels' data
  // streams away, so that the kernel's time without it shows what that stream costs.
  int timing_probe = 0;
  // With kProbePhaseClocks: kPhaseSlots clocks per block (liif_phase_clocks.h), else null.
  int64_t* phase_clocks = nullptr;
  // Map staging (LIIF_CUDA_STAGE_MAP, an experiment of the mma.sync and wgmma kernels): up to
  // `staged_cells` distinct first-layer map rows of a block's tile copied once into shared memory
  // at byte `staged_offset`, its rows gathered from there; 0: off.
  int staged_cells = 0;
  int64_t staged_offset = 0;
};

// Map staging's shared memory, after everything else the block has: a header (each row's slot,
// each slot's cell, the warps' counts of new cells: kStageHeaderBytes) and kStagedCells rows of the
// map (1 KiB each). 56 fit beside the wgmma kernel's 164 KiB; a tile at x4 needs about 20.
constexpr int kStagedCells = 56;
constexpr int kStageHeaderBytes = 1024;
static_assert(4 * (kMmaRows + kStagedCells + 4) <= kStageHeaderBytes, "the header fits");
LIIF_HOST_DEVICE constexpr int64_t staging_bytes(int cells) {
  return kStageHeaderBytes + static_cast<int64_t>(cells) * kFastWidth * 4;
}

// No first-layer map rows read (zeros instead): the layer-0 gather.
constexpr int kProbeNoMapLoads = 1;
// No hidden-layer weights copied into the ring (the products read whatever it holds): the weight
// stream. Its waits and barriers stay.
constexpr int kProbeNoWeightLoads = 2;
// Outputs right: thread 0 of each block records the end of each phase (liif_phase_clocks.h).
constexpr int kProbePhaseClocks = 4;

// The probes a comma-separated list of names selects ("" or null: none; "no-map-loads",
// "no-weight-loads", "phase-clocks"), into *probe; false for anything else (an unknown or empty
// name).
inline bool timing_probe_named(const char* name, int* probe) {
  int bits = 0;
  if (name != nullptr && name[0] != '\0') {
    for (const char* start = name;; ++start) {
      const char* end = std::strchr(start, ',');
      const size_t length = end == nullptr ? std::strlen(start) : static_cast<size_t>(end - start);
      auto is = [&](const char* probe_name) {
        return std::strlen(probe_name) == length && std::strncmp(start, probe_name, length) == 0;
      };
      if (is("no-map-loads")) {
        bits |= kProbeNoMapLoads;
      } else if (is("no-weight-loads")) {
        bits |= kProbeNoWeightLoads;
      } else if (is("phase-clocks")) {
        bits |= kProbePhaseClocks;
      } else {
        return false;
      }
      if (end == nullptr) break;
      start = end;
    }
  }
  *probe = bits;
  return true;
}

// kTensorCore is the WMMA kernel, kMma the mma.sync one (8 warps), kMma16 its 16-warp form, kWgmma
// the wgmma one, kWgmmaWs its warp-specialised, persistent form, kWgmmaMc its form with multicast
// weights, kWgmmaPp that form's ping-pong schedule.
enum class KernelPath : int {
  kNone = 0,
  kFast = 1,
  kGeneric = 2,
  kTensorCore = 3,
  kMma = 4,
  kMma16 = 5,
  kWgmma = 6,
  kWgmmaWs = 7,
  kWgmmaMc = 8,
  kWgmmaPp = 9
};

// The multicast kernel, in either schedule: clusters, persistent, its weights packed as ring slots.
inline bool is_multicast(KernelPath path) {
  return path == KernelPath::kWgmmaMc || path == KernelPath::kWgmmaPp;
}

// The name of a kernel that records the phase-clocks probe's clocks, null for the others.
inline const char* phase_clock_kernel_name(KernelPath path) {
  switch (path) {
    case KernelPath::kMma: return "mma";
    case KernelPath::kMma16: return "mma16";
    case KernelPath::kWgmma: return "wgmma";
    case KernelPath::kWgmmaWs: return "wgmma_ws";
    case KernelPath::kWgmmaMc: return "wgmma_mc";
    case KernelPath::kWgmmaPp: return "wgmma_pp";
    default: return nullptr;
  }
}

struct LaunchPlan {
  KernelPath path = KernelPath::kNone;
  int threads = kThreadsPerBlock;  // per block
  int queries_per_block = 0;
  int act_pitch = 0;
  int64_t blocks = 0;  // tiles of queries_per_block queries (blocks, but for a persistent kernel)
  size_t shared_bytes = 0;
};

// Blocks per cluster for `plan`: kWgmmaMcCluster for the multicast kernel, else 1 (no clusters).
inline int launch_cluster(const LaunchPlan& plan) {
  return is_multicast(plan.path) ? kWgmmaMcCluster : 1;
}

// Blocks to launch for `plan` on a device that runs `resident` of its blocks at once (one per SM
// for these kernels; for the multicast kernel, its clusters' blocks: cudaOccupancyMaxActiveClusters
// times two): one per tile for the kernels that are not persistent. The persistent ones loop over
// tiles: the warp-specialised kernel with one block per SM, at most one per tile; the multicast
// kernel with whole clusters, as many as run at once, at most one per pair of tiles (a block past
// the last tile takes part in its cluster's weight stream and writes nothing).
inline int64_t launch_blocks(const LaunchPlan& plan, int64_t resident) {
  const int64_t at_once = resident > 0 ? resident : 1;
  if (is_multicast(plan.path)) {
    const int64_t pairs = (plan.blocks + kWgmmaMcCluster - 1) / kWgmmaMcCluster;
    const int64_t clusters = at_once / kWgmmaMcCluster > 0 ? at_once / kWgmmaMcCluster : 1;
    return (pairs < clusters ? pairs : clusters) * kWgmmaMcCluster;
  }
  if (plan.path != KernelPath::kWgmmaWs) return plan.blocks;
  return plan.blocks < at_once ? plan.blocks : at_once;
}

// Shared memory of one block, in this order: activation buffers, weight buffers (fast and
// tensor-core kernels), per row (rel_y, rel_x, blend weight in T, LR cell index), per query (cell_y,
// cell_x in T, state). Sizes in bytes, multiples of 32 (tensor-core fragments need 32-byte
// alignment), in 64 bits: the planner sizes layouts for layers far too wide to fit, and must see
// that they do not.
struct SharedLayout {
  int rows = 0;
  int queries = 0;
  int64_t act_bytes = 0;     // all activation buffers together
  int64_t weight_bytes = 0;  // the two weight chunks; 0 for the generic kernel
};

template <typename T>
inline size_t shared_bytes(const SharedLayout& s) {
  return static_cast<size_t>(s.act_bytes) + s.weight_bytes +
         sizeof(T) * (3 * static_cast<size_t>(s.rows) + 2 * s.queries) +
         sizeof(int) * (static_cast<size_t>(s.rows) + s.queries);
}

LIIF_HOST_DEVICE constexpr int64_t round_up_32(int64_t bytes) { return (bytes + 31) / 32 * 32; }

LIIF_HOST_DEVICE SharedLayout fast_layout(int num_neighbours) {
  return {kFastRows, kFastRows / num_neighbours,
          static_cast<int>(sizeof(float)) * kFastRows * kFastWidth,
          static_cast<int>(sizeof(float)) * 2 * kFastChunk * kFastWidth};
}

template <typename T>
LIIF_HOST_DEVICE SharedLayout generic_layout(int queries, int num_neighbours, int max_width) {
  const int rows = queries * num_neighbours;
  return {rows, queries,
          round_up_32(static_cast<int64_t>(sizeof(T)) * 2 * rows * static_cast<int64_t>(max_width)),
          0};
}

LIIF_HOST_DEVICE SharedLayout tensor_core_layout(Precision p, int num_neighbours) {
  return {kTensorCoreRows, kTensorCoreRows / num_neighbours,
          operand_bytes(p) * kTensorCoreRows * tensor_core_pitch(p),
          operand_bytes(p) * 2 * tensor_core_chunk(p) * tensor_core_pitch(p)};
}
LIIF_HOST_DEVICE SharedLayout mma_layout(Precision p, int num_neighbours) {
  return {kMmaRows, kMmaRows / num_neighbours, static_cast<int64_t>(kMmaRows) * mma_act_pitch_bytes(p),
          static_cast<int64_t>(kMmaStages) * kMmaChunkBytes};
}
// The mma.sync kernel's rows and layer-0 activations, with the wgmma kernel's ring.
LIIF_HOST_DEVICE SharedLayout wgmma_layout(Precision p, int num_neighbours) {
  SharedLayout layout = mma_layout(p, num_neighbours);
  layout.weight_bytes = static_cast<int64_t>(kWgmmaStages) * kWgmmaChunkBytes;
  return layout;
}

// The multicast wgmma kernel: the wgmma kernel's layout, its ring of `stages` chunks
// (kWgmmaMcStages, or kWgmmaPpStages for the ping-pong schedule) followed by the full and the empty
// mbarrier of each slot (8 bytes each).
LIIF_HOST_DEVICE constexpr int wgmma_mc_stages(bool ping_pong) {
  return ping_pong ? kWgmmaPpStages : kWgmmaMcStages;
}
LIIF_HOST_DEVICE SharedLayout wgmma_mc_layout(Precision p, int num_neighbours,
                                              bool ping_pong = false) {
  SharedLayout layout = mma_layout(p, num_neighbours);
  const int stages = wgmma_mc_stages(ping_pong);
  layout.weight_bytes =
      static_cast<int64_t>(stages) * kWgmmaChunkBytes + round_up_32(2 * 8 * stages);
  return layout;
}

// The warp-specialised wgmma kernel: the same rows, two tiles' operands (128 rows of 256 16-bit
// inputs each, wgmma's layout, no padding) and two tiles' geometry, and its ring.
LIIF_HOST_DEVICE SharedLayout wgmma_ws_layout(Precision p, int num_neighbours) {
  SharedLayout layout = mma_layout(p, num_neighbours);
  layout.act_bytes = 2 * static_cast<int64_t>(kMmaRows) * kFastWidth * operand_bytes(p);
  layout.weight_bytes = static_cast<int64_t>(kWgmmaWsStages) * kWgmmaChunkBytes;
  return layout;
}
// Bytes of one tile's geometry (what shared_bytes adds to the buffers), and the warp-specialised
// kernel's shared memory: the layout with a second tile's geometry.
LIIF_HOST_DEVICE constexpr int64_t geometry_bytes(const SharedLayout& s) {
  return 4 * (3 * static_cast<int64_t>(s.rows) + 2 * s.queries) + 4 * (s.rows + s.queries);
}
inline size_t wgmma_ws_shared_bytes(Precision p, int num_neighbours) {
  const SharedLayout layout = wgmma_ws_layout(p, num_neighbours);
  return shared_bytes<float>(layout) + static_cast<size_t>(geometry_bytes(layout));
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

// The tensor-core kernel: a reduced precision asked for, the published shape as above, out_dim <=
// 128 (its predictions reuse the weight buffers) and a GPU with tensor cores for all three operand
// types (compute capability 8.0 or newer).
template <typename T>
inline bool tensor_core_path_applies(const QueryKernelParams<T>& p, bool has_tensor_cores) {
  return has_tensor_cores && p.precision != Precision::kFp32 && fast_path_applies(p) &&
         p.widths[p.num_layers - 1] <= kTensorCoreMaxOutDim;
}

// The mma.sync kernel, where the tensor-core kernel applies: at least one hidden layer between the
// first and the last (its main loop multiplies hidden layers only) and out_dim <= kMmaMaxOutDim.
template <typename T>
inline bool mma_path_applies(const QueryKernelParams<T>& p, bool has_tensor_cores) {
  return tensor_core_path_applies(p, has_tensor_cores) && p.num_layers >= 3 &&
         p.widths[p.num_layers - 1] <= kMmaMaxOutDim;
}

// The wgmma kernel: where the mma.sync kernel applies, for 16-bit operands, on a device that runs
// this build's sm_90a code (`has_wgmma`).
template <typename T>
inline bool wgmma_path_applies(const QueryKernelParams<T>& p, bool has_wgmma) {
  return has_wgmma && mma_path_applies(p, true) &&
         (p.precision == Precision::kBf16 || p.precision == Precision::kFp16);
}

// The multicast kernel: where the wgmma kernel applies and its weight stream's chunks, counted in
// an int (liif_query_wgmma_mc_kernel.cuh), fit one even on a single cluster (every pair of tiles'
// chunks): always, but for hundreds of millions of queries with an MLP tens of layers deep.
template <typename T>
inline bool wgmma_mc_path_applies(const QueryKernelParams<T>& p, bool has_wgmma) {
  if (!wgmma_path_applies(p, has_wgmma)) return false;
  const int64_t queries_per_tile = kMmaRows / p.grid.num_neighbours;
  const int64_t tiles = (p.total_queries + queries_per_tile - 1) / queries_per_tile;
  const int64_t chunks =
      static_cast<int64_t>(p.num_layers - 2) * (kFastWidth / mma_chunk_inputs(p.precision));
  return (tiles + kWgmmaMcCluster - 1) / kWgmmaMcCluster * chunks <= INT32_MAX;
}

// Picks the kernel and its block size for a device that grants `max_shared_bytes` per block.
// Returns path kNone when not even one query's activations fit (an MLP thousands of units wide).
// A reduced precision runs the wgmma kernel (or its warp-specialised or multicast form, or the
// latter's ping-pong schedule) if `preferred` and it applies (`has_wgmma`: the device runs this
// build's sm_90a code), else the mma.sync kernel (8 or 16 warps, as `preferred` says; unless
// `preferred` is the WMMA kernel), else the WMMA kernel (other MLP shapes, or too little shared
// memory: sm_86 / sm_89), else the float32 kernels.
// kAuto, the default, is the multicast wgmma kernel where it applies and fits (else the wgmma
// kernel), else the 16-warp mma.sync kernel: the fastest of each on an H200 for every precision and
// size measured (benchmarks/results/gpu_query_NVIDIA_H200_20261128_run7.json: at 1080p bf16 11.5 ms
// against 16.0 ms for the wgmma kernel, 15.4 for its warp-specialised form and 16.4 for 16 warps
// of mma.sync; the multicast kernel clean under memcheck and racecheck; run 6's JSON: 16 warps of
// mma.sync 6% faster than 8). The warp-specialised form stays selectable only: racecheck reports
// hazards in it (docs/gpu.md). The ping-pong schedule is selectable only until a GPU has measured it.
template <typename T>
inline LaunchPlan plan_launch(const QueryKernelParams<T>& p, size_t max_shared_bytes,
                              bool has_tensor_cores,
                              TensorCoreKernel preferred = TensorCoreKernel::kAuto,
                              bool has_wgmma = false) {
  LaunchPlan plan;
  const int nn = p.grid.num_neighbours;
  const bool automatic = preferred == TensorCoreKernel::kAuto;
  // Each 128-row kernel's shared memory, computed once for its fit and the plan.
  const size_t ws_bytes = wgmma_ws_shared_bytes(p.precision, nn);
  const size_t pp_bytes = shared_bytes<float>(wgmma_mc_layout(p.precision, nn, true));
  const size_t mc_bytes = shared_bytes<float>(wgmma_mc_layout(p.precision, nn));
  const size_t wgmma_bytes = shared_bytes<float>(wgmma_layout(p.precision, nn));
  const size_t mma_bytes = shared_bytes<float>(mma_layout(p.precision, nn));
  const bool ws = preferred == TensorCoreKernel::kWgmmaWs && wgmma_path_applies(p, has_wgmma) &&
                  ws_bytes <= max_shared_bytes;
  const bool pp = preferred == TensorCoreKernel::kWgmmaPp && wgmma_mc_path_applies(p, has_wgmma) &&
                  pp_bytes <= max_shared_bytes;
  const bool mc = (preferred == TensorCoreKernel::kWgmmaMc || automatic) &&
                  wgmma_mc_path_applies(p, has_wgmma) && mc_bytes <= max_shared_bytes;
  const bool wgmma = (preferred == TensorCoreKernel::kWgmma || (automatic && !mc)) &&
                     wgmma_path_applies(p, has_wgmma) && wgmma_bytes <= max_shared_bytes;
  if (ws || pp || mc || wgmma ||
      (preferred != TensorCoreKernel::kWmma && mma_path_applies(p, has_tensor_cores) &&
       mma_bytes <= max_shared_bytes)) {
    // They share their 128 rows per block (per tile) and their layer-0 activations' pitch.
    const bool wide = preferred == TensorCoreKernel::kMma16 || automatic;
    plan.path = ws      ? KernelPath::kWgmmaWs
                : pp    ? KernelPath::kWgmmaPp
                : mc    ? KernelPath::kWgmmaMc
                : wgmma ? KernelPath::kWgmma
                : wide  ? KernelPath::kMma16
                        : KernelPath::kMma;
    plan.threads =
        ws ? kWgmmaWsThreads : pp || mc || wgmma ? kWgmmaThreads : mma_threads(wide ? 32 : 64);
    plan.queries_per_block = kMmaRows / nn;
    plan.act_pitch = mma_act_pitch_bytes(p.precision) / operand_bytes(p.precision);
    plan.shared_bytes =
        ws ? ws_bytes : pp ? pp_bytes : mc ? mc_bytes : wgmma ? wgmma_bytes : mma_bytes;
  } else if (tensor_core_path_applies(p, has_tensor_cores) &&
             shared_bytes<float>(tensor_core_layout(p.precision, nn)) <= max_shared_bytes) {
    plan.path = KernelPath::kTensorCore;
    plan.queries_per_block = kTensorCoreRows / nn;
    plan.act_pitch = tensor_core_pitch(p.precision);
    plan.shared_bytes = shared_bytes<float>(tensor_core_layout(p.precision, nn));
  } else if (fast_path_applies(p) && shared_bytes<float>(fast_layout(nn)) <= max_shared_bytes) {
    plan.path = KernelPath::kFast;
    plan.queries_per_block = kFastRows / nn;
    plan.act_pitch = kFastWidth;
    plan.shared_bytes = shared_bytes<float>(fast_layout(nn));
  } else {
    int max_width = 0;
    for (int l = 0; l < p.num_layers; ++l) max_width = max_width > p.widths[l] ? max_width : p.widths[l];
    for (int q = kGenericMaxRows / nn; q >= 1; --q) {
      const size_t bytes = shared_bytes<T>(generic_layout<T>(q, nn, max_width));
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
