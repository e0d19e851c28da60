"""Reading the MLP ("imnet") of a LIIF model into per-layer weights and biases for the fused op."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def _sequential_parameters(seq):
    modules = list(seq)
    weights, biases = [], []
    for i, m in enumerate(modules):
        expect_linear = i % 2 == 0
        if expect_linear and not isinstance(m, nn.Linear):
            raise ValueError(
                f"imnet: expected nn.Linear at position {i} of the Sequential "
                f"(Linear and ReLU alternating), got {type(m).__name__}")
        if not expect_linear and not isinstance(m, nn.ReLU):
            raise ValueError(
                f"imnet: expected nn.ReLU at position {i} of the Sequential "
                f"(Linear and ReLU alternating), got {type(m).__name__}")
        base = nn.Linear if expect_linear else nn.ReLU
        if type(m).forward is not base.forward or "forward" in vars(m):
            # A subclass computing something else (a LoRA-style Linear, say): the fused op reads
            # .weight and .bias only, and would leave it out silently.
            raise ValueError(
                f"imnet: {type(m).__name__} at position {i} of the Sequential overrides "
                f"{base.__name__}.forward, which the fused query cannot run (it reads only the "
                f"layers' weight and bias)")
        if expect_linear:
            weights.append(m.weight)
            biases.append(m.bias)
    if not modules or not isinstance(modules[-1], nn.Linear):
        raise ValueError("imnet: the Sequential must end with an nn.Linear (no output activation)")
    return weights, biases


# The forwards that apply `layers` to the last dimension and do nothing else, as LIIF's MLP (the
# original code's), mmediting's and mmagic's MLPRefiner and liif_cuda.models' MLP write them. A
# module's own forward is accepted when its code is one of these, whatever its class is named:
# forks of LIIF keep the name MLP for forwards that do more (an output activation), which the
# fused op would silently leave out.
def _forward_in_three_lines(self, x):
    shape = x.shape[:-1]
    x = self.layers(x.view(-1, x.shape[-1]))
    return x.view(*shape, -1)


def _forward_in_two_lines(self, x):
    shape = x.shape[:-1]
    return self.layers(x.view(-1, x.shape[-1])).view(*shape, -1)


# The same with a docstring (mmediting's has one), which moves the constants' indices in the code.
def _documented_forward_in_three_lines(self, x):
    """A docstring."""
    shape = x.shape[:-1]
    x = self.layers(x.view(-1, x.shape[-1]))
    return x.view(*shape, -1)


def _documented_forward_in_two_lines(self, x):
    """A docstring."""
    shape = x.shape[:-1]
    return self.layers(x.view(-1, x.shape[-1])).view(*shape, -1)


def _code_key(code):
    """What makes two functions' code the same computation: the bytecode, the names and variables
    it uses and its constants but a docstring's text."""
    return (code.co_code, code.co_names, code.co_varnames,
            tuple(c for c in code.co_consts if not isinstance(c, str)))


_LAYERS_ONLY_FORWARDS = frozenset(
    _code_key(f.__code__) for f in (_forward_in_three_lines, _forward_in_two_lines,
                                    _documented_forward_in_three_lines,
                                    _documented_forward_in_two_lines))


def _check_forward_is_layers(imnet):
    """The fused op computes the Linear/ReLU layers and nothing else: a module whose own forward does
    more (an output activation, a residual) would be answered silently wrong. (The class that
    defines forward is found through the MRO, which torch.compile can trace.)"""
    owner = next(c for c in type(imnet).__mro__ if "forward" in c.__dict__)
    # A forward set on the instance (as hooks and patchers do) or a __call__ of its own runs
    # instead of the class's forward.
    replaced = "forward" in vars(imnet) or type(imnet).__call__ is not nn.Module.__call__
    if not replaced and (owner is nn.Sequential or owner is nn.Module):
        return
    forward = owner.__dict__["forward"]
    if (not replaced and not isinstance(imnet, nn.Sequential) and hasattr(forward, "__code__")
            and _code_key(forward.__code__) in _LAYERS_ONLY_FORWARDS):
        return
    raise ValueError(
        f"imnet: {type(imnet).__name__} defines its own forward, which the fused query cannot "
        f"run (it computes only the Linear/ReLU layers); accepted are an nn.Sequential and modules "
        f"whose forward is LIIF's MLP's or mmediting's MLPRefiner's. If its forward only applies "
        f"the layers, pass "
        f"{'nn.Sequential(*imnet)' if isinstance(imnet, nn.Sequential) else 'imnet.layers'}")


def mlp_parameters(imnet) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(weights, biases) of an MLP given as the original code and mmediting build it.

    Accepted: an `nn.Sequential` of `Linear, ReLU, ..., Linear`; a module holding that Sequential as
    `.layers` whose forward is LIIF's `MLP`'s or mmediting's `MLPRefiner`'s (another forward, which
    may do more than the layers, is refused); or a sequence of `(weight, bias)` pairs with weights
    shaped (out, in).
    A missing bias (`bias=False` or None) counts as zeros.
    """
    if isinstance(imnet, nn.Sequential):
        _check_forward_is_layers(imnet)
        weights, biases = _sequential_parameters(imnet)
    elif isinstance(imnet, nn.Module) and isinstance(getattr(imnet, "layers", None), nn.Sequential):
        _check_forward_is_layers(imnet)
        weights, biases = _sequential_parameters(imnet.layers)
    elif isinstance(imnet, Sequence) and not isinstance(imnet, (str, bytes)):
        weights, biases = [], []
        for i, pair in enumerate(imnet):
            if not (isinstance(pair, Sequence) and len(pair) == 2
                    and isinstance(pair[0], torch.Tensor)
                    and (pair[1] is None or isinstance(pair[1], torch.Tensor))):
                raise ValueError(f"imnet: item {i} must be a (weight, bias) pair of tensors")
            weights.append(pair[0])
            biases.append(pair[1])
        if not weights:
            raise ValueError("imnet: the MLP needs at least one (weight, bias) layer")
    else:
        raise ValueError(
            "imnet: expected an nn.Sequential of Linear/ReLU, a module with such a `.layers`, or a "
            f"sequence of (weight, bias) pairs; got {type(imnet).__name__}")
    biases = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)]
    return weights, biases
