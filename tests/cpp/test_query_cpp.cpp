// C++-level checks of the shared geometry header and of the operator through the dispatcher.
// Built and run by CMake (ctest); the full comparison against the reference is in the Python tests.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "cpu/grid_sample_rounding.h"
#include "cuda/liif_map_convolution.h"
#include "cuda/liif_query_launch.h"
#include "liif_geometry.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

void test_nearest_index() {
  // ((c + 1) * n - 1) / 2 rounded half to even: c = 0 on a 2-wide axis is 0.5 -> 0, on 4 -> 1.5 -> 2.
  for (bool fused : {false, true}) {
    expect(liif::nearest_index(0.0f, 2.0f, 2, fused) == 0, "half rounds to even (0.5 -> 0)");
    expect(liif::nearest_index(0.0f, 4.0f, 4, fused) == 2, "half rounds to even (1.5 -> 2)");
    expect(liif::nearest_index(-1.0f, 4.0f, 4, fused) == 0, "left edge");
    expect(liif::nearest_index(2.0f, 4.0f, 4, fused) == 3, "beyond the right edge stays in bounds");
    expect(liif::nearest_index(std::numeric_limits<float>::quiet_NaN(), 4.0f, 4, fused) == 0,
           "NaN maps to a valid index");
  }
}

// The probes that ask torch how its CPU grid_sample rounds really tell the two roundings apart.
template <typename T>
void test_source_index_probe() {
  using Probe = liif::SourceIndexProbe<T>;
  const T c = static_cast<T>(Probe::coordinate);
  const T n = static_cast<T>(Probe::size);
  expect(liif::nearest_index(c, n, Probe::size, /*fused=*/true) == 1, "probe: fused picks cell 1");
  expect(liif::nearest_index(c, n, Probe::size, /*fused=*/false) == 0,
         "probe: two roundings pick cell 0");
  // This build of torch on this processor: one of the two (the CPU kernel follows it).
  const at::Tensor input =
      at::arange(Probe::size, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))
          .view({1, 1, 1, Probe::size});
  const at::Tensor grid = at::tensor({c, T(0)}).view({1, 1, 1, 2});
  const double cell = at::grid_sampler(input, grid, 1, 0, false).item<double>();
  expect(cell == (liif::cpu_grid_sample_fuses_index<T>() ? 1.0 : 0.0), "probe answer cached");
}

void test_neighbours() {
  const auto g = liif::make_feature_grid<double>(5, 7, true, true);
  liif::Neighbour<double> nb[4];
  expect(liif::query_neighbours(g, 0.1, -0.3, nb), "finite query accepted");
  double total = 0;
  for (int k = 0; k < 4; ++k) {
    total += nb[k].weight;
    expect(nb[k].iy >= 0 && nb[k].iy < 5 && nb[k].ix >= 0 && nb[k].ix < 7, "cell inside the map");
    expect(std::fabs(nb[k].rel_y) <= 2 && std::fabs(nb[k].rel_x) <= 2, "neighbour is adjacent");
  }
  expect(std::fabs(total - 1) < 1e-12, "blend weights sum to one");
  expect(!liif::query_neighbours(g, std::numeric_limits<double>::infinity(), 0.0, nb),
         "infinite coordinate rejected");
}

void test_operator_runs() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("liif_cuda::query", "");
  auto typed = op.typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, at::TensorList,
                                   at::TensorList, bool, bool, bool, c10::string_view,
                                   c10::string_view)>();
  at::manual_seed(0);
  const at::Tensor feat = at::randn({2, 3, 4, 5});
  const at::Tensor coords = at::rand({2, 11, 2}) * 2 - 1;
  const at::Tensor cells = at::full({2, 11, 2}, 0.1);
  const std::vector<at::Tensor> weights = {at::randn({8, 31}), at::randn({3, 8})};
  const std::vector<at::Tensor> biases = {at::randn({8}), at::randn({3})};
  const at::Tensor out =
      typed.call(feat, coords, cells, weights, biases, true, true, true, "fp32", "fp32");
  expect(out.sizes() == at::IntArrayRef({2, 11, 3}), "output shape");
  expect(at::isfinite(out).all().item<bool>(), "finite output");
  // Whether the operator raises for these coordinates and precisions.
  auto raises = [&](const at::Tensor& c, const char* precision, const char* backward_precision) {
    try {
      typed.call(feat, c, cells, weights, biases, true, true, true, precision, backward_precision);
    } catch (const c10::Error&) {
      return true;
    }
    return false;
  };
  expect(raises(coords.narrow(2, 0, 1), "fp32", "fp32"), "bad coords shape raises");
  // The CPU computes float32 for fp16 (and tf32); bf16 rounds the activations where the CPU has
  // bf16 units (tests/test_query_cpu_bf16.py), so it is only close to float32.
  const at::Tensor fp16 =
      typed.call(feat, coords, cells, weights, biases, true, true, true, "fp16", "fp32");
  expect(at::equal(fp16, out), "precision fp16 computes float32 on the CPU");
  const at::Tensor bf16 =
      typed.call(feat, coords, cells, weights, biases, true, true, true, "bf16", "fp32");
  expect(((bf16 - out).norm() / out.norm()).item<double>() < 1e-2,
         "precision bf16 is close to float32 on the CPU");
  expect(raises(coords, "fp8", "fp32"), "unknown precision raises");
  expect(raises(coords, "fp32", "fp16"), "unknown backward precision raises");
}

void test_plan_rejects_layers_too_wide_for_shared_memory() {
  // One query's activations of a 2^24-wide layer take far more than any GPU's shared memory; the
  // byte counts of the generic kernel's layout (about 2^33 for 16 queries) must not wrap around.
  liif::cuda::QueryKernelParams<float> p;
  p.grid = liif::make_feature_grid<float>(8, 8, true, true);
  p.num_layers = 2;
  p.widths[0] = 1 << 24;
  p.widths[1] = 3;
  p.total_queries = 100;
  const auto plan = liif::cuda::plan_launch(p, 232448, true);
  expect(plan.path == liif::cuda::KernelPath::kNone, "a 2^24-wide layer is not planned");
  p.widths[0] = 200;
  expect(liif::cuda::plan_launch(p, 232448, true).path == liif::cuda::KernelPath::kGeneric,
         "a 200-wide hidden layer runs the generic kernel");
}

void test_plan_runs_wgmma_only_where_the_device_does() {
  // The published shape in bf16: the wgmma kernel where it is asked for and the device runs this
  // build's sm_90a code, the 8-warp mma.sync kernel otherwise (and always for tf32, whose
  // accumulators are not the next layer's operands).
  using liif::cuda::KernelPath;
  using liif::cuda::TensorCoreKernel;
  liif::cuda::QueryKernelParams<float> p;
  p.grid = liif::make_feature_grid<float>(8, 8, true, true);
  p.num_layers = 5;
  for (int l = 0; l < 4; ++l) p.widths[l] = 256;
  p.widths[4] = 3;
  p.total_queries = 1000;
  p.precision = liif::cuda::Precision::kBf16;
  const auto wgmma = liif::cuda::plan_launch(p, 232448, true, TensorCoreKernel::kWgmma, true);
  expect(wgmma.path == KernelPath::kWgmma && wgmma.threads == 256, "wgmma where it runs");
  expect(liif::cuda::plan_launch(p, 232448, true, TensorCoreKernel::kWgmma, false).path ==
             KernelPath::kMma,
         "mma.sync where the device does not run wgmma");
  expect(liif::cuda::plan_launch(p, 232448, true, TensorCoreKernel::kMma, true).path ==
             KernelPath::kMma,
         "mma.sync unless wgmma is asked for");
  expect(liif::cuda::plan_launch(p, 166912, true, TensorCoreKernel::kWgmma, true).path ==
             KernelPath::kMma,
         "mma.sync where the wgmma ring does not fit (an A100's shared memory)");
  // The warp-specialised form: 384 threads, one block per SM at most, each looping over tiles.
  const auto ws = liif::cuda::plan_launch(p, 232448, true, TensorCoreKernel::kWgmmaWs, true);
  expect(ws.path == KernelPath::kWgmmaWs && ws.threads == 384 && ws.shared_bytes <= 232448,
         "the warp-specialised wgmma kernel where it runs");
  expect(ws.blocks == (1000 + 31) / 32 && liif::cuda::launch_blocks(ws, 132) == 32 &&
             liif::cuda::launch_blocks(ws, 8) == 8,
         "one block per tile of 32 queries, at most one per SM");
  expect(liif::cuda::launch_blocks(wgmma, 8) == wgmma.blocks, "one block per tile otherwise");
  expect(liif::cuda::plan_launch(p, 232448, true, TensorCoreKernel::kWgmmaWs, false).path ==
             KernelPath::kMma,
         "mma.sync where the device does not run the warp-specialised wgmma kernel");
  // The multicast form: the wgmma kernel's block, in clusters of two, persistent: a grid of whole
  // clusters, as many as run at once, at most one per pair of tiles (1000 queries: 32 tiles;
  // 1030: 33 tiles and a block without one).
  const auto mc = liif::cuda::plan_launch(p, 232448, true, TensorCoreKernel::kWgmmaMc, true);
  expect(mc.path == KernelPath::kWgmmaMc && mc.threads == 256 && mc.shared_bytes <= 232448 &&
             mc.shared_bytes == wgmma.shared_bytes + 96 && liif::cuda::launch_cluster(mc) == 2 &&
             liif::cuda::launch_cluster(wgmma) == 1 && liif::cuda::launch_blocks(mc, 132) == 32 &&
             liif::cuda::launch_blocks(mc, 8) == 8 && liif::cuda::launch_blocks(mc, 9) == 8 &&
             liif::cuda::launch_blocks(mc, 1) == 2 && liif::cuda::launch_blocks(mc, 0) == 2,
         "the multicast wgmma kernel where it runs: 6 slots' two mbarriers more");
  p.total_queries = 1030;
  const auto odd = liif::cuda::plan_launch(p, 232448, true, TensorCoreKernel::kWgmmaMc, true);
  expect(odd.blocks == 33 && liif::cuda::launch_blocks(odd, 132) == 34 &&
             liif::cuda::launch_blocks(odd, 34) == 34 && liif::cuda::launch_blocks(odd, 32) == 32,
         "an odd number of tiles launches a block more, unless the clusters loop");
  p.total_queries = 1000;
  expect(liif::cuda::plan_launch(p, 232448, true, TensorCoreKernel::kWgmmaMc, false).path ==
             KernelPath::kMma,
         "mma.sync where the device does not run the multicast wgmma kernel");
  // Its ping-pong schedule: the same launch with a ring of 8 slots (2 chunks of 16 KiB and their
  // mbarriers more); only where asked for.
  const auto pp = liif::cuda::plan_launch(p, 232448, true, TensorCoreKernel::kWgmmaPp, true);
  expect(pp.path == KernelPath::kWgmmaPp && pp.threads == 256 && pp.shared_bytes <= 232448 &&
             pp.shared_bytes == mc.shared_bytes + 2 * 16384 + 32 &&
             liif::cuda::launch_cluster(pp) == 2 && liif::cuda::launch_blocks(pp, 132) == 32 &&
             liif::cuda::launch_blocks(pp, 9) == 8 && pp.blocks == mc.blocks,
         "the multicast wgmma kernel's ping-pong schedule where it runs");
  expect(liif::cuda::plan_launch(p, pp.shared_bytes - 1, true, TensorCoreKernel::kWgmmaPp, true)
                 .path == KernelPath::kMma &&
             liif::cuda::plan_launch(p, 232448, true, TensorCoreKernel::kWgmmaPp, false).path ==
                 KernelPath::kMma,
         "mma.sync where the ping-pong schedule's ring does not fit or the device runs no wgmma");
  // The default: the multicast wgmma kernel where it runs and fits, else the wgmma kernel, else
  // the 16-warp mma.sync kernel.
  const auto automatic = liif::cuda::plan_launch(p, 232448, true);
  expect(automatic.path == KernelPath::kMma16 && automatic.threads == 512,
         "by default the 16-warp mma.sync kernel where the device does not run wgmma");
  expect(liif::cuda::plan_launch(p, 232448, true, TensorCoreKernel::kAuto, true).path ==
             KernelPath::kWgmmaMc,
         "by default the multicast wgmma kernel where it runs");
  expect(liif::cuda::plan_launch(p, wgmma.shared_bytes, true, TensorCoreKernel::kAuto, true).path ==
             KernelPath::kWgmma,
         "by default the wgmma kernel where only its ring fits, without the mbarriers");
  // 2^36 queries: 2^31 tiles, whose 24 chunks each the multicast stream could not count in an int
  // on one cluster.
  p.total_queries = int64_t{1} << 36;
  expect(liif::cuda::plan_launch(p, 232448, true, TensorCoreKernel::kAuto, true).path ==
             KernelPath::kWgmma,
         "the wgmma kernel where the multicast stream's chunks would not fit an int");
  p.total_queries = 1000;
  expect(liif::cuda::plan_launch(p, 166912, true, TensorCoreKernel::kAuto, true).path ==
             KernelPath::kMma16,
         "by default the 16-warp mma.sync kernel where the wgmma ring does not fit");
  TensorCoreKernel named = TensorCoreKernel::kMma;
  expect(liif::cuda::tensor_core_kernel_named(nullptr, &named) && named == TensorCoreKernel::kAuto &&
             liif::cuda::tensor_core_kernel_named("", &named) && named == TensorCoreKernel::kAuto,
         "no name is the default");
  expect(liif::cuda::tensor_core_kernel_named("wgmma_mc", &named) &&
             named == TensorCoreKernel::kWgmmaMc &&
             liif::cuda::tensor_core_kernel_named("wgmma_pp", &named) &&
             named == TensorCoreKernel::kWgmmaPp &&
             liif::cuda::tensor_core_kernel_named("wgmma_ws", &named) &&
             named == TensorCoreKernel::kWgmmaWs &&
             liif::cuda::tensor_core_kernel_named("mma", &named) && named == TensorCoreKernel::kMma &&
             liif::cuda::tensor_core_kernel_named("auto", &named) &&
             named == TensorCoreKernel::kAuto && !liif::cuda::tensor_core_kernel_named("wgmma ", &named),
         "names");
  int probe = -1;
  expect(liif::cuda::timing_probe_named(nullptr, &probe) && probe == 0 &&
             liif::cuda::timing_probe_named("", &probe) && probe == 0 &&
             liif::cuda::timing_probe_named("no-map-loads", &probe) &&
             probe == liif::cuda::kProbeNoMapLoads &&
             liif::cuda::timing_probe_named("no-weight-loads", &probe) &&
             probe == liif::cuda::kProbeNoWeightLoads &&
             liif::cuda::timing_probe_named("no-weight-loads,no-map-loads", &probe) &&
             probe == (liif::cuda::kProbeNoMapLoads | liif::cuda::kProbeNoWeightLoads) &&
             liif::cuda::timing_probe_named("phase-clocks", &probe) &&
             probe == liif::cuda::kProbePhaseClocks &&
             liif::cuda::timing_probe_named("phase-clocks,no-map-loads", &probe) &&
             probe == (liif::cuda::kProbePhaseClocks | liif::cuda::kProbeNoMapLoads) &&
             !liif::cuda::timing_probe_named("no-map", &probe) &&
             !liif::cuda::timing_probe_named("no-map-loads,", &probe) &&
             !liif::cuda::timing_probe_named(",no-map-loads", &probe) &&
             !liif::cuda::timing_probe_named("no-map-loads no-weight-loads", &probe),
         "timing probe names");
  p.precision = liif::cuda::Precision::kTf32;
  for (const TensorCoreKernel k :
       {TensorCoreKernel::kWgmma, TensorCoreKernel::kWgmmaWs, TensorCoreKernel::kWgmmaMc,
        TensorCoreKernel::kWgmmaPp}) {
    expect(liif::cuda::plan_launch(p, 232448, true, k, true).path == KernelPath::kMma,
           "mma.sync for tf32");
  }
  expect(liif::cuda::plan_launch(p, 232448, true, TensorCoreKernel::kAuto, true).path ==
             KernelPath::kMma16,
         "by default the 16-warp mma.sync kernel for tf32");
}

void test_map_bands() {
  // A 1080p frame's map from 480x270 in float32 (127 MiB): bands of 34 rows (16 MiB each). Maps up
  // to 64 MiB stay one convolution: a training batch's (16 x 48 x 48, 36 MiB), 64 MiB exactly. A
  // row larger than a band gets a band of its own.
  expect(liif::cuda::map_band_rows(1, 256, 270, 480, 4) == 34, "1080p: bands of 34 rows");
  expect(liif::cuda::map_band_rows(16, 256, 48, 48, 4) == 48, "a training batch: one convolution");
  expect(liif::cuda::map_band_rows(1, 256, 64, 512, 8) == 64, "64 MiB: still one convolution");
  expect(liif::cuda::map_band_rows(64, 256, 100, 4096, 4) == 1, "rows of 256 MiB: one per band");
  expect(liif::cuda::map_band_rows(1, 256, 0, 480, 4) == 1, "an empty map: one (empty) band");
}

void test_phase_clock_summary() {
  // Two blocks of one tile each, a third never launched (start 0): each phase's mean cycles per
  // tile, and the whole block's. Then a warp-specialised block (start, end and 3 tiles only).
  using namespace liif::cuda;
  const int64_t clocks[3][kPhaseSlots] = {{100, 110, 150, 450, 470, 1, 0},
                                          {1000, 1030, 1050, 1250, 1260, 1, 0},
                                          {0, 0, 0, 0, 0, 0, 0}};
  expect(phase_clock_summary(&clocks[0][0], 3, "wgmma") ==
             "liif_cuda phase clocks: kernel=wgmma blocks=2 tiles=2 geometry=20 first_layer=30 "
             "layers=250 blend=15 total=315",
         "phase clocks of two blocks");
  const int64_t ws[kPhaseSlots] = {500, 0, 0, 0, 1400, 3, 0};
  expect(phase_clock_summary(ws, 1, "wgmma_ws") ==
             "liif_cuda phase clocks: kernel=wgmma_ws blocks=1 tiles=3 total=300",
         "the warp-specialised kernel's total only");
  const int64_t staged[kPhaseSlots] = {100, 110, 150, 450, 470, 1, 97};
  expect(phase_clock_summary(staged, 1, "mma") ==
             "liif_cuda phase clocks: kernel=mma blocks=1 tiles=1 geometry=10 first_layer=40 "
             "layers=300 blend=20 total=370 staged_rows=97.0",
         "staged rows per tile");
}

}  // namespace

int main() {
  test_nearest_index();
  test_source_index_probe<float>();
  test_source_index_probe<double>();
  test_neighbours();
  test_operator_runs();
  test_plan_rejects_layers_too_wide_for_shared_memory();
  test_plan_runs_wgmma_only_where_the_device_does();
  test_map_bands();
  test_phase_clock_summary();
  if (failures == 0) std::printf("all C++ checks passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
