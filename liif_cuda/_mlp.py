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
        if expect_linear:
            weights.append(m.weight)
            biases.append(m.bias)
    if not modules or not isinstance(modules[-1], nn.Linear):
        raise ValueError("imnet: the Sequential must end with an nn.Linear (no output activation)")
    return weights, biases


# The classes whose forward is only `layers` applied to the last dimension: LIIF's MLP (the original
# code's and liif_cuda.models'), mmediting's and mmagic's MLPRefiner; subclasses that keep their
# forward count as them.
_LAYERS_ONLY_CLASSES = ("MLP", "MLPRefiner")


def _check_forward_is_layers(imnet):
    """The fused op computes the Linear/ReLU layers and nothing else: a module whose own forward does
    more (an output activation, a residual) would be answered silently wrong. (The class that
    defines forward is found through the MRO, which torch.compile can trace.)"""
    owner = next(c for c in type(imnet).__mro__ if "forward" in c.__dict__)
    if owner is nn.Sequential or owner is nn.Module or (
            not isinstance(imnet, nn.Sequential) and owner.__name__ in _LAYERS_ONLY_CLASSES):
        return
    raise ValueError(
        f"imnet: {type(imnet).__name__} defines its own forward, which the fused query cannot "
        f"run (it computes only the Linear/ReLU layers); accepted are an nn.Sequential, LIIF's "
        f"MLP and mmediting's MLPRefiner. If its forward only applies the layers, pass "
        f"{'nn.Sequential(*imnet)' if isinstance(imnet, nn.Sequential) else 'imnet.layers'}")


def mlp_parameters(imnet) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(weights, biases) of an MLP given as the original code and mmediting build it.

    Accepted: an `nn.Sequential` of `Linear, ReLU, ..., Linear`; a module holding that Sequential as
    `.layers` (LIIF's `MLP`, mmediting's `MLPRefiner`; another class, whose forward may do more than
    the layers, is refused); or a sequence of `(weight, bias)` pairs with weights shaped (out, in).
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
