"""patch(model): run an existing LIIF model's query through the fused operator, in place."""

import inspect

from ._query import query

_FLAGS = ("local_ensemble", "feat_unfold", "cell_decode")


def patch(model):
    """Replaces `model.query_rgb` with the fused query and returns the model.

    Works with LIIF models of the original code (`query_rgb(coord, cell=None)` on `model.feat` set by
    `gen_feat`) and of mmediting / mmagic (`query_rgb(feature, coord, cell=None)`): anything with their
    `query_rgb`, an `imnet` MLP and the flags local_ensemble, feat_unfold and cell_decode, which are read
    at every call. Outputs stay equal to the unpatched model's within float32 rounding.
    """
    query_rgb = getattr(model, "query_rgb", None)
    if not callable(query_rgb):
        raise TypeError(f"{type(model).__name__} has no query_rgb method: not a LIIF model")
    if getattr(model, "imnet", None) is None:
        raise TypeError(f"{type(model).__name__}.imnet is missing or None: nothing to fuse (a LIIF "
                        f"without MLP only samples its features)")
    missing = [f for f in _FLAGS if not hasattr(model, f)]
    if missing:
        raise TypeError(f"{type(model).__name__} lacks the LIIF flags {missing}")
    if getattr(model, "_liif_cuda_patched", False):
        return model

    def flags():
        return {f: bool(getattr(model, f)) for f in _FLAGS}

    params = list(inspect.signature(query_rgb).parameters)
    if params and params[0] in ("feature", "feat", "x"):
        def fused_query_rgb(feature, coord, cell=None):
            return query(feature, coord, cell, model.imnet, **flags())
    else:
        def fused_query_rgb(coord, cell=None):
            return query(model.feat, coord, cell, model.imnet, **flags())

    fused_query_rgb.__doc__ = "query_rgb through liif_cuda.query (installed by liif_cuda.patch)"
    model.query_rgb = fused_query_rgb
    model._liif_cuda_patched = True
    return model
