// The CUDA query path run on the host: the same preparation as the CUDA operator
// (csrc/cuda/liif_query_prepare.h) and the very kernels of csrc/cuda/liif_query_kernel.cuh,
// liif_query_mma_kernel.cuh and the three wgmma kernels, executed by the host emulation of
// cuda_host_emulation.h. Exposed as the CPU operator liif_cuda_harness::query, built by
// tests/cuda_harness.py and compared with the reference in tests/test_cuda_harness.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <thread>
#include <tuple>

// After torch's headers: the emulation defines CUDA's keywords and built-in variables.
#include "cuda_host_emulation.h"

#include "cuda/liif_map_convolution.h"
#include "cuda/liif_query_backward.h"
#include "cuda/liif_query_backward_kernels.cuh"
#include "cuda/liif_query_planned_kernel.cuh"
#include "cuda/liif_query_prepare.h"

namespace {

using namespace liif::cuda;

at::Tensor plain_convolution(const at::Tensor& input, const at::Tensor& weight, int64_t padding) {
  return at::conv2d(input, weight, {}, 1, padding);
}

// The CPU stands in for cuDNN: a plain convolution in the tensor's own precision (also where the
// GPU may use TF32 for a reduced precision: the harness checks the kernels, not cuDNN), in bands of
// two rows, so that every harness query also checks the GPU's banded map (convolve_map's bands,
// of which a map the size of the tests' would have one).
at::Tensor convolve_on_host(const at::Tensor& input, const at::Tensor& weight, int64_t padding,
                            bool /*allow_tf32*/) {
  return convolve_in_bands(input, weight, padding, /*band_rows=*/2, plain_convolution);
}

// convolve_in_bands on the CPU, for its own tests.
at::Tensor map_in_bands(const at::Tensor& input, const at::Tensor& weight, int64_t padding,
                        int64_t band_rows) {
  return convolve_in_bands(input, weight, padding, band_rows, plain_convolution);
}

// The emulated device's SMs: few, so that a persistent kernel's blocks take several tiles each
// (the published problem of the tests has 3 to 9 tiles of 128 rows). For the multicast kernel, two
// clusters at once: with 5 tiles, one cluster takes two pairs (the second with a tile only) and
// the other one.
constexpr int kEmulatedMultiprocessors = 2;
constexpr int kEmulatedClusterBlocks = 2 * kWgmmaMcCluster;

template <typename T>
void run_kernel(const QueryKernelParams<T>& params, const LaunchPlan& plan, bool reverse_order) {
  const QueryKernel<T> kernel = planned_kernel<T>(plan, params.precision);
  TORCH_CHECK(kernel != nullptr, "host harness: no kernel for this plan");
  const unsigned workers = std::max(1u, std::thread::hardware_concurrency());
  const int resident =
      is_multicast(plan.path) ? kEmulatedClusterBlocks : kEmulatedMultiprocessors;
  liif_harness::launch(static_cast<unsigned>(launch_blocks(plan, resident)),
                       static_cast<unsigned>(plan.threads),
                       plan.shared_bytes,
                       [&] { kernel(params); }, reverse_order, workers,
                       static_cast<unsigned>(launch_cluster(plan)));
}

// Returns the output and the kernel that ran (KernelPath: 1 fast, 2 generic, 3 WMMA tensor cores,
// 4 mma.sync tensor cores, 5 the 16-warp mma.sync kernel, 6 wgmma, 7 its warp-specialised form,
// 8 its multicast form, 9 that form's ping-pong schedule).
// `max_shared_bytes` stands for the device's per-block shared-memory limit (101376 on sm_86/sm_89,
// 232448 on sm_90); the emulated device has tensor cores and kEmulatedMultiprocessors SMs;
// `tensor_core_kernel` ("auto", "mma", "mma16", "wmma", "wgmma", "wgmma_ws", "wgmma_mc" or
// "wgmma_pp") is the kernel preferred for the reduced precisions (the emulated device runs the
// wgmma kernels); `clusters_fit` false: no cluster fits the device (plan_and_launch).
std::tuple<at::Tensor, int64_t> query_on_host(const at::Tensor& feat, const at::Tensor& coords,
                                              const c10::optional<at::Tensor>& cells,
                                              at::TensorList weights, at::TensorList biases,
                                              bool local_ensemble, bool feat_unfold,
                                              bool cell_decode, c10::string_view precision,
                                              int64_t max_shared_bytes, bool reverse_order,
                                              c10::string_view tensor_core_kernel,
                                              bool clusters_fit) {
  TensorCoreKernel preferred = TensorCoreKernel::kMma;
  TORCH_CHECK(!tensor_core_kernel.empty() &&
                  tensor_core_kernel_named(std::string(tensor_core_kernel).c_str(), &preferred),
              "host harness: tensor_core_kernel must be auto, mma, mma16, wmma, wgmma, wgmma_ws, "
              "wgmma_mc or wgmma_pp");
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
    // The emulated device fits the multicast kernel's clusters unless `clusters_fit` is false
    // (as cudaOccupancyMaxActiveClusters may answer on a partitioned or shared GPU).
    auto launch = [&](const LaunchPlan& plan) {
      if (is_multicast(plan.path) && !clusters_fit) return false;
      if (prepared.params.timing_probe & kProbeNoWeightLoads) {
        // The probe copies no weight: a misaligned pointer makes any copy from it an error.
        prepared.params.operand_weights =
            static_cast<const unsigned char*>(prepared.params.operand_weights) + 8;
      }
      run_kernel(prepared.params, plan, reverse_order);
      return true;
    };
    // With the environment's map staging and timing probes, as liif_cuda.query reads them.
    const LaunchPlan plan = plan_and_launch(prepared, static_cast<size_t>(max_shared_bytes),
                                            /*has_tensor_cores=*/true, preferred,
                                            /*has_wgmma=*/true, launch);
    print_phase_clocks(prepared.phase_clocks, plan);
    out = prepared.out;
    path = static_cast<int64_t>(plan.path);
  });
  return {out, path};
}

// The CUDA backward (csrc/cuda/liif_query_backward.h) on the host: its kernels on the emulation,
// the products and index_add_ on the CPU. `chunk_rows`: rows per chunk (small values give many
// chunks), or 0 for the GPU's (backward_chunk_rows). `first_layer_map`: as query_backward's on CUDA
// (the map without bias, (B, H, W, width0)), or None to convolve again.
std::vector<at::Tensor> query_backward_on_host(
    const at::Tensor& grad_out, const at::Tensor& feat, const at::Tensor& coords,
    const c10::optional<at::Tensor>& cells, at::TensorList weights, at::TensorList biases,
    bool local_ensemble, bool feat_unfold, bool cell_decode, const c10::List<bool>& needs_grad,
    int64_t chunk_rows, bool reverse_order, c10::string_view precision,
    const c10::optional<at::Tensor>& first_layer_map) {
  const std::vector<at::Tensor> w = weights.vec(), bs = biases.vec();
  const liif::QueryShape shape =
      liif::check_query_inputs(feat, coords, cells, w, bs, feat_unfold, cell_decode);
  liif::check_backward_inputs(grad_out, feat, shape, needs_grad.size());
  const at::Tensor saved_map = liif::saved_first_layer_map(first_layer_map, feat, shape);
  const liif::BackwardNeeds needs =
      liif::backward_needs(needs_grad, static_cast<int>(w.size()), cell_decode);
  const unsigned workers = std::max(1u, std::thread::hardware_concurrency());
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(feat.scalar_type(), "liif_query_backward_host_harness", [&] {
    auto launch = [&](BackwardKernel kernel, const BackwardChunkParams<scalar_t>& params,
                      int64_t threads) {
      auto run = [&] {
        switch (kernel) {
          case BackwardKernel::kGeometry: backward_geometry_kernel<scalar_t>(params); break;
          case BackwardKernel::kFirstLayer: backward_first_layer_kernel<scalar_t>(params); break;
          case BackwardKernel::kBlend: backward_blend_kernel<scalar_t>(params); break;
          case BackwardKernel::kCoordinate: backward_coordinate_kernel<scalar_t>(params); break;
        }
      };
      liif_harness::launch(static_cast<unsigned>(backward_blocks(threads)), kBackwardThreads, 0,
                           run, reverse_order, workers);
    };
    grads = query_backward_in_chunks<scalar_t>(grad_out, feat, coords, cells, w, bs,
                                               local_ensemble, feat_unfold, cell_decode, needs,
                                               shape, saved_map_or(saved_map, convolve_on_host),
                                               launch,
        chunk_rows > 0 ? chunk_rows : backward_chunk_rows(shape, feat.element_size()),
        liif::check_backward_precision(feat, precision));
  });
  return grads;
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

// Thread 0 writes the 16 bytes of src at byte `write_at` of the block's dynamic shared memory (a
// store, or an asynchronous copy waited for), then reads the float at byte `read_at` into out.
__global__ void shared_bounds_kernel(const float* src, float* out, int64_t write_at, bool async,
                                     int64_t read_at) {
  LIIF_DYNAMIC_SHARED(smem);
  if (threadIdx.x != 0) return;
  if (async) {
    liif::cuda::async_copy_16(smem + write_at, src);
    liif::cuda::async_copy_commit();
    liif::cuda::async_copy_wait<0>();
  } else {
    std::memcpy(smem + write_at, src, 16);
  }
  std::memcpy(out, smem + read_at, sizeof(float));
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

// The float that shared_bounds_kernel reads, in a block of 32 threads and `shared_bytes`; src: 4
// floats (any bits).
at::Tensor shared_bounds(const at::Tensor& src, int64_t shared_bytes, int64_t write_at, bool async,
                         int64_t read_at) {
  TORCH_CHECK(src.dtype() == at::kFloat && src.is_contiguous() && src.numel() == 4 &&
              shared_bytes >= 0 && write_at >= 0 && read_at >= 0 && write_at % 16 == 0 &&
              read_at % 4 == 0 && write_at + 16 <= shared_bytes + 16384 &&
              read_at + 4 <= shared_bytes + 16384, "shared_bounds: arguments out of the test's range");
  at::Tensor out = at::zeros({1});
  const float* in = src.const_data_ptr<float>();
  float* data = out.data_ptr<float>();
  liif_harness::launch(1, 32, static_cast<size_t>(shared_bytes),
                       [&] { shared_bounds_kernel(in, data, write_at, async, read_at); }, false, 1);
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

// The warp-wide instructions of the mma.sync kernel.

// Lane l of each warp receives lane (l ^ lane_mask)'s value.
__global__ void shuffle_kernel(float* out, int lane_mask) {
  const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
  out[t] = __shfl_xor_sync(0xFFFFFFFFu, static_cast<float>(t), lane_mask);
}

at::Tensor shuffle(int64_t threads, int64_t lane_mask, bool reverse_order) {
  at::Tensor out = at::empty({2 * threads}, at::kFloat);
  float* data = out.data_ptr<float>();
  liif_harness::launch(2, static_cast<unsigned>(threads), 16, [&] {
    shuffle_kernel(data, static_cast<int>(lane_mask)); }, reverse_order, 1);
  return out;
}

// What a warp must not do: "instructions", even lanes shuffle while odd lanes load a matrix;
// "barrier", lane 0 waits at a barrier while the others shuffle; "outside", ldmatrix rows outside
// the block's shared memory.
__global__ void warp_misuse_kernel(int mode) {
  LIIF_DYNAMIC_SHARED(smem);
  uint32_t r[4];
  const unsigned lane = threadIdx.x % 32;
  if (mode == 0) {
    if (lane % 2 == 0) {
      __shfl_xor_sync(0xFFFFFFFFu, 1.f, 1);
    } else {
      liif::cuda::ldmatrix_x4(r, smem + 16 * (lane % 8));
    }
  } else if (mode == 1) {
    if (lane == 0) {
      __syncthreads();
    } else {
      __shfl_xor_sync(0xFFFFFFFFu, 1.f, 1);
      __syncthreads();
    }
  } else {
    liif::cuda::ldmatrix_x4(r, smem + 1024 + 16 * lane);
  }
}

void warp_misuse(c10::string_view mode) {
  const int m = mode == "instructions" ? 0 : mode == "barrier" ? 1 : mode == "outside" ? 2 : -1;
  TORCH_CHECK(m >= 0, "host harness: unknown misuse");
  liif_harness::launch(1, 32, 1024, [&] { warp_misuse_kernel(m); }, false, 1);
}

// One warp computes D (16 x 16) = A (16 x K) B (K x 16) + C with two m16n8 mma.sync, K = 16 for
// bf16 / fp16 and 8 for tf32 (float values already representable in the operand type). The
// fragments come either straight from global memory by PTX's documented per-lane layouts, or from
// shared memory by ldmatrix as the query kernel loads them (A as [row][k], B as [n][k] rows).
template <Precision P>
__global__ void mma_tile_kernel(const float* A, const float* B, const float* C, float* D,
                                bool via_ldmatrix) {
  using Op = Operand<P>;
  using S = typename Op::storage;
  constexpr int K = P == Precision::kTf32 ? 8 : 16;
  constexpr int kPitch = K * static_cast<int>(sizeof(S)) + 16;  // bytes per shared-memory row
  LIIF_DYNAMIC_SHARED(smem);
  const int lane = static_cast<int>(threadIdx.x);
  const int g = lane / 4, t = lane % 4;
  auto bits = [](float v) -> uint32_t {
    const S s = Op::store(v);
    uint32_t u = 0;
    std::memcpy(&u, &s, sizeof s);
    return u;
  };
  // The register holding elements (row, col) and (row, col + 1) of 16-bit operands, or (row, col).
  auto reg = [&](const float* m, int cols, int row, int col) -> uint32_t {
    if (sizeof(S) == 4) return bits(m[row * cols + col]);
    return bits(m[row * cols + col]) | (bits(m[row * cols + col + 1]) << 16);
  };
  uint32_t a[4], b[2][4];
  if (!via_ldmatrix) {
    // B (K x 16) as the column-major operand of each n8 tile: element (k, n) is B[k * 16 + n].
    auto breg = [&](int k, int n) -> uint32_t {
      if (sizeof(S) == 4) return bits(B[k * 16 + n]);
      return bits(B[k * 16 + n]) | (bits(B[(k + 1) * 16 + n]) << 16);
    };
    if (sizeof(S) == 4) {
      a[0] = reg(A, K, g, t);
      a[1] = reg(A, K, g + 8, t);
      a[2] = reg(A, K, g, t + 4);
      a[3] = reg(A, K, g + 8, t + 4);
      for (int n = 0; n < 2; ++n) {
        b[n][0] = breg(t, 8 * n + g);
        b[n][1] = breg(t + 4, 8 * n + g);
      }
    } else {
      a[0] = reg(A, K, g, 2 * t);
      a[1] = reg(A, K, g + 8, 2 * t);
      a[2] = reg(A, K, g, 2 * t + 8);
      a[3] = reg(A, K, g + 8, 2 * t + 8);
      for (int n = 0; n < 2; ++n) {
        b[n][0] = breg(2 * t, 8 * n + g);
        b[n][1] = breg(2 * t + 8, 8 * n + g);
      }
    }
  } else {
    S* sa = reinterpret_cast<S*>(smem);
    S* sb = reinterpret_cast<S*>(smem + 16 * kPitch);
    if (lane == 0) {
      for (int r = 0; r < 16; ++r) {
        for (int k = 0; k < K; ++k) {
          sa[r * kPitch / static_cast<int>(sizeof(S)) + k] = Op::store(A[r * K + k]);
          sb[r * kPitch / static_cast<int>(sizeof(S)) + k] = Op::store(B[k * 16 + r]);
        }
      }
    }
    __syncthreads();
    const int j = lane / 8;
    uint32_t bb[4];
    liif::cuda::ldmatrix_x4(a, smem + (lane % 8 + 8 * (j % 2)) * kPitch + 16 * (j / 2));
    liif::cuda::ldmatrix_x4(bb, smem + (16 + lane % 8 + 8 * (j / 2)) * kPitch + 16 * (j % 2));
    b[0][0] = bb[0];
    b[0][1] = bb[1];
    b[1][0] = bb[2];
    b[1][1] = bb[3];
  }
  for (int n = 0; n < 2; ++n) {
    float d[4] = {C[g * 16 + 8 * n + 2 * t], C[g * 16 + 8 * n + 2 * t + 1],
                  C[(g + 8) * 16 + 8 * n + 2 * t], C[(g + 8) * 16 + 8 * n + 2 * t + 1]};
    liif::cuda::mma_16x8<P>(d, a, b[n][0], b[n][1]);
    D[g * 16 + 8 * n + 2 * t] = d[0];
    D[g * 16 + 8 * n + 2 * t + 1] = d[1];
    D[(g + 8) * 16 + 8 * n + 2 * t] = d[2];
    D[(g + 8) * 16 + 8 * n + 2 * t + 1] = d[3];
  }
}

at::Tensor mma_tile(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                    c10::string_view precision, bool via_ldmatrix) {
  const Precision p = parse_precision(a, precision);
  const int64_t k = p == Precision::kTf32 ? 8 : 16;
  TORCH_CHECK(p != Precision::kFp32 && a.sizes() == at::IntArrayRef({16, k}) &&
              b.sizes() == at::IntArrayRef({k, 16}) && c.sizes() == at::IntArrayRef({16, 16}),
              "host harness: mma_tile takes A (16, K), B (K, 16), C (16, 16)");
  const at::Tensor A = a.contiguous(), B = b.contiguous(), C = c.contiguous();
  at::Tensor D = at::empty({16, 16}, at::kFloat);
  const float *pa = A.const_data_ptr<float>(), *pb = B.const_data_ptr<float>(),
              *pc = C.const_data_ptr<float>();
  float* pd = D.data_ptr<float>();
  auto go = [&](auto kernel) {
    liif_harness::launch(1, 32, 32 * (64 + 16), [&] { kernel(pa, pb, pc, pd, via_ldmatrix); },
                         false, 1);
  };
  switch (p) {
    case Precision::kTf32: go(mma_tile_kernel<Precision::kTf32>); break;
    case Precision::kBf16: go(mma_tile_kernel<Precision::kBf16>); break;
    case Precision::kFp16: go(mma_tile_kernel<Precision::kFp16>); break;
    case Precision::kFp32: break;
  }
  return D;
}

// One warpgroup computes D (64 x 256) = A (64 x 16) B (16 x 256) + C with one wgmma m64n256k16
// (bf16 / fp16; float values already representable): A and C straight from global memory into
// each lane's registers by the documented layouts, B stored by ordinary stores into shared memory
// in the canonical K-major layout the wgmma kernel uses (lbo 128, sbo 256). `mode`: "wait" (D
// after the wait), "before_wait" (D read before the wait: still C, the product is asynchronous),
// "unfenced" (no fence_proxy_async after the stores), "a_written" (an A register written before
// the wait), "shared_a" (A in shared memory too, the same layout, by wgmma_m64n256k16_ss).
template <Precision P>
__global__ void wgmma_tile_kernel(const float* A, const float* B, const float* C, float* D,
                                  int mode) {
  using Op = Operand<P>;
  LIIF_DYNAMIC_SHARED(smem);
  const int tid = static_cast<int>(threadIdx.x);
  const int q = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  auto bits = [](float v) -> uint32_t {
    const typename Op::storage s = Op::store(v);
    uint16_t u = 0;
    std::memcpy(&u, &s, sizeof u);
    return u;
  };
  // Element (row, k) of a K-major operand at `base` in the canonical layout (lbo 128, sbo 256).
  auto store_canonical = [&](unsigned char* base, int row, int k, float v) {
    const uint16_t u = static_cast<uint16_t>(bits(v));
    std::memcpy(base + (row % 8) * 16 + (row / 8) * 256 + (k % 8) * 2 + (k / 8) * 128, &u, 2);
  };
  if (tid == 0) {
    for (int n = 0; n < 256; ++n) {
      for (int k = 0; k < 16; ++k) store_canonical(smem, n, k, B[k * 256 + n]);
    }
    for (int m = 0; m < 64 && mode == 4; ++m) {
      for (int k = 0; k < 16; ++k) store_canonical(smem + 8192, m, k, A[m * 16 + k]);
    }
  }
  if (mode != 2) liif::cuda::fence_proxy_async();
  // The stores count as async-proxy-visible only after a fence: the harness tracks cp.async
  // landings, so "unfenced" lands one copy here.
  if (mode == 2 && tid == 0) {
    liif::cuda::async_copy_16(smem + 8192, smem);
    liif::cuda::async_copy_commit();
    liif::cuda::async_copy_wait<0>();
  }
  __syncthreads();
  const int r0 = 16 * q + g, r1 = r0 + 8;
  uint32_t a[4] = {bits(A[r0 * 16 + 2 * t]) | bits(A[r0 * 16 + 2 * t + 1]) << 16,
                   bits(A[r1 * 16 + 2 * t]) | bits(A[r1 * 16 + 2 * t + 1]) << 16,
                   bits(A[r0 * 16 + 2 * t + 8]) | bits(A[r0 * 16 + 2 * t + 9]) << 16,
                   bits(A[r1 * 16 + 2 * t + 8]) | bits(A[r1 * 16 + 2 * t + 9]) << 16};
  float d[128];
  for (int j = 0; j < 32; ++j) {
    for (int h = 0; h < 2; ++h) {
      for (int e = 0; e < 2; ++e) d[4 * j + 2 * h + e] = C[(r0 + 8 * h) * 256 + 8 * j + 2 * t + e];
    }
  }
  liif::cuda::wgmma_fence();
  const uint64_t b_descriptor = liif::cuda::wgmma_descriptor(liif::cuda::shared_address(smem), 128, 256);
  if (mode == 4) {
    liif::cuda::wgmma_m64n256k16_ss<P>(
        d, liif::cuda::wgmma_descriptor(liif::cuda::shared_address(smem + 8192), 128, 256),
        b_descriptor);
  } else {
    liif::cuda::wgmma_m64n256k16<P>(d, a, b_descriptor);
  }
  liif::cuda::wgmma_commit();
  if (mode == 3) a[1] ^= 1u;
  float early[128];
  std::memcpy(early, d, sizeof d);
  liif::cuda::wgmma_wait<0>();
  const float* result = mode == 1 ? early : d;
  for (int j = 0; j < 32; ++j) {
    for (int h = 0; h < 2; ++h) {
      for (int e = 0; e < 2; ++e) {
        D[(r0 + 8 * h) * 256 + 8 * j + 2 * t + e] = result[4 * j + 2 * h + e];
      }
    }
  }
}

at::Tensor wgmma_tile(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                      c10::string_view precision, c10::string_view mode) {
  const Precision p = parse_precision(a, precision);
  const int m = mode == "wait"          ? 0
                : mode == "before_wait" ? 1
                : mode == "unfenced"    ? 2
                : mode == "a_written"   ? 3
                : mode == "shared_a"    ? 4
                                        : -1;
  TORCH_CHECK(m >= 0, "host harness: unknown wgmma_tile mode");
  TORCH_CHECK((p == Precision::kBf16 || p == Precision::kFp16) &&
                  a.sizes() == at::IntArrayRef({64, 16}) && b.sizes() == at::IntArrayRef({16, 256}) &&
                  c.sizes() == at::IntArrayRef({64, 256}),
              "host harness: wgmma_tile takes bf16 or fp16, A (64, 16), B (16, 256), C (64, 256)");
  const at::Tensor A = a.contiguous(), B = b.contiguous(), C = c.contiguous();
  at::Tensor D = at::empty({64, 256}, at::kFloat);
  const float *pa = A.const_data_ptr<float>(), *pb = B.const_data_ptr<float>(),
              *pc = C.const_data_ptr<float>();
  float* pd = D.data_ptr<float>();
  auto go = [&](auto kernel) {
    liif_harness::launch(1, 128, 16384, [&] { kernel(pa, pb, pc, pd, m); }, false, 1);
  };
  if (p == Precision::kBf16) {
    go(wgmma_tile_kernel<Precision::kBf16>);
  } else {
    go(wgmma_tile_kernel<Precision::kFp16>);
  }
  return D;
}

// Named barriers between two warps, a producer (warp 0) and a consumer (warp 1). `mode`: "handoff"
// (the producer writes 32 values, arrives; the consumer waits, reads them: returned),
// "late_write" (the producer arrives, then writes: the consumer reads what was there, NaN),
// "deadlock" (the consumer waits for an arrival that never comes), "unmatched" (the producer
// arrives, nobody waits), "count" (the two warps name different thread counts).
__global__ void named_barrier_kernel(float* out, int mode) {
  LIIF_DYNAMIC_SHARED(smem);
  float* shared = reinterpret_cast<float*>(smem);
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32;
  if (tid < 32) {
    if (mode == 0 || mode == 2) shared[lane] = static_cast<float>(lane);
    if (mode == 1 || mode == 3) liif::cuda::named_barrier_arrive(1, 64);
    if (mode == 0) liif::cuda::named_barrier_arrive(1, 64);
    if (mode == 1) shared[lane] = static_cast<float>(lane);
    if (mode == 4) liif::cuda::named_barrier_sync(1, 64);
  } else {
    if (mode == 0 || mode == 1 || mode == 2) liif::cuda::named_barrier_sync(1, 64);
    if (mode == 4) liif::cuda::named_barrier_sync(1, 32);
    out[lane] = shared[lane];
  }
}

at::Tensor named_barrier(c10::string_view mode) {
  const int m = mode == "handoff"      ? 0
                : mode == "late_write" ? 1
                : mode == "deadlock"   ? 2
                : mode == "unmatched"  ? 3
                : mode == "count"      ? 4
                                       : -1;
  TORCH_CHECK(m >= 0, "host harness: unknown named_barrier mode");
  at::Tensor out = at::empty({32}, at::kFloat);
  float* po = out.data_ptr<float>();
  liif_harness::launch(1, 64, 128, [&] { named_barrier_kernel(po, m); }, false, 1);
  return out;
}

// Bulk copies and mbarriers in a cluster of two blocks of 128 threads: the multicast kernel's
// weight stream in small. `mode`: "multicast" (block r copies half r of the 32 floats of `src`
// into both blocks' buffers, each block announcing the whole on its mbarrier; each block's first
// warp reads its buffer after the wait: returned, (2, 32)), "read_before_wait" (read before the
// wait: what was there, NaN), "never_waited" (a copy nobody waits for), "uninitialised" (an
// arrival on an mbarrier never initialised), "overwritten" (a float stored over an mbarrier),
// "too_many" (two arrivals in one phase of an mbarrier of count 1), "exit_before_arrival" (block
// 1 arrives on block 0's mbarrier after block 0 returned: no cluster barrier before the exit),
// "unaligned" (a copy of 8 bytes).
__global__ void bulk_copy_kernel(const float* src, float* out, int mode) {
  LIIF_DYNAMIC_SHARED(smem);
  float* data = reinterpret_cast<float*>(smem);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + 128);
  const uint32_t rank = liif::cuda::cluster_rank();
  const int tid = static_cast<int>(threadIdx.x);
  uint64_t* other = full + 1;
  if (tid == 0 && mode != 3) {
    liif::cuda::mbarrier_init(full, 1);
    liif::cuda::mbarrier_init(other, 1);
  }
  liif::cuda::cluster_sync();
  if (mode == 6) {
    // Block 0 arrives on block 1's other mbarrier and returns; block 1 waits for that, then
    // arrives on block 0's.
    if (rank == 0 && tid == 0) liif::cuda::mbarrier_arrive(other, 1);
    if (rank == 1 && tid == 0) {
      liif::cuda::mbarrier_wait(other, 0);
      liif::cuda::mbarrier_arrive(full, 0);
    }
    return;
  }
  if (tid == 0) {
    if (mode == 3) liif::cuda::mbarrier_arrive(full, rank);
    if (mode == 4) *reinterpret_cast<float*>(smem + 128) = 1.f;
    liif::cuda::mbarrier_arrive_expect_tx(full, 128);
    if (mode == 5) liif::cuda::mbarrier_arrive(full, rank);
    liif::cuda::bulk_copy(data + 16 * rank, src + 16 * rank, mode == 7 ? 8 : 64, full, 3);
  }
  if (mode == 1 && tid < 32) out[32 * rank + tid] = data[tid];
  if (mode != 2) liif::cuda::mbarrier_wait(full, 0);
  if (mode == 0 && tid < 32) out[32 * rank + tid] = data[tid];
  liif::cuda::cluster_sync();
}

at::Tensor cluster_bulk_copy(const at::Tensor& src, c10::string_view mode) {
  static const char* const kModes[] = {"multicast", "read_before_wait", "never_waited",
                                       "uninitialised", "overwritten", "too_many",
                                       "exit_before_arrival", "unaligned"};
  int m = -1;
  for (int i = 0; i < 8; ++i) m = mode == kModes[i] ? i : m;
  TORCH_CHECK(m >= 0, "host harness: unknown bulk_copy mode");
  TORCH_CHECK(src.scalar_type() == at::kFloat && src.numel() == 32 && src.is_contiguous(),
              "host harness: bulk_copy takes 32 contiguous floats");
  at::Tensor out = at::full({2, 32}, -1.f, at::kFloat);
  const float* ps = src.const_data_ptr<float>();
  float* po = out.data_ptr<float>();
  liif_harness::launch(2, 128, 256, [&] { bulk_copy_kernel(ps, po, m); }, false, 1, 2);
  return out;
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
  m.def("shared_bounds(Tensor src, int shared_bytes, int write_at, bool async, int read_at) -> "
        "Tensor");
  m.impl("shared_bounds", c10::DispatchKey::CPU, &shared_bounds);
  m.def("tf32_operand(bool rounded) -> ()");
  m.impl("tf32_operand", c10::DispatchKey::CatchAll, &tf32_operand);
  m.def("divergent_barrier() -> ()");
  m.impl("divergent_barrier", c10::DispatchKey::CatchAll, &divergent_barrier);
  m.def("shuffle(int threads, int lane_mask, bool reverse_order) -> Tensor");
  m.impl("shuffle", c10::DispatchKey::CatchAll, &shuffle);
  m.def("warp_misuse(str mode) -> ()");
  m.impl("warp_misuse", c10::DispatchKey::CatchAll, &warp_misuse);
  m.def("mma_tile(Tensor a, Tensor b, Tensor c, str precision, bool via_ldmatrix) -> Tensor");
  m.impl("mma_tile", c10::DispatchKey::CPU, &mma_tile);
  m.def("wgmma_tile(Tensor a, Tensor b, Tensor c, str precision, str mode) -> Tensor");
  m.impl("wgmma_tile", c10::DispatchKey::CPU, &wgmma_tile);
  m.def("map_in_bands(Tensor input, Tensor weight, int padding, int band_rows) -> Tensor");
  m.impl("map_in_bands", c10::DispatchKey::CPU, &map_in_bands);
  m.def("named_barrier(str mode) -> Tensor");
  m.impl("named_barrier", c10::DispatchKey::CatchAll, &named_barrier);
  m.def("bulk_copy(Tensor src, str mode) -> Tensor");
  m.impl("bulk_copy", c10::DispatchKey::CPU, &cluster_bulk_copy);
  m.def(
      "query(Tensor feat, Tensor coords, Tensor? cells, Tensor[] weights, Tensor[] biases, "
      "bool local_ensemble, bool feat_unfold, bool cell_decode, str precision, "
      "int max_shared_bytes, bool reverse_order, str tensor_core_kernel=\"mma\", "
      "bool clusters_fit=True) -> (Tensor, int)");
  m.impl("query", c10::DispatchKey::CPU, &query_on_host);
  m.def(
      "query_backward(Tensor grad_out, Tensor feat, Tensor coords, Tensor? cells, Tensor[] weights, "
      "Tensor[] biases, bool local_ensemble, bool feat_unfold, bool cell_decode, bool[] needs_grad, "
      "int chunk_rows, bool reverse_order, str precision=\"fp32\", Tensor? first_layer_map=None) "
      "-> Tensor[]");
  m.impl("query_backward", c10::DispatchKey::CPU, &query_backward_on_host);
}
