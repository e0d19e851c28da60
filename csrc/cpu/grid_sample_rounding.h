// How torch's CPU grid_sample rounds nearest sampling's source index on this build and processor.
//
// Its vectorised CPU kernel computes (c + 1) * (size / 2) - 0.5 with vector operations that the
// compiler contracts into an FMA where the instruction set has one (x86 AVX2 / AVX-512 builds, ARM),
// and not otherwise. Which one a torch build and processor use is asked of torch itself, once per
// dtype, with a coordinate on an LR cell border that the two roundings send to different cells.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

namespace liif {

// A coordinate c and axis length n on which grid_sample picks cell 1 with a fused multiply-add and
// cell 0 with two roundings (found by enumerating exact borders; tests/cpp checks both choices).
template <typename T>
struct SourceIndexProbe;
template <>
struct SourceIndexProbe<float> {
  static constexpr double coordinate = -0.9793814420700073;  // a float32: -95/97 rounded
  static constexpr int64_t size = 97;
};
template <>
struct SourceIndexProbe<double> {
  static constexpr double coordinate = -1.0 / 3.0;
  static constexpr int64_t size = 3;
};

// Whether torch's CPU grid_sample (nearest, zeros padding, align_corners=False) fuses the source
// index's multiply-add for dtype T. Computed on first use (thread-safe), then cached.
template <typename T>
bool cpu_grid_sample_fuses_index() {
  static const bool fused = [] {
    using Probe = SourceIndexProbe<T>;
    const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    const at::Tensor input = at::arange(Probe::size, options).view({1, 1, 1, Probe::size});
    const at::Tensor grid =
        at::tensor({static_cast<T>(Probe::coordinate), T(0)}, options).view({1, 1, 1, 2});
    const at::Tensor cell = at::grid_sampler(input, grid, /*interpolation_mode=nearest*/ 1,
                                             /*padding_mode=zeros*/ 0, /*align_corners=*/false);
    return cell.item<double>() == 1.0;
  }();
  return fused;
}

}  // namespace liif
