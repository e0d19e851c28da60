// The phase-clocks timing probe (LIIF_CUDA_TIMING_PROBE=phase-clocks): where a tensor-core kernel's
// cycles go. Thread 0 of each block records clock64() (the SM's cycle counter) as it leaves each
// phase of its tile, into kPhaseSlots int64 slots per block; liif_cuda.query (and the host harness)
// then prints one line of cycles per tile, summed over the blocks. The outputs stay right: the
// probe only adds these stores.
//
// Thread 0 records at the block-wide barriers, so each phase is the block's. The warp-specialised
// kernel pipelines its tiles across warpgroups: it records its start, its end and its tile count.
// The multicast kernel, persistent too, records the phases of each block's last tile.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace liif {
namespace cuda {

enum PhaseSlot : int {
  kPhaseStart = 0,   // the block starts
  kPhaseGeometry,    // its rows' geometry is in shared memory
  kPhaseFirstLayer,  // layer 0's activations are
  kPhaseLayers,      // the hidden layers and the last one are done (predictions in shared memory)
  kPhaseEnd,         // the blended outputs are written
  kPhaseTiles,       // not a clock: the block's tiles of 128 rows
  kPhaseStagedRows,  // not a clock: its rows whose map row was staged (LIIF_CUDA_STAGE_MAP)
  kPhaseSlots
};

// The line liif_cuda.query prints for `blocks` blocks' slots (rows of kPhaseSlots; a row whose
// start is 0 was not launched): mean cycles per tile of each phase, its name a key, and of the
// whole block. A phase some block did not record (the warp-specialised kernel's) is left out; so
// are staged rows where none were.
inline std::string phase_clock_summary(const int64_t* clocks, int64_t blocks, const char* kernel) {
  static const char* const kNames[] = {"geometry", "first_layer", "layers", "blend"};
  double sums[kPhaseEnd] = {};
  bool recorded[kPhaseEnd];
  for (bool& r : recorded) r = true;
  double total = 0, tiles = 0, staged_rows = 0;
  int64_t launched = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t* row = clocks + b * kPhaseSlots;
    if (row[kPhaseStart] == 0) continue;
    ++launched;
    tiles += static_cast<double>(row[kPhaseTiles]);
    staged_rows += static_cast<double>(row[kPhaseStagedRows]);
    total += static_cast<double>(row[kPhaseEnd] - row[kPhaseStart]);
    for (int s = kPhaseGeometry; s <= kPhaseEnd; ++s) {
      if (row[s] == 0 || row[s - 1] == 0) recorded[s - 1] = false;
      sums[s - 1] += static_cast<double>(row[s] - row[s - 1]);
    }
  }
  std::string line = std::string("liif_cuda phase clocks: kernel=") + kernel +
                     " blocks=" + std::to_string(launched) +
                     " tiles=" + std::to_string(static_cast<int64_t>(tiles));
  char value[64];
  for (int s = kPhaseGeometry; s <= kPhaseEnd && tiles > 0; ++s) {
    if (!recorded[s - 1]) continue;
    std::snprintf(value, sizeof value, " %s=%.0f", kNames[s - 1], sums[s - 1] / tiles);
    line += value;
  }
  std::snprintf(value, sizeof value, " total=%.0f", tiles > 0 ? total / tiles : 0.0);
  line += value;
  if (staged_rows > 0) {  // rows per tile whose map row came from shared memory
    std::snprintf(value, sizeof value, " staged_rows=%.1f", staged_rows / tiles);
    line += value;
  }
  return line;
}

}  // namespace cuda
}  // namespace liif
