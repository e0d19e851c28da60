"""The public API's surface: what `liif_cuda.__all__` names exists, its annotations resolve (for
type checkers and tools that read them at run time), and the package says it is typed (PEP 561)."""

import os
import typing

import liif_cuda


def test_all_names_exist():
    assert all(hasattr(liif_cuda, name) for name in liif_cuda.__all__)


def test_annotations_resolve():
    functions = [getattr(liif_cuda, name) for name in liif_cuda.__all__
                 if callable(getattr(liif_cuda, name)) and not isinstance(getattr(liif_cuda, name),
                                                                          type)]
    assert {f.__name__ for f in functions} >= {"query", "mlp_parameters", "build_info",
                                               "load_model", "patch", "upscale"}
    for f in functions:
        hints = typing.get_type_hints(f)
        assert "return" in hints, f.__name__


def test_package_is_marked_typed():
    assert os.path.isfile(os.path.join(os.path.dirname(liif_cuda.__file__), "py.typed"))
