// Which gradients liif_cuda::query_backward is asked for (its `needs_grad` flags), and how deep the
// backward must therefore go; shared by the CPU and CUDA backward.
#pragma once

#include <vector>

namespace liif {

struct BackwardNeeds {
  bool feat = false, coords = false, cells = false;
  std::vector<bool> weight, bias;  // per layer
  bool first_feature_columns() const { return weight[0]; }
  // Layer 0's output gradient G0 (rows x width0) is needed for any of these.
  bool layer0() const { return feat || coords || cells || weight[0] || bias[0]; }
  // The lowest layer whose output gradient must be computed (0: G0 itself; the number of layers:
  // nothing to compute at all).
  int lowest_layer() const {
    if (layer0()) return 0;
    for (size_t l = 1; l < weight.size(); ++l) {
      if (weight[l] || bias[l]) return static_cast<int>(l);
    }
    return static_cast<int>(weight.size());
  }
};

// `needs_grad` (the operator's bool[]: feat, coords, cells, each weight, each bias) has the length
// check_backward_inputs checked.
template <typename Flags>
BackwardNeeds backward_needs(const Flags& needs_grad, int num_layers, bool cell_decode) {
  BackwardNeeds needs;
  needs.feat = needs_grad[0];
  needs.coords = needs_grad[1];
  needs.cells = needs_grad[2] && cell_decode;
  for (int l = 0; l < num_layers; ++l) {
    needs.weight.push_back(needs_grad[3 + l]);
    needs.bias.push_back(needs_grad[3 + num_layers + l]);
  }
  return needs;
}

}  // namespace liif
