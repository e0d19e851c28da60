// Tensor-level preparation of a CUDA query launch, shared by the CUDA operator (liif_query_cuda.cpp)
// and the host execution harness (tests/harness), so that the harness checks everything the GPU runs
// except the convolution backend and the launch itself.
//
// Layer 0 is split by its inputs (spec section 3): its feature columns act on the 3x3-unfolded (or
// plain) features of an LR cell only, so they are applied once per LR cell as a convolution, the
// "first-layer map" (B, H, W, width0); the coordinate and cell columns and the bias are added per row
// in the kernel. The other layers are transposed to (in, out) and packed into one buffer.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../liif_query_checks.h"
#include "liif_query_launch.h"

namespace liif {
namespace cuda {

template <typename T>
struct PreparedQuery {
  // Owners of the memory the parameters point to; they must outlive the launch.
  at::Tensor map, extra_columns, first_bias, weights, biases, operand_weights, coords, cells, out;
  at::Tensor phase_clocks;  // the phase-clocks timing probe's buffer, where it records
  QueryKernelParams<T> params;
};

// liif_cuda.query's `precision`, checked against feat (csrc/liif_query_checks.h).
inline Precision parse_precision(const at::Tensor& feat, c10::string_view name) {
  static_assert(static_cast<int>(Precision::kFp32) == 0 && static_cast<int>(Precision::kTf32) == 1 &&
                    static_cast<int>(Precision::kBf16) == 2 && static_cast<int>(Precision::kFp16) == 3,
                "Precision's values are the indices of kPrecisionNames");
  return static_cast<Precision>(check_precision(feat, name));
}

// float32 values rounded to TF32 (10 mantissa bits) to nearest, ties away from zero: what
// cvt.rna.tf32.f32 (wmma::__float_to_tf32) does. Adding half of the dropped range to the magnitude
// bits carries into the kept ones; NaN stays NaN.
inline at::Tensor round_to_tf32(const at::Tensor& x) {
  const at::Tensor bits = x.contiguous().view(at::kInt);
  const at::Tensor rounded =
      bits.add(0x1000).bitwise_and(static_cast<int64_t>(~0x1FFF)).view(at::kFloat);
  return at::where(x.isnan(), x, rounded);
}

// `convolve(input (B, C, H, W), weight (width0, C, k, k), padding, allow_tf32)` returns
// (B, width0, H, W) in any memory layout, without bias, computed in T, on TF32 tensor cores only if
// `allow_tf32` (a reduced precision was asked for).
template <typename T, typename Convolve>
PreparedQuery<T> prepare_query(const at::Tensor& feat, const at::Tensor& coords,
                               const c10::optional<at::Tensor>& cells,
                               const std::vector<at::Tensor>& weights,
                               const std::vector<at::Tensor>& biases, bool local_ensemble,
                               bool feat_unfold, bool cell_decode, Precision precision,
                               const QueryShape& shape, Convolve&& convolve) {
  const int num_layers = static_cast<int>(weights.size());
  TORCH_CHECK(num_layers <= kMaxLayers, "liif_cuda.query (CUDA kernel): the MLP has ", num_layers,
              " Linear layers, at most ", kMaxLayers, " are supported");
  TORCH_CHECK(shape.batch * shape.height * shape.width <= INT_MAX,
              "liif_cuda.query (CUDA kernel): B * H * W = ",
              shape.batch * shape.height * shape.width, " LR cells, at most ", INT_MAX,
              " are supported; split the batch");
  for (int64_t w : shape.layer_widths) {
    TORCH_CHECK(w <= INT_MAX / kGenericMaxRows,
                "liif_cuda.query (CUDA kernel): layer width ", w, " is too large");
  }

  PreparedQuery<T> p;
  QueryKernelParams<T>& k = p.params;
  // Detached: the kernels compute values only (autograd is registered around the operator).
  const at::Tensor w0 = weights[0].detach();
  const int64_t width0 = shape.layer_widths[0];
  const int64_t taps = feat_unfold ? 3 : 1;
  // Feature columns c*9 + ky*3 + kx are exactly a (width0, C, 3, 3) convolution weight.
  const at::Tensor conv_weight =
      w0.narrow(1, 0, shape.feat_dim).reshape({width0, shape.channels, taps, taps});
  p.map = convolve(feat.detach(), conv_weight, taps / 2, precision != Precision::kFp32)
              .permute({0, 2, 3, 1})
              .contiguous();

  at::Tensor extra = w0.narrow(1, shape.feat_dim, shape.in_dim - shape.feat_dim).t();
  if (!cell_decode) extra = at::cat({extra, extra.new_zeros({2, width0})});
  p.extra_columns = extra.contiguous();
  p.first_bias = biases[0].detach().contiguous();

  std::vector<at::Tensor> packed_w, packed_b;
  for (int l = 1; l < num_layers; ++l) {
    packed_w.push_back(weights[l].detach().t().reshape(-1));
    packed_b.push_back(biases[l].detach().reshape(-1));
  }
  // A dummy element keeps the pointers valid for a one-layer MLP, which reads neither.
  p.weights = packed_w.empty() ? feat.new_zeros({1}) : at::cat(packed_w);
  p.biases = packed_b.empty() ? feat.new_zeros({1}) : at::cat(packed_b);
  p.coords = coords.contiguous();
  if (cell_decode) p.cells = cells->contiguous();
  p.out = at::empty({shape.batch, shape.queries, shape.out_dim}, feat.options());

  k.map = p.map.template const_data_ptr<T>();
  k.coords = p.coords.template const_data_ptr<T>();
  k.cells = cell_decode ? p.cells.template const_data_ptr<T>() : nullptr;
  k.extra_columns = p.extra_columns.template const_data_ptr<T>();
  k.first_bias = p.first_bias.template const_data_ptr<T>();
  k.weights = p.weights.template const_data_ptr<T>();
  k.biases = p.biases.template const_data_ptr<T>();
  k.out = p.out.template data_ptr<T>();
  // torch's CUDA grid_sample computes ((c + 1) * size - 1) / 2 as written, and nvcc contracts the
  // multiply-add into an FMA (its default): the kernels pick cells with the fused rounding.
  k.grid = make_feature_grid<T>(shape.height, shape.width, local_ensemble, /*fused_index=*/true);
  k.total_queries = shape.batch * shape.queries;
  k.queries_per_image = shape.queries;
  k.num_layers = num_layers;
  k.precision = precision;
  for (int l = 0; l < num_layers; ++l) k.widths[l] = static_cast<int>(shape.layer_widths[l]);
  return p;
}

// The phase-clocks timing probe (liif_phase_clocks.h) for a launch of `plan`: where the probe is on
// and the kernel records clocks (the four mma.sync and wgmma kernels), a zeroed buffer of
// kPhaseSlots clocks per block on the output's device, in p.phase_clocks and the parameters.
template <typename T>
void add_phase_clock_buffer(PreparedQuery<T>& p, const LaunchPlan& plan) {
  const bool records = phase_clock_kernel_name(plan.path) != nullptr;
  if (!(p.params.timing_probe & kProbePhaseClocks) || !records) return;
  // A row per block launched, at least: the most any device launches (the multicast kernel's
  // grid is rounded up to whole clusters).
  const int64_t rows = std::max(plan.blocks, launch_blocks(plan, plan.blocks + kWgmmaMcCluster));
  p.phase_clocks = at::zeros({rows, kPhaseSlots}, p.out.options().dtype(at::kLong));
  p.params.phase_clocks = p.phase_clocks.template data_ptr<int64_t>();
}

// After the launch: the line (phase_clock_summary) of the buffer add_phase_clock_buffer made on
// stderr, if it made one. The copy to the host waits for the kernel.
inline void print_phase_clocks(const at::Tensor& clocks, const LaunchPlan& plan) {
  if (!clocks.defined()) return;
  const at::Tensor host = clocks.cpu();
  std::fprintf(stderr, "%s\n",
               phase_clock_summary(host.const_data_ptr<int64_t>(), host.size(0),
                                   phase_clock_kernel_name(plan.path))
                   .c_str());
  std::fflush(stderr);
}

// LIIF_CUDA_STAGE_MAP (read by liif_cuda.query and the host harness): unset, empty or "0" off, "1"
// on. An experiment until a GPU has measured it (docs/gpu.md): the mma.sync and wgmma kernels copy
// each tile's distinct first-layer map rows into shared memory once and gather layer 0 from there.
// The outputs are the same bits either way.
inline bool requested_map_staging() {
  const char* value = std::getenv("LIIF_CUDA_STAGE_MAP");
  const bool off = value == nullptr || value[0] == '\0' || std::strcmp(value, "0") == 0;
  TORCH_CHECK(off || std::strcmp(value, "1") == 0,
              "liif_cuda.query: LIIF_CUDA_STAGE_MAP must be unset, empty, 0 or 1, got '", value,
              "'");
  return !off;
}

// Map staging in `plan` where `requested`, the kernel stages (8- and 16-warp mma.sync, wgmma and
// its multicast form; bf16 and fp16: tf32's block leaves no room, as does the ping-pong schedule's
// ring of 8 slots) and kStagedCells rows fit after its shared memory (at a 128-byte boundary), else
// nothing.
template <typename T>
void plan_map_staging(QueryKernelParams<T>& params, LaunchPlan& plan, size_t max_shared_bytes,
                      bool requested) {
  const bool stages = (plan.path == KernelPath::kMma || plan.path == KernelPath::kMma16 ||
                       plan.path == KernelPath::kWgmma || plan.path == KernelPath::kWgmmaMc) &&
                      params.precision != Precision::kTf32;
  const int64_t offset = (static_cast<int64_t>(plan.shared_bytes) + 127) / 128 * 128;
  const int64_t bytes = offset + staging_bytes(kStagedCells);
  if (!requested || !stages || bytes > static_cast<int64_t>(max_shared_bytes)) return;
  params.staged_cells = kStagedCells;
  params.staged_offset = offset;
  plan.shared_bytes = static_cast<size_t>(bytes);
}

// LIIF_CUDA_TIMING_PROBE (read by liif_cuda.query and the host harness): unset or empty in every
// real use; a comma-separated list of "no-map-loads" and "no-weight-loads" makes the tensor-core
// kernels skip their first-layer map loads or their hidden-layer weight copies (wrong outputs: a
// benchmark's probe of what they cost), "phase-clocks" print where their cycles go.
inline int requested_timing_probe() {
  const char* value = std::getenv("LIIF_CUDA_TIMING_PROBE");
  int probe = 0;
  TORCH_CHECK(timing_probe_named(value, &probe),
              "liif_cuda.query: LIIF_CUDA_TIMING_PROBE must be unset, empty or a comma-separated "
              "list of no-map-loads, no-weight-loads and phase-clocks, got '",
              value, "'");
  return probe;
}

// Completes the parameters with the plan's block shape (and, for the tensor-core kernel, its
// operand weights), and with what liif_cuda.query reads from the environment at every call (map
// staging, timing probes and their buffer); raises when no kernel can run the MLP.
// `has_tensor_cores`: the device has compute capability 8.0 or newer; `has_wgmma`: it runs this
// build's sm_90a code.
template <typename T>
LaunchPlan plan_prepared_query(PreparedQuery<T>& p, size_t max_shared_bytes, bool has_tensor_cores,
                               TensorCoreKernel preferred = TensorCoreKernel::kAuto,
                               bool has_wgmma = false) {
  LaunchPlan plan =
      plan_launch(p.params, max_shared_bytes, has_tensor_cores, preferred, has_wgmma);
  // Whatever an earlier plan of the same query set (plan_and_launch plans again).
  p.params.staged_cells = 0;
  p.params.staged_offset = 0;
  TORCH_CHECK(plan.path != KernelPath::kNone,
              "liif_cuda.query (CUDA kernel): the activations of one query do not fit the ",
              max_shared_bytes, " bytes of shared memory a block may use (an MLP layer is too wide)");
  TORCH_CHECK(plan.blocks <= INT_MAX, "liif_cuda.query (CUDA kernel): too many queries (",
              p.params.total_queries, ") for one launch; split them");
  p.params.queries_per_block = plan.queries_per_block;
  p.params.act_pitch = plan.act_pitch;
  // The wgmma kernels read the mma.sync kernel's packing (and rearrange it as they copy), but for
  // the multicast one, whose bulk copies need each chunk as the image of its ring slot.
  const bool image = is_multicast(plan.path);
  const bool mma = plan.path == KernelPath::kMma || plan.path == KernelPath::kMma16 ||
                   plan.path == KernelPath::kWgmma || plan.path == KernelPath::kWgmmaWs || image;
  if (plan.path == KernelPath::kTensorCore || mma) {
    // The hidden layers lead the packed weights (all 256 x 256, each as (in, out)); the last layer
    // stays float32.
    const int64_t layers = p.params.num_layers - 2;
    const int64_t hidden = layers * kFastWidth * kFastWidth;
    at::Tensor w = p.weights.narrow(0, 0, hidden);
    if (mma) {
      // The mma.sync kernel streams each layer in chunks of `kc` inputs of every output column,
      // each chunk contiguous: [layer][chunk][out][kc], i.e. the (out, in) weight cut along `in`.
      const int64_t kc = mma_chunk_inputs(p.params.precision);
      w = w.view({layers, kFastWidth, kFastWidth})
              .transpose(1, 2)
              .reshape({layers, kFastWidth, kFastWidth / kc, kc})
              .permute({0, 2, 1, 3})
              .contiguous()
              .view({-1});
      if (image) {
        // Within each chunk, output n's 16-byte unit u (of its 4) goes to unit
        // (u / 2, n / 8, u % 2, n % 8) of the slot: wgmma's canonical K-major layout, k-step u / 2,
        // core matrices along k u % 2 (wgmma_fetch_chunk's placement, done once here).
        const int64_t values = 16 / operand_bytes(p.params.precision);  // per 16-byte unit
        w = w.view({-1, kFastWidth / 8, 8, 2, 2, values})
                .permute({0, 3, 1, 4, 2, 5})
                .contiguous()
                .view({-1});
      }
    }
    if (hidden == 0) {
      p.operand_weights = p.weights.new_zeros({8});  // a two-layer MLP reads none; a valid pointer
    } else if (p.params.precision == Precision::kTf32) {
      p.operand_weights = round_to_tf32(w);
    } else {
      p.operand_weights = w.to(p.params.precision == Precision::kBf16 ? at::kBFloat16 : at::kHalf);
    }
    p.params.operand_weights = p.operand_weights.const_data_ptr();
  }
  plan_map_staging(p.params, plan, max_shared_bytes, requested_map_staging());
  p.params.timing_probe = requested_timing_probe();
  add_phase_clock_buffer(p, plan);
  return plan;
}

// Plans the launch of `p` and runs it with `launch(plan)`, which launches the kernel the plan names
// and returns true, or returns false having launched nothing where none of the plan's clusters fits
// the device at once (cudaOccupancyMaxActiveClusters: the multicast kernel's two blocks, each with
// most of an SM's shared memory, on two SMs of one GPC; a partitioned or shared GPU may have no
// such pair free). Then `auto`'s choice becomes the wgmma kernel, which needs no cluster, and a
// multicast kernel asked for by name is an error that says what to ask for instead. Returns the
// plan that ran.
template <typename T, typename Launch>
LaunchPlan plan_and_launch(PreparedQuery<T>& p, size_t max_shared_bytes, bool has_tensor_cores,
                           TensorCoreKernel preferred, bool has_wgmma, Launch&& launch) {
  LaunchPlan plan =
      plan_prepared_query(p, max_shared_bytes, has_tensor_cores, preferred, has_wgmma);
  if (launch(plan)) return plan;
  TORCH_CHECK(preferred == TensorCoreKernel::kAuto,
              "liif_cuda.query (CUDA kernel): LIIF_CUDA_TENSOR_CORE_KERNEL=",
              phase_clock_kernel_name(plan.path),  // the kernel's name in that variable
              ": no cluster of the multicast wgmma kernel fits the device; set it to wgmma or "
              "unset it");
  plan = plan_prepared_query(p, max_shared_bytes, has_tensor_cores, TensorCoreKernel::kWgmma,
                             has_wgmma);
  TORCH_CHECK(!is_multicast(plan.path) && launch(plan),
              "liif_cuda.query (CUDA kernel): the wgmma kernel planned instead of the multicast "
              "one did not launch");
  return plan;
}

}  // namespace cuda
}  // namespace liif
