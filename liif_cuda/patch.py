"""patch(model): run an existing LIIF model's query through the fused operator, in place."""

from __future__ import annotations

import functools
import inspect
from typing import TypeVar

import torch

from ._mlp import mlp_parameters
from ._query import QUERY_FLAGS, _autocast_dtype, query

# query_rgb's first parameter in mmediting / mmagic, which pass the features; the original code's
# query_rgb(coord, cell=None) reads them from self.feat (set by gen_feat).
_FEATURE_PARAMETERS = ("feature", "feat", "x")


def _flags(model):
    return {f: bool(getattr(model, f)) for f in QUERY_FLAGS}  # read at every call


def _fused(model, feature, coord, cell):
    # Under autocast the original query_rgb returns float32 (its blend multiplies the MLP's
    # half-precision predictions by float32 areas), where the operator returns the autocast dtype.
    autocast = _autocast_dtype(feature) is not None
    return query(feature, coord, cell, model.imnet, out_dtype=torch.float32 if autocast else None,
                 **_flags(model))


def _query_rgb_with_features(self, feature, coord, cell=None):
    """query_rgb through liif_cuda.query (installed by liif_cuda.patch)"""
    return _fused(self, feature, coord, cell)


def _query_rgb_from_feat(self, coord, cell=None):
    """query_rgb through liif_cuda.query (installed by liif_cuda.patch)"""
    return _fused(self, self.feat, coord, cell)


def _new_patched(base):
    """Unpickling and deepcopy of a patched model: an empty instance of its patched class, filled by
    the model's __setstate__ afterwards."""
    cls = _patched_class(base)
    return cls.__new__(cls)


def _reduce_ex(self, protocol):
    # The patched class is made at run time and cannot be found by name: a patched model pickles as
    # its own class's instance that is patched again when loaded (torch.save(model), deepcopy).
    state = self.__getstate__() if hasattr(self, "__getstate__") else self.__dict__
    return _new_patched, (type(self).__bases__[0],), state


@functools.lru_cache(maxsize=None)
def _patched_class(base):
    """The subclass of a LIIF model class whose query_rgb is the fused one, one per class.

    A method of the class, not a closure stored on the instance: copies (copy.deepcopy,
    nn.DataParallel's replicas, pickling) then query their own features and MLP."""
    params = list(inspect.signature(base.query_rgb).parameters)[1:]  # after self
    fused = (_query_rgb_with_features if params and params[0] in _FEATURE_PARAMETERS
             else _query_rgb_from_feat)
    # Same names as the model's class, so that repr, errors and state_dict look as before.
    return type(base.__name__, (base,), {
        "query_rgb": fused, "__reduce_ex__": _reduce_ex, "__module__": base.__module__,
        "__qualname__": base.__qualname__, "_liif_cuda_patched": True})


Model = TypeVar("Model", bound=torch.nn.Module)


def patch(model: Model) -> Model:
    """Makes `model.query_rgb` the fused query and returns the model (the same object).

    Works with LIIF models of the original code (`query_rgb(coord, cell=None)` on `model.feat` set by
    `gen_feat`) and of mmediting / mmagic (`query_rgb(feature, coord, cell=None)`; their restorer or
    editor, which holds the net as `.generator`, has the generator patched): anything with their
    `query_rgb`, an `imnet` MLP and the flags local_ensemble, feat_unfold and cell_decode, which are read
    at every call. Outputs stay equal to the unpatched model's within float32 rounding.

    The model's class becomes a subclass of its class (same name) whose `query_rgb` is the fused
    one, so `isinstance` still holds and the state_dict is unchanged; copies (`copy.deepcopy`,
    `nn.DataParallel`) stay patched, and so does a pickled model (`torch.save(model)`) when loaded.
    """
    query_rgb = getattr(model, "query_rgb", None)
    generator = getattr(model, "generator", None)
    if not callable(query_rgb) and callable(getattr(generator, "query_rgb", None)):
        # mmediting's restorer / mmagic's editor (named LIIF too) holds the LIIF net as .generator.
        patch(generator)
        return model
    if not callable(query_rgb):
        inner = getattr(model, "module", None)  # DataParallel, DistributedDataParallel
        hint = (" (it wraps a LIIF model as .module: patch(model.module), or patch before "
                "wrapping)" if callable(getattr(inner, "query_rgb", None)) else "")
        raise TypeError(f"{type(model).__name__} has no query_rgb method: not a LIIF model{hint}")
    if getattr(model, "imnet", None) is None:
        raise TypeError(f"{type(model).__name__}.imnet is missing or None: nothing to fuse (a LIIF "
                        f"without MLP only samples its features)")
    try:  # an MLP the fused op cannot compute is named now, not at the first query
        mlp_parameters(model.imnet)
    except ValueError as exc:
        raise TypeError(f"{type(model).__name__}.{exc}") from None
    missing = [f for f in QUERY_FLAGS if not hasattr(model, f)]
    if missing:
        raise TypeError(f"{type(model).__name__} lacks the LIIF flags {missing}")
    if getattr(type(model), "_liif_cuda_patched", False):
        return model
    if "query_rgb" in vars(model):
        raise TypeError(f"{type(model).__name__} has query_rgb set on the instance, which a patch of "
                        f"its class would not replace")
    model.__class__ = _patched_class(type(model))
    return model
