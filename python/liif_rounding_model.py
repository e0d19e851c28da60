"""The rounding model of liif_cuda's tensor-core kernel (precision "tf32", "bf16", "fp16"), stated on
the reference: an MLP that rounds where the kernel rounds and is exact (float64) elsewhere.

The kernel computes layer 0 in float32 and stores its output rounded to the operand type; each hidden
layer multiplies rounded activations by rounded weights with float32 accumulation (the products of
such operands are exact), adds the float32 bias, applies ReLU and rounds the result once; the last
layer and the blend are float32. Used as the oracle of the kernel's tests (tests/helpers.py) and to
predict the precisions' effect on published metrics (benchmarks/precision_psnr.py).
"""

import numpy as np
import torch
import torch.nn.functional as F


def tf32_round_nearest_away(x):
    """cvt.rna.tf32.f32 restated with numpy: float32 to 10 mantissa bits, ties away from zero."""
    bits = x.detach().cpu().numpy().view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x1000) & ~np.uint64(0x1FFF)).astype(np.uint32)
    return torch.from_numpy(rounded.view(np.float32)).to(x.device)


def round_operand(x, precision):
    """float32 values rounded to the tensor-core operand type of `precision` and back."""
    if precision == "tf32":
        return tf32_round_nearest_away(x)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return x.to(dtype).float()


class KernelRounding(torch.nn.Module):
    """`mlp` (LIIF's MLP: Linear/ReLU layers in `.layers`) rounded where the tensor-core kernel
    rounds: layer 0 exact, its output and every hidden layer's output rounded to the operand type,
    the hidden layers' weights rounded, the last layer exact; float64 arithmetic otherwise. Takes
    and returns float32."""

    def __init__(self, mlp, precision):
        super().__init__()
        self.linears = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)]
        self.precision = precision

    def round(self, x):
        return round_operand(x.float(), self.precision).double()

    def forward(self, x):
        first, *hidden, last = self.linears
        x = x.double()
        x = self.round(torch.relu(F.linear(x, first.weight.double(), first.bias.double())))
        for layer in hidden:
            x = self.round(torch.relu(F.linear(x, self.round(layer.weight), layer.bias.double())))
        return F.linear(x, last.weight.double(), last.bias.double()).float()
