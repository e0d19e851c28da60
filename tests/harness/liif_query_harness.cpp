// The CUDA query path run on the host: the same preparation as the CUDA operator
// (csrc/cuda/liif_query_prepare.h) and the very kernels of csrc/cuda/liif_query_kernel.cuh, executed by
// the host emulation of cuda_host_emulation.h. Exposed as the CPU operator liif_cuda_harness::query,
// built by tests/cuda_harness.py and compared with the reference in tests/test_cuda_harness.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <thread>
#include <tuple>

// After torch's headers: the emulation defines CUDA's keywords and built-in variables.
#include "cuda_host_emulation.h"

#include "cuda/liif_query_kernel.cuh"
#include "cuda/liif_query_prepare.h"

namespace {

using namespace liif::cuda;

// The CPU stands in for cuDNN: a plain convolution in the tensor's own precision.
at::Tensor convolve_on_host(const at::Tensor& input, const at::Tensor& weight, int64_t padding) {
  return at::conv2d(input, weight, {}, 1, padding);
}

template <typename T>
void run_kernel(const QueryKernelParams<T>& params, const LaunchPlan& plan, bool reverse_order) {
  const unsigned workers = std::max(1u, std::thread::hardware_concurrency());
  const unsigned blocks = static_cast<unsigned>(plan.blocks);
  if (plan.path == KernelPath::kFast) {
    if constexpr (std::is_same_v<T, float>) {
      liif_harness::launch(blocks, kThreadsPerBlock, plan.shared_bytes,
                           [&] { liif_query_fast_kernel(params); }, reverse_order, workers);
      return;
    }
    TORCH_CHECK(false, "host harness: the fast kernel is float32 only");
  }
  liif_harness::launch(blocks, kThreadsPerBlock, plan.shared_bytes,
                       [&] { liif_query_generic_kernel<T>(params); }, reverse_order, workers);
}

// Returns the output and the kernel that ran (1 fast, 2 generic). `max_shared_bytes` stands for the
// device's per-block shared-memory limit (101376 on sm_86/sm_89, 232448 on sm_90).
std::tuple<at::Tensor, int64_t> query_on_host(const at::Tensor& feat, const at::Tensor& coords,
                                              const c10::optional<at::Tensor>& cells,
                                              at::TensorList weights, at::TensorList biases,
                                              bool local_ensemble, bool feat_unfold,
                                              bool cell_decode, int64_t max_shared_bytes,
                                              bool reverse_order) {
  const std::vector<at::Tensor> w = weights.vec(), bs = biases.vec();
  const liif::QueryShape shape =
      liif::check_query_inputs(feat, coords, cells, w, bs, feat_unfold, cell_decode);
  at::Tensor out;
  int64_t path = 0;
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "liif_query_host_harness", [&] {
    PreparedQuery<scalar_t> prepared =
        prepare_query<scalar_t>(feat, coords, cells, w, bs, local_ensemble, feat_unfold,
                                cell_decode, shape, convolve_on_host);
    const LaunchPlan plan =
        plan_prepared_query(prepared, static_cast<size_t>(max_shared_bytes));
    run_kernel(prepared.params, plan, reverse_order);
    out = prepared.out;
    path = static_cast<int64_t>(plan.path);
  });
  return {out, path};
}

// Self-tests of the emulation itself. Each thread stores its global index in shared memory and reads
// its right-hand neighbour's, with or without a barrier in between.
__global__ void exchange_kernel(int* out, bool barrier) {
  LIIF_DYNAMIC_SHARED(smem);
  int* slots = reinterpret_cast<int*>(smem);
  const unsigned t = threadIdx.x;
  slots[t] = static_cast<int>(blockIdx.x * blockDim.x + t);
  if (barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + t] = slots[(t + 1) % blockDim.x];
}

// Half of the threads wait at a barrier the others never reach.
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x % 2 == 0) __syncthreads();
}

at::Tensor exchange(int64_t blocks, int64_t threads, bool barrier, bool reverse_order) {
  at::Tensor out = at::empty({blocks * threads}, at::kInt);
  int* data = out.data_ptr<int>();
  liif_harness::launch(static_cast<unsigned>(blocks), static_cast<unsigned>(threads),
                       threads * sizeof(int), [&] { exchange_kernel(data, barrier); },
                       reverse_order, 2);
  return out;
}

void divergent_barrier() {
  liif_harness::launch(1, 4, 0, [] { divergent_barrier_kernel(); }, false, 1);
}

}  // namespace

TORCH_LIBRARY(liif_cuda_harness, m) {
  m.def("exchange(int blocks, int threads, bool barrier, bool reverse_order) -> Tensor");
  m.impl("exchange", c10::DispatchKey::CatchAll, &exchange);
  m.def("divergent_barrier() -> ()");
  m.impl("divergent_barrier", c10::DispatchKey::CatchAll, &divergent_barrier);
  m.def(
      "query(Tensor feat, Tensor coords, Tensor? cells, Tensor[] weights, Tensor[] biases, "
      "bool local_ensemble, bool feat_unfold, bool cell_decode, int max_shared_bytes, "
      "bool reverse_order) -> (Tensor, int)");
  m.impl("query", c10::DispatchKey::CPU, &query_on_host);
}
