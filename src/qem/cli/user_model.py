"""The user's model at the command line: built from ``module:factory`` (the module found as
``python -m`` finds it) or loaded from a torch.export ``.pt2`` file (qem.model_files), probed on
public rows before any private data is read, and written back as a ``.pt2``.

An exported program is a fixed graph: torch refuses ``train()``/``eval()`` on it, since the
flags no longer change what it computes. qem therefore checks that the graph was exported in
eval mode (no op run with ``training=True``, no write to a parameter or buffer) and then lets
the flags be flipped, which is all that qem's own eval-mode passes do.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from qem.errors import DataError, InvalidParameterError, UnsupportedModelError
from qem.model_calls import eval_mode
from qem.model_files import load_exported_model

EXPORT_RECIPE = (
    "model.eval(); torch.export.save(torch.export.export(model, (x,), "
    "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'm.pt2') with x a batch of at least "
    "2 inputs"
)
"""How to write a ``.pt2`` that qem can fine-tune: eval mode, any batch size."""

PROBE_ROWS = (2, 3)
"""Batch sizes of the public probe: a program exported with a fixed batch fails one of them."""

TRAINING_ARGUMENTS = ("train", "training")
"""Names of the operator arguments that switch train-mode behaviour (dropout, batch norm)."""


def load_model(spec: str, state_dict: str | None = None) -> nn.Module:
    """Build the model from ``module:factory`` or a torch.export ``.pt2`` file; refuse a
    TorchScript file with the recipe to export it."""
    if spec.endswith(".pt2"):
        if not Path(spec).is_file():
            raise DataError(f"model file {spec} does not exist.")
        model = usable_exported_module(load_exported_model(spec), spec)
    elif ":" in spec:
        with current_directory_importable():
            model = import_factory(spec)()
    elif Path(spec).is_file():
        raise UnsupportedModelError(
            f"{spec}: TorchScript models cannot be differentiated per example with torch.func. "
            f"Export the model instead: {EXPORT_RECIPE}; or pass module:factory with "
            "--state-dict."
        )
    else:
        raise InvalidParameterError(
            f"--model must be module:factory or an existing .pt2 file, got {spec!r}."
        )
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"{spec} did not give a torch.nn.Module.")
    if state_dict:
        model.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
    return model


@contextlib.contextmanager
def current_directory_importable() -> Iterator[None]:
    """Put the current directory first on sys.path for the duration, as ``python -m`` does."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def import_factory(spec: str):
    """The callable ``factory`` of ``module:factory``; the error says how to make the module
    importable."""
    module_name, _, factory_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        top = module_name.split(".")[0]
        if error.name is not None and (module_name + ".").startswith(error.name + "."):
            raise InvalidParameterError(
                f"--model {spec}: module {module_name!r} not found in the current directory "
                f"({os.getcwd()}) or on PYTHONPATH; run qem from the directory holding {top}.py "
                f"(or the package {top}/), or set PYTHONPATH to that directory."
            ) from None
        raise InvalidParameterError(
            f"--model {spec}: importing {module_name} failed: {error}"
        ) from error
    except ImportError as error:
        raise InvalidParameterError(
            f"--model {spec}: importing {module_name} failed: {error}"
        ) from error
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise InvalidParameterError(
            f"--model {spec}: module {module_name} ({module.__file__}) has no callable "
            f"{factory_name!r}."
        )
    return factory


def usable_exported_module(module: nn.Module, where: str) -> nn.Module:
    """``module`` (a torch.export program's ``.module()``) once its graph is known to run in
    eval mode, with torch's refusal of ``train()``/``eval()`` lifted (see the module
    docstring): qem flips the flags for its passes, a no-op on the fixed graph."""
    for graph_module in module.modules():
        if isinstance(graph_module, torch.fx.GraphModule):
            for node in graph_module.graph.nodes:
                _check_eval_mode_node(node, where)
    for method in ("train", "eval"):
        module.__dict__.pop(method, None)
    return module


def _check_eval_mode_node(node: torch.fx.Node, where: str) -> None:
    """Refuse an operator run in train mode or writing to a parameter or buffer."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return
    for index, argument in enumerate(node.target._schema.arguments):
        value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
        written = argument.alias_info is not None and argument.alias_info.is_write
        if (argument.name in TRAINING_ARGUMENTS and value is True) or (
            written and isinstance(value, torch.fx.Node) and value.op == "get_attr"
        ):
            raise UnsupportedModelError(
                f"{where} was exported in train mode ({node.target} "
                f"{'runs with ' + argument.name + '=True' if not written else 'writes a buffer'}"
                "): its forward pass would update buffers or drop units on private data. "
                f"Export it in eval mode: {EXPORT_RECIPE}."
            )


def probe_public(model: nn.Module, inputs: torch.Tensor, spec: str) -> None:
    """Run ``model`` in eval mode on the first 2 and the first 3 PUBLIC inputs, before any
    private data is read: a program exported with a fixed batch size, or a model that does not
    take these inputs, gets a qem error here rather than halfway through a run."""
    reference = next(iter(model.parameters()), None)
    if reference is not None and inputs.is_floating_point():
        inputs = inputs.to(reference.dtype)
    with eval_mode(model), torch.no_grad():
        for rows in sorted({min(n, len(inputs)) for n in PROBE_ROWS}):
            try:
                model(inputs[:rows])
            except Exception as error:  # guard failures and shape errors have many types
                cause = f"{type(error).__name__}: {error}".strip()
                if spec.endswith(".pt2"):
                    raise UnsupportedModelError(
                        f"{spec} fails on a public batch of {rows} rows ({cause}): it was "
                        "probably exported with a fixed batch size; re-export it with a dynamic "
                        f"batch dimension: {EXPORT_RECIPE}."
                    ) from None
                raise UnsupportedModelError(
                    f"--model {spec} fails on a public batch of {rows} rows of shape "
                    f"{tuple(inputs[:rows].shape)} ({cause})."
                ) from None


def export_program(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Write ``model`` as a torch.export ``.pt2`` with a dynamic batch dimension, traced on
    ``example`` (public inputs, at least 2 rows), atomically (a temporary file renamed)."""
    reference = next(iter(model.parameters()), None)
    if reference is not None and example.is_floating_point():
        example = example.to(reference.dtype)
    with eval_mode(model):
        program = torch.export.export(
            model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)
        )
    staging = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        torch.export.save(program, staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path
