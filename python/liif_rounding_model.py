"""The rounding model of liif_cuda's tensor-core kernel (precision "tf32", "bf16", "fp16"), stated on
the reference: an MLP that rounds where the kernel rounds and is exact (float64) elsewhere.

On a GPU the CUDA op computes layer 0's feature part (the "first-layer map", a convolution) with
cuDNN, which may use TF32 tensor cores for the reduced precisions: both operands then lose their low
13 mantissa bits. The model truncates them (`map_columns`), the worst case of TF32's roundings; the
host execution harness computes that map exactly (map_columns=None). The kernel then adds the
coordinate and cell columns and the bias in float32 and stores layer 0's output rounded to the
operand type; each hidden layer multiplies rounded activations by rounded weights with float32
accumulation (the products of such operands are exact), adds the float32 bias, applies ReLU and
rounds the result once; the last layer and the blend are float32. Used as the oracle of the kernel's
tests (tests/helpers.py) and to predict the precisions' effect on published metrics
(benchmarks/precision_psnr.py).
"""

import numpy as np
import torch
import torch.nn.functional as F


def _float32_bits(x):
    return x.detach().float().cpu().numpy().view(np.uint32).astype(np.uint64)


def _from_bits(bits, like):
    return torch.from_numpy(bits.astype(np.uint32).view(np.float32)).to(like.device)


def tf32_round_nearest_away(x):
    """cvt.rna.tf32.f32 restated with numpy: float32 to 10 mantissa bits, ties away from zero."""
    return _from_bits((_float32_bits(x) + 0x1000) & ~np.uint64(0x1FFF), x)


def tf32_truncate(x):
    """float32 to 10 mantissa bits towards zero: what tensor cores do to float32 operands that were
    not rounded before (the larger error of the two TF32 conversions)."""
    return _from_bits(_float32_bits(x) & ~np.uint64(0x1FFF), x)


def round_operand(x, precision):
    """float32 values rounded to the tensor-core operand type of `precision` and back."""
    if precision == "tf32":
        return tf32_round_nearest_away(x)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return x.to(dtype).float()


def map_columns(in_dim, cell_decode=True):
    """How many leading input columns of layer 0 the CUDA op computes as the first-layer map: all but
    the relative coordinate (2) and, with cell_decode, the cell (2)."""
    return in_dim - 2 - (2 if cell_decode else 0)


class KernelRounding(torch.nn.Module):
    """`mlp` (LIIF's MLP: Linear/ReLU layers in `.layers`) rounded where the tensor-core kernel
    rounds: layer 0 exact except, when `map_columns` is given, its first `map_columns` inputs and
    weight columns truncated to TF32 (the GPU's first-layer map); layer 0's and every hidden layer's
    output rounded to the operand type, the hidden layers' weights rounded, the last layer exact;
    float64 arithmetic otherwise. Takes and returns float32."""

    def __init__(self, mlp, precision, map_columns=None):
        super().__init__()
        self.linears = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)]
        self.precision = precision
        self.map_columns = map_columns

    def round(self, x):
        return round_operand(x.float(), self.precision).double()

    def first_layer(self, x, layer):
        weight = layer.weight.float()
        if self.map_columns is not None:
            m = self.map_columns
            x = torch.cat([tf32_truncate(x[..., :m]), x[..., m:]], dim=-1)
            weight = torch.cat([tf32_truncate(weight[:, :m]), weight[:, m:]], dim=-1)
        return F.linear(x.double(), weight.double(), layer.bias.double())

    def forward(self, x):
        first, *hidden, last = self.linears
        x = self.round(torch.relu(self.first_layer(x, first)))
        for layer in hidden:
            x = self.round(torch.relu(F.linear(x, self.round(layer.weight), layer.bias.double())))
        return F.linear(x, last.weight.double(), last.bias.double()).float()


def _straight_through(x, rounded):
    """`rounded` in the forward, the identity in the backward (a rounding the backward ignores)."""
    return x + (rounded - x).detach()


class _OutputGradientRoundedLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) whose backward rounds the output gradient to bf16 before both of
    its products (input and weight gradients); exact (float64) otherwise."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        rounded = round_operand(grad.float(), "bf16").double()
        rows = rounded.reshape(-1, rounded.shape[-1])
        return (rounded @ weight, rows.t() @ x.reshape(-1, x.shape[-1]),
                grad.reshape(-1, grad.shape[-1]).sum(0))


class Bf16BackwardRounding(KernelRounding):
    """The gradients of the CPU kernel's bf16 backward mode (backward_precision="bf16"): the
    forward of KernelRounding(mlp, "bf16") (what the bf16 forward computes, recomputed), whose
    roundings the backward passes through unchanged except that each layer between hidden layers
    multiplies its output gradient rounded to bf16 by its rounded weight (input gradient) and by
    its rounded input activations (weight gradient), with float32-exact products and float32
    accumulation (float64 here); the ReLUs' derivatives, layer 0, the last layer and the blend
    exact. Use it as `imnet` of the reference's query and take its autograd gradients. Not
    modelled: on the CPU the first-layer map's gradient (layer 0's output gradient summed per LR
    cell) goes through the convolution's backward with bf16 operands and results (feat's gradient
    and layer 0's feature columns'; about 2^-9 relative each), and the CPU's bf16 instructions
    flush values below about 1e-38 to zero."""

    def __init__(self, mlp):
        super().__init__(mlp, "bf16")

    def forward(self, x):
        first, *hidden, last = self.linears
        x = torch.relu(self.first_layer(x, first))
        x = _straight_through(x, self.round(x))
        for layer in hidden:
            weight = layer.weight.double()
            weight = _straight_through(weight, self.round(weight))
            x = torch.relu(_OutputGradientRoundedLinear.apply(x, weight, layer.bias.double()))
            x = _straight_through(x, self.round(x))
        return F.linear(x, last.weight.double(), last.bias.double()).float()
