"""Bad input gets a clear exception naming the argument, from the wrapper and from the raw op."""

import pytest
import torch
import torch.nn as nn
from helpers import make_mlp

import liif_cuda


def good():
    feat = torch.randn(2, 3, 4, 5)
    coords = torch.rand(2, 6, 2) * 2 - 1
    cells = torch.full((2, 6, 2), 0.1)
    mlp = make_mlp(31, [8], 3, torch.float32)
    return feat, coords, cells, mlp


class _OwnForward(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.layers = mlp.layers

    def forward(self, x):
        return torch.tanh(self.layers(x))


class _SequentialTanh(nn.Sequential):
    def forward(self, x):
        return torch.tanh(super().forward(x))


# A Sequential named as LIIF's MLP (which holds its layers as .layers), with a forward of its own.
_TanhMLP = type("MLP", (nn.Sequential,),
                {"forward": lambda self, x: torch.tanh(nn.Sequential.forward(self, x))})


# A module named as LIIF's MLP, holding .layers, whose forward does more (as forks of LIIF write
# it: an output activation): refused by its forward's code, not let through by its name; so is a
# subclass that inherits that forward.
class MLP(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.layers = mlp.layers

    def forward(self, x):
        shape = x.shape[:-1]
        x = self.layers(x.view(-1, x.shape[-1]))
        return torch.sigmoid(x.view(*shape, -1))


class _SigmoidMLPSubclass(MLP):
    pass


class _ScaledLinear(nn.Linear):  # a Linear that computes more than its weight and bias (LoRA-like)
    def forward(self, x):
        return 2 * super().forward(x)


class _LeakyReLU(nn.ReLU):
    def forward(self, x):
        return nn.functional.leaky_relu(x)


def _with_instance_forward(module, forward):
    """A forward set on the instance (as hooks and patchers set it): it runs, not the class's."""
    module.forward = forward
    return module


class _CallsSigmoid(nn.Sequential):  # a __call__ of its own runs instead of forward
    def __call__(self, x):
        return torch.sigmoid(super().__call__(x))


CASES = {
    "feat rank": (lambda f, c, ce, m: (f[0], c, ce, m), {}, r"feat must be \(B, C, H, W\)"),
    "coords rank": (lambda f, c, ce, m: (f, c[0], ce, m), {}, r"coords must be \(B, Q, 2\)"),
    "coords last dim": (lambda f, c, ce, m: (f, torch.rand(2, 6, 3), ce, m), {},
                        r"coords must be \(B, Q, 2\)"),
    "coords batch": (lambda f, c, ce, m: (f, c[:1], ce, m), {}, "coords has batch size 1"),
    "cells queries": (lambda f, c, ce, m: (f, c, ce[:, :4], m), {}, "cells has 4 queries"),
    "cells batch": (lambda f, c, ce, m: (f, c, ce[:1], m), {}, "cells has batch size 1"),
    "cells last dim": (lambda f, c, ce, m: (f, c, torch.full((2, 6, 3), 0.1), m), {},
                       r"cells must be \(B, Q, 2\)"),
    "cells rank": (lambda f, c, ce, m: (f, c, ce[0], m), {}, r"cells must be \(B, Q, 2\)"),
    "cells missing": (lambda f, c, ce, m: (f, c, None, m), {}, "cells is required"),
    "coords dtype": (lambda f, c, ce, m: (f, c.double(), ce, m), {},
                     "coords must have feat's dtype"),
    "cells dtype": (lambda f, c, ce, m: (f, c, ce.double(), m), {}, "cells must have feat's dtype"),
    "weight dtype": (lambda f, c, ce, m: (f, c, ce, m.double()), {},
                     "imnet layer 0 weight must have feat's dtype"),
    "coords device": (lambda f, c, ce, m: (f, c.to("meta"), ce, m), {},
                      "coords must be on feat's device"),
    "feat integer": (lambda f, c, ce, m: (f.long(), c, ce, m), {},
                     "feat must be a floating-point tensor"),
    "coords integer": (lambda f, c, ce, m: (f, c.long(), ce, m), {},
                       "coords must be a floating-point tensor"),
    "half mixed": (lambda f, c, ce, m: (f.half(), c, ce, m), {},
                   "coords must have feat's dtype torch.float16"),
    "half mixed weight": (lambda f, c, ce, m: (f.half(), c.half(), ce.half(), m), {},
                          "imnet layer 0 weight must have feat's dtype torch.float16"),
    "first layer width": (lambda f, c, ce, m: (f, c, ce, make_mlp(30, [8], 3, torch.float32)),
                          {}, "the first layer takes 30 inputs.*gives 31"),
    "flags vs mlp": (lambda f, c, ce, m: (f, c, ce, m), {"feat_unfold": False},
                     "the first layer takes 31 inputs.*gives 7"),
    "cell flag vs mlp": (lambda f, c, ce, m: (f, c, ce, m), {"cell_decode": False},
                         "the first layer takes 31 inputs.*gives 29"),
    "layer chain": (lambda f, c, ce, m: (f, c, ce, [(torch.randn(8, 31), torch.randn(8)),
                                                    (torch.randn(3, 7), torch.randn(3))]), {},
                    "layer 1 takes 7 inputs but layer 0 outputs 8"),
    # Every layer's parameters are checked, not only the first layer's.
    "second weight dtype": (lambda f, c, ce, m: (f, c, ce, [(torch.randn(8, 31), torch.randn(8)),
                                                            (torch.randn(3, 8).double(),
                                                             torch.randn(3))]), {},
                            "imnet layer 1 weight must have feat's dtype"),
    "bias dtype": (lambda f, c, ce, m: (f, c, ce, [(torch.randn(8, 31), torch.randn(8).double()),
                                                   (torch.randn(3, 8), torch.randn(3))]), {},
                   "imnet layer 0 bias must have feat's dtype"),
    "layer without outputs": (lambda f, c, ce, m: (f, c, ce, [(torch.randn(0, 31), torch.randn(0)),
                                                              (torch.randn(3, 0), torch.randn(3))]),
                              {}, "imnet: layer 0 has no outputs"),
    "bias shape": (lambda f, c, ce, m: (f, c, ce, [(torch.randn(8, 31), torch.randn(7))]), {},
                   r"layer 0 bias must be \(8,\)"),
    "weight rank": (lambda f, c, ce, m: (f, c, ce, [(torch.randn(8), torch.randn(8))]), {},
                    r"layer 0 weight must be \(out, in\)"),
    "empty map": (lambda f, c, ce, m: (torch.randn(2, 3, 0, 5), c, ce, m), {},
                  "feat must have C, H, W >= 1"),
    "imnet type": (lambda f, c, ce, m: (f, c, ce, "mlp"), {}, "imnet: expected an nn.Sequential"),
    "imnet activation": (lambda f, c, ce, m: (f, c, ce, nn.Sequential(nn.Linear(31, 8), nn.Tanh(),
                                                                      nn.Linear(8, 3))), {},
                         "expected nn.ReLU at position 1"),
    "imnet trailing relu": (lambda f, c, ce, m: (f, c, ce, nn.Sequential(nn.Linear(31, 3),
                                                                         nn.ReLU())), {},
                            "must end with an nn.Linear"),
    "imnet empty": (lambda f, c, ce, m: (f, c, ce, []), {}, "needs at least one"),
    # A forward that does more than the layers would be answered without it: refused.
    "imnet own forward": (lambda f, c, ce, m: (f, c, ce, _OwnForward(m)), {},
                          "_OwnForward defines its own forward.*pass imnet.layers"),
    "imnet Sequential forward": (lambda f, c, ce, m: (f, c, ce, _SequentialTanh(*m.layers)), {},
                                 "_SequentialTanh defines its own forward"),
    "imnet Sequential named MLP": (lambda f, c, ce, m: (f, c, ce, _TanhMLP(*m.layers)), {},
                                   r"MLP defines its own forward.*pass nn.Sequential\(\*imnet\)"),
    "imnet Linear subclass": (lambda f, c, ce, m: (f, c, ce, nn.Sequential(
        m.layers[0], m.layers[1], _ScaledLinear(8, 3))), {},
        "_ScaledLinear at position 2 of the Sequential overrides Linear.forward"),
    "imnet ReLU subclass": (lambda f, c, ce, m: (f, c, ce, nn.Sequential(
        m.layers[0], _LeakyReLU(), m.layers[2])), {},
        "_LeakyReLU at position 1 of the Sequential overrides ReLU.forward"),
    "imnet Linear with an instance forward": (lambda f, c, ce, m: (f, c, ce, nn.Sequential(
        m.layers[0], m.layers[1], _with_instance_forward(nn.Linear(8, 3), lambda x: 2 * x))), {},
        "Linear at position 2 of the Sequential overrides Linear.forward"),
    "imnet with an instance forward": (lambda f, c, ce, m: (f, c, ce, _with_instance_forward(
        nn.Sequential(*m.layers), torch.sigmoid)), {}, "Sequential defines its own forward"),
    "imnet MLP with an instance forward": (lambda f, c, ce, m: (f, c, ce, _with_instance_forward(
        make_mlp(31, [8], 3, torch.float32), torch.sigmoid)), {}, "MLP defines its own forward"),
    "imnet with its own call": (lambda f, c, ce, m: (f, c, ce, _CallsSigmoid(*m.layers)), {},
                                "_CallsSigmoid defines its own forward"),
    "imnet named MLP": (lambda f, c, ce, m: (f, c, ce, MLP(m)), {},
                        r"^imnet: MLP defines its own forward.*pass imnet.layers$"),
    "imnet subclass of a named MLP": (lambda f, c, ce, m: (f, c, ce, _SigmoidMLPSubclass(m)), {},
                                      "_SigmoidMLPSubclass defines its own forward"),
    "feat without channels": (lambda f, c, ce, m: (f[:, :0], c, ce, m), {},
                              "feat must have C, H, W >= 1"),
    "imnet pair": (lambda f, c, ce, m: (f, c, ce, [(torch.randn(3, 31),)]), {},
                   r"item 0 must be a \(weight, bias\) pair"),
    # A third item (an activation, say) would be dropped silently.
    "imnet triple": (lambda f, c, ce, m: (f, c, ce, [(torch.randn(3, 31), torch.randn(3), None)]),
                     {}, r"item 0 must be a \(weight, bias\) pair"),
    "feat without width": (lambda f, c, ce, m: (f[..., :0], c, ce, m), {},
                           "feat must have C, H, W >= 1"),
    # Checked before the dtypes are compared: under autocast integer cells would be converted.
    "cells integer": (lambda f, c, ce, m: (f, c, ce.long(), m), {},
                      "cells must be a floating-point tensor"),
    # The biases have messages of their own, not their layer's weight's.
    "bias integer": (lambda f, c, ce, m: (f, c, ce, [(torch.randn(8, 31), torch.arange(8)),
                                                     (torch.randn(3, 8), torch.randn(3))]), {},
                     "imnet layer 0 bias must be a floating-point tensor"),
    "half mixed bias": (lambda f, c, ce, m: (f.half(), c.half(), ce.half(),
                                             [(torch.randn(8, 31).half(), torch.randn(8)),
                                              (torch.randn(3, 8).half(), torch.randn(3).half())]),
                        {}, "imnet layer 0 bias must have feat's dtype torch.float16"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_value_error(name):
    make, flags, message = CASES[name]
    args = make(*good())
    with pytest.raises(ValueError, match=message):
        liif_cuda.query(*args, **flags)


RAW_CASES = {
    "feat rank": lambda f, c, ce, w, b: (f[0], c, ce, w, b),
    "coords shape": lambda f, c, ce, w, b: (f, c[..., :1], ce, w, b),
    "coords batch": lambda f, c, ce, w, b: (f, c[:1], ce, w, b),
    "cells queries": lambda f, c, ce, w, b: (f, c, ce[:, :2], w, b),
    "cells missing": lambda f, c, ce, w, b: (f, c, None, w, b),
    # cells are read at coords' (b, q): a smaller cells tensor would be read past its end.
    "cells batch": lambda f, c, ce, w, b: (f, c, ce[:1], w, b),
    "cells shape": lambda f, c, ce, w, b: (f, c, ce[..., :1], w, b),
    "cells dtype": lambda f, c, ce, w, b: (f, c, ce.double(), w, b),
    "dtype": lambda f, c, ce, w, b: (f, c.double(), ce, w, b),
    # float64 parameters read as float32 (or the reverse) would be read past their end.
    "weight dtype": lambda f, c, ce, w, b: (f, c, ce, [w[0].double()] + w[1:], b),
    "bias dtype": lambda f, c, ce, w, b: (f, c, ce, w, b[:-1] + [b[-1].double()]),
    "integer feat": lambda f, c, ce, w, b: (f.int(), c.int(), ce.int(), [x.int() for x in w],
                                            [x.int() for x in b]),
    "first layer": lambda f, c, ce, w, b: (f, c, ce, [w[0][:, 1:]] + w[1:], b),
    # A hidden layer narrower or wider than the one before reads past its input row.
    "layer chain": lambda f, c, ce, w, b: (f, c, ce, [w[0], w[1][:, 1:]], b),
    "weight rank": lambda f, c, ce, w, b: (f, c, ce, [w[0].flatten()] + w[1:], b),
    "bias": lambda f, c, ce, w, b: (f, c, ce, w, [b[0][1:]] + b[1:]),
    "count": lambda f, c, ce, w, b: (f, c, ce, w, b[:1]),
    "no layers": lambda f, c, ce, w, b: (f, c, ce, [], []),
}


@pytest.mark.parametrize("name", sorted(RAW_CASES))
def test_raw_operator_checks_its_arguments(name):
    """torch.ops.liif_cuda.query called directly (no wrapper) still fails cleanly, never reads out
    of bounds."""
    feat, coords, cells, mlp = good()
    weights, biases = liif_cuda.mlp_parameters(mlp)
    args = RAW_CASES[name](feat, coords, cells, [w.detach() for w in weights],
                           [b.detach() for b in biases])
    with pytest.raises(RuntimeError, match="liif_cuda.query"):
        torch.ops.liif_cuda.query(*args, True, True, True)


def test_meta_tensors_give_the_output_shape():
    """Everything on the meta device (shape inference without data): the operator's fake kernel
    answers; a meta feat with CPU coordinates is the device mismatch it is."""
    feat, coords, cells, mlp = good()
    meta = [t.to("meta") for t in (feat, coords, cells)]
    out = liif_cuda.query(*meta, mlp.to("meta"))
    assert out.device.type == "meta" and out.shape == (2, 6, 3)
    with pytest.raises(ValueError, match="coords must be on feat's device"):
        liif_cuda.query(meta[0], coords, cells, mlp)


def test_fake_kernel_follows_batch_out_dim_and_dtype():
    """The fake (meta) kernel is what torch.compile and torch.export plan with: its output must be
    (B, Q, out_dim) in feat's dtype for any B, out_dim and float64 too, not only for the published
    out_dim = 3 in float32. The raw operator is asked too: the wrapper's final cast to the result
    dtype would hide a fake of the wrong dtype."""
    feat = torch.randn(3, 2, 4, 5, dtype=torch.float64, device="meta")
    coords = torch.empty(3, 7, 2, dtype=torch.float64, device="meta")
    mlp = make_mlp(2 * 9 + 4, [8], 2, torch.float64).to("meta")
    out = liif_cuda.query(feat, coords, coords, mlp)
    assert out.shape == (3, 7, 2) and out.dtype == torch.float64
    weights, biases = liif_cuda.mlp_parameters(mlp)
    for op in (torch.ops.liif_cuda.query, torch.ops.liif_cuda.query_saving_map):
        raw = op(feat, coords, coords, weights, biases, True, True, True)
        raw = raw[0] if isinstance(raw, tuple) else raw
        assert raw.shape == (3, 7, 2) and raw.dtype == torch.float64 and raw.device.type == "meta"
