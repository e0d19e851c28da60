"""Reading the MLP ("imnet") of a LIIF model into per-layer weights and biases for the fused op."""

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


def mlp_parameters(imnet):
    """(weights, biases) of an MLP given as the original code and mmediting build it.

    Accepted: an `nn.Sequential` of `Linear, ReLU, ..., Linear`; a module holding that Sequential as
    `.layers` (LIIF's `MLP`, mmediting's `MLPRefiner`); or a sequence of `(weight, bias)` pairs with
    weights shaped (out, in). A missing bias (`bias=False` or None) counts as zeros.
    """
    if isinstance(imnet, nn.Sequential):
        weights, biases = _sequential_parameters(imnet)
    elif isinstance(imnet, nn.Module) and isinstance(getattr(imnet, "layers", None), nn.Sequential):
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
