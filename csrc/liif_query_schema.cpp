// The schema of the fused LIIF query. Kernels register themselves per dispatch key in cpu/ and cuda/;
// fake (meta) and autograd support are registered from Python (liif_cuda/_registration.py).
#include <torch/library.h>

TORCH_LIBRARY(liif_cuda, m) {
  // (B, C, H, W) features, (B, Q, 2) coordinates and cells in (y, x) order, the MLP as per-layer
  // (out, in) weights and (out,) biases -> (B, Q, out_dim). See python/liif_reference.py:query_rgb.
  // `precision`: "fp32" (exact), "tf32", "bf16" or "fp16" (the hidden layers' arithmetic on CUDA
  // tensor cores; see csrc/liif_query_checks.h). `backward_precision`: that of the gradients
  // autograd computes through query_backward, "fp32" (exact) or "bf16".
  m.def(
      "query(Tensor feat, Tensor coords, Tensor? cells, Tensor[] weights, Tensor[] biases, "
      "bool local_ensemble, bool feat_unfold, bool cell_decode, str precision=\"fp32\", "
      "str backward_precision=\"fp32\") -> Tensor");
  // query, also returning what the backward can reuse instead of computing it again: the first-layer
  // map, (B, H, W, width0) in the device's own convention (bias of layer 0 included on the CPU, not
  // on CUDA), or an empty tensor where it keeps none: no more (query, neighbour) rows than LR cells
  // (see first_layer_map_pays_off), and on CUDA a precision other than "fp32", whose map has TF32
  // error. liif_cuda.query calls it when autograd will need a backward.
  m.def(
      "query_saving_map(Tensor feat, Tensor coords, Tensor? cells, Tensor[] weights, "
      "Tensor[] biases, bool local_ensemble, bool feat_unfold, bool cell_decode, "
      "str precision=\"fp32\", str backward_precision=\"fp32\") -> (Tensor, Tensor)");
  // The gradients of query for grad_out (B, Q, out_dim), in the order feat, coords, cells,
  // weights..., biases...: one flag per gradient in `needs_grad`, an empty tensor where it is false.
  // `precision` "fp32": the exact (float32 / float64) function's gradients, whatever precision the
  // forward used; "bf16": the products between hidden layers (forward again and backward) with bf16
  // operands and results (where the device has bf16 products; see liif_cuda/_query.py).
  // `first_layer_map`: query_saving_map's second output for the same inputs on the same device, or
  // None (or an empty tensor) to compute the map again.
  m.def(
      "query_backward(Tensor grad_out, Tensor feat, Tensor coords, Tensor? cells, Tensor[] weights, "
      "Tensor[] biases, bool local_ensemble, bool feat_unfold, bool cell_decode, bool[] needs_grad, "
      "str precision=\"fp32\", Tensor? first_layer_map=None) -> Tensor[]");
}
