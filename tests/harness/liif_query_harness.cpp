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

// The CPU stands in for cuDNN: a plain convolution in the tensor's own precision (also where the
// GPU may use TF32 for a reduced precision: the harness checks the kernels, not cuDNN).
at::Tensor convolve_on_host(const at::Tensor& input, const at::Tensor& weight, int64_t padding,
                            bool /*allow_tf32*/) {
  return at::conv2d(input, weight, {}, 1, padding);
}

template <typename T>
void run_kernel(const QueryKernelParams<T>& params, const LaunchPlan& plan, bool reverse_order) {
  const QueryKernel<T> kernel = planned_kernel<T>(plan, params.precision);
  TORCH_CHECK(kernel != nullptr, "host harness: no kernel for this plan");
  const unsigned workers = std::max(1u, std::thread::hardware_concurrency());
  liif_harness::launch(static_cast<unsigned>(plan.blocks), kThreadsPerBlock, plan.shared_bytes,
                       [&] { kernel(params); }, reverse_order, workers);
}

// Returns the output and the kernel that ran (1 fast, 2 generic, 3 tensor cores). `max_shared_bytes`
// stands for the device's per-block shared-memory limit (101376 on sm_86/sm_89, 232448 on sm_90);
// the emulated device has tensor cores.
std::tuple<at::Tensor, int64_t> query_on_host(const at::Tensor& feat, const at::Tensor& coords,
                                              const c10::optional<at::Tensor>& cells,
                                              at::TensorList weights, at::TensorList biases,
                                              bool local_ensemble, bool feat_unfold,
                                              bool cell_decode, c10::string_view precision,
                                              int64_t max_shared_bytes, bool reverse_order) {
  const std::vector<at::Tensor> w = weights.vec(), bs = biases.vec();
  const liif::QueryShape shape =
      liif::check_query_inputs(feat, coords, cells, w, bs, feat_unfold, cell_decode);
  const Precision arithmetic = parse_precision(feat, precision);
  at::Tensor out;
  int64_t path = 0;
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "liif_query_host_harness", [&] {
    PreparedQuery<scalar_t> prepared =
        prepare_query<scalar_t>(feat, coords, cells, w, bs, local_ensemble, feat_unfold,
                                cell_decode, arithmetic, shape, convolve_on_host);
    const LaunchPlan plan = plan_prepared_query(prepared, static_cast<size_t>(max_shared_bytes),
                                                /*has_tensor_cores=*/true);
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

// Each thread copies 16 bytes asynchronously into shared memory and, after a barrier, reads its
// right-hand neighbour's, having waited for its copy before the barrier or only after the read.
__global__ void async_copy_kernel(const float* src, float* out, bool wait_first) {
  LIIF_DYNAMIC_SHARED(smem);
  float* slots = reinterpret_cast<float*>(smem);
  const unsigned t = threadIdx.x;
  liif::cuda::async_copy_16(slots + 4 * t, src + 4 * t);
  liif::cuda::async_copy_commit();
  if (wait_first) liif::cuda::async_copy_wait<0>();
  __syncthreads();
  for (int i = 0; i < 4; ++i) out[4 * t + i] = slots[4 * ((t + 1) % blockDim.x) + i];
  liif::cuda::async_copy_wait<0>();
}

// Loads a 16 x 8 tf32 operand from shared memory, rounded with __float_to_tf32 or not.
__global__ void tf32_operand_kernel(bool rounded) {
  LIIF_DYNAMIC_SHARED(smem);
  float* tile = reinterpret_cast<float*>(smem);
  if (threadIdx.x == 0) {
    for (int i = 0; i < 16 * 8; ++i) {
      const float v = 1.0f / static_cast<float>(i + 3);
      tile[i] = rounded ? nvcuda::wmma::__float_to_tf32(v) : v;
    }
  }
  __syncthreads();
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, nvcuda::wmma::precision::tf32,
                         nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, tile, 8);
}

at::Tensor async_copy(at::Tensor src, bool wait_first) {
  TORCH_CHECK(src.dtype() == at::kFloat && src.is_contiguous() && src.numel() % 4 == 0);
  const unsigned threads = static_cast<unsigned>(src.numel() / 4);
  at::Tensor out = at::empty_like(src);
  const float* in = src.const_data_ptr<float>();
  float* data = out.data_ptr<float>();
  liif_harness::launch(1, threads, src.numel() * sizeof(float),
                       [&] { async_copy_kernel(in, data, wait_first); }, false, 1);
  return out;
}

void tf32_operand(bool rounded) {
  liif_harness::launch(1, 32, 16 * 8 * sizeof(float), [&] { tf32_operand_kernel(rounded); }, false,
                       1);
}

// x rounded to the operand type of `precision` and back (Operand<P>::store, then load), as the
// tensor-core kernel stores its activations.
at::Tensor round_operands(const at::Tensor& x, c10::string_view precision) {
  TORCH_CHECK(x.dtype() == at::kFloat);
  at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* src = in.const_data_ptr<float>();
  float* dst = out.data_ptr<float>();
  auto apply = [&](auto op) {
    using Op = decltype(op);
    for (int64_t i = 0; i < in.numel(); ++i) dst[i] = Op::load(Op::store(src[i]));
  };
  switch (parse_precision(x, precision)) {
    case Precision::kTf32: apply(Operand<Precision::kTf32>{}); break;
    case Precision::kBf16: apply(Operand<Precision::kBf16>{}); break;
    case Precision::kFp16: apply(Operand<Precision::kFp16>{}); break;
    case Precision::kFp32: out.copy_(in); break;
  }
  return out;
}

void divergent_barrier() {
  liif_harness::launch(1, 4, 0, [] { divergent_barrier_kernel(); }, false, 1);
}

}  // namespace

TORCH_LIBRARY(liif_cuda_harness, m) {
  m.def("exchange(int blocks, int threads, bool barrier, bool reverse_order) -> Tensor");
  m.impl("exchange", c10::DispatchKey::CatchAll, &exchange);
  m.def("round_to_tf32(Tensor x) -> Tensor");  // the host's rounding of the tf32 weights
  m.impl("round_to_tf32", c10::DispatchKey::CPU, &liif::cuda::round_to_tf32);
  m.def("round_operands(Tensor x, str precision) -> Tensor");
  m.impl("round_operands", c10::DispatchKey::CPU, &round_operands);
  m.def("async_copy(Tensor src, bool wait_first) -> Tensor");
  m.impl("async_copy", c10::DispatchKey::CPU, &async_copy);
  m.def("tf32_operand(bool rounded) -> ()");
  m.impl("tf32_operand", c10::DispatchKey::CatchAll, &tf32_operand);
  m.def("divergent_barrier() -> ()");
  m.impl("divergent_barrier", c10::DispatchKey::CatchAll, &divergent_barrier);
  m.def(
      "query(Tensor feat, Tensor coords, Tensor? cells, Tensor[] weights, Tensor[] biases, "
      "bool local_ensemble, bool feat_unfold, bool cell_decode, str precision, "
      "int max_shared_bytes, bool reverse_order) -> (Tensor, int)");
  m.impl("query", c10::DispatchKey::CPU, &query_on_host);
}
