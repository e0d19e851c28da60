// Which kernel a launch plan runs: shared by the CUDA launcher (liif_query_kernels.cu) and the host
// execution harness, so that both run what the plan names.
#pragma once

#include <type_traits>

#include "liif_query_wgmma_mc_kernel.cuh"
#include "liif_query_wgmma_ws_kernel.cuh"

namespace liif {
namespace cuda {

// The kernel `plan` names for `precision`, or nullptr where there is none (the fast and tensor-core
// kernels are float32 only; the host never plans them for float64). Shared by the CUDA launcher and
// the host execution harness.
template <typename T>
using QueryKernel = void (*)(QueryKernelParams<T>);

template <typename T>
inline QueryKernel<T> planned_kernel(const LaunchPlan& plan, Precision precision) {
  if (plan.path == KernelPath::kGeneric) return liif_query_generic_kernel<T>;
  if constexpr (std::is_same_v<T, float>) {
    if (plan.path == KernelPath::kFast) return liif_query_fast_kernel;
    if (plan.path == KernelPath::kTensorCore) {
      switch (precision) {
        case Precision::kTf32: return liif_query_tensor_core_kernel<Precision::kTf32>;
        case Precision::kBf16: return liif_query_tensor_core_kernel<Precision::kBf16>;
        case Precision::kFp16: return liif_query_tensor_core_kernel<Precision::kFp16>;
        case Precision::kFp32: break;
      }
    }
    if (plan.path == KernelPath::kWgmma) {
      switch (precision) {
        case Precision::kBf16: return liif_query_wgmma_kernel<Precision::kBf16>;
        case Precision::kFp16: return liif_query_wgmma_kernel<Precision::kFp16>;
        case Precision::kTf32:
        case Precision::kFp32: break;
      }
    }
    if (is_multicast(plan.path)) {
      const bool ping_pong = plan.path == KernelPath::kWgmmaPp;
      switch (precision) {
        case Precision::kBf16:
          return ping_pong ? liif_query_wgmma_mc_kernel<Precision::kBf16, true>
                           : liif_query_wgmma_mc_kernel<Precision::kBf16, false>;
        case Precision::kFp16:
          return ping_pong ? liif_query_wgmma_mc_kernel<Precision::kFp16, true>
                           : liif_query_wgmma_mc_kernel<Precision::kFp16, false>;
        case Precision::kTf32:
        case Precision::kFp32: break;
      }
    }
    if (plan.path == KernelPath::kWgmmaWs) {
      switch (precision) {
        case Precision::kBf16: return liif_query_wgmma_ws_kernel<Precision::kBf16>;
        case Precision::kFp16: return liif_query_wgmma_ws_kernel<Precision::kFp16>;
        case Precision::kTf32:
        case Precision::kFp32: break;
      }
    }
    if (plan.path == KernelPath::kMma || plan.path == KernelPath::kMma16) {
      const bool wide = plan.path == KernelPath::kMma16;
      switch (precision) {
        case Precision::kTf32:
          return wide ? liif_query_mma_kernel<Precision::kTf32, 32>
                      : liif_query_mma_kernel<Precision::kTf32, 64>;
        case Precision::kBf16:
          return wide ? liif_query_mma_kernel<Precision::kBf16, 32>
                      : liif_query_mma_kernel<Precision::kBf16, 64>;
        case Precision::kFp16:
          return wide ? liif_query_mma_kernel<Precision::kFp16, 32>
                      : liif_query_mma_kernel<Precision::kFp16, 64>;
        case Precision::kFp32: break;
      }
    }
  }
  return nullptr;
}

}  // namespace cuda
}  // namespace liif
