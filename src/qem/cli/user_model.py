"""The user's model at the command line: built from ``module:factory`` (the module found as
``python -m`` finds it; the same mechanism builds data sets, qem.cli.user_data) or loaded from a
torch.export ``.pt2`` file (qem.model_files), with pretrained weights from ``--state-dict``,
probed on public rows before any private data is read, and written back as a ``.pt2``.

An exported program is a fixed graph: torch refuses ``train()``/``eval()`` on it, since the
flags no longer change what it computes. qem therefore checks that the graph was exported in
eval mode (no op run with ``training=True``, no write to a parameter or buffer) and then lets
the flags be flipped, which is all that qem's own eval-mode passes do.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qem.cli.common import EXPORT_RECIPE
from qem.data import Inputs, batch_size_of, take_rows
from qem.errors import DataError, InvalidParameterError, UnsupportedModelError
from qem.io import read_state_dict
from qem.model_calls import call_model, eval_mode
from qem.model_files import load_exported_model

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
        model = call_factory(spec, "--model")
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
        load_weights(model, state_dict)
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Load the state dict file ``path`` (safetensors, or a torch ``.pt`` read with
    ``weights_only=True``) into ``model``; an unreadable file, or one whose tensors do not fit
    the model (missing, unexpected or differently shaped entries), raises DataError naming it."""
    if not Path(path).is_file():
        raise DataError(f"--state-dict {path} does not exist.")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if path.endswith(".safetensors"):
        state, _ = read_state_dict(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load of arbitrary bytes fails in many ways
            reason = (
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            )
            raise DataError(
                f"--state-dict {path} is not a readable state dict (torch.save of "
                f"model.state_dict(), or a .safetensors file; it begins with {head[:8]!r}): "
                f"{reason}"
            ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(
            f"--state-dict {path} holds a {type(state).__name__}, not a state dict of tensors "
            "(save model.state_dict())."
        )
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [
        f"{name} {tuple(state[name].shape)} (the model's is {tuple(expected[name].shape)})"
        for name in sorted(set(state) & set(expected))
        if state[name].shape != expected[name].shape
    ]
    problems = [
        *([f"missing {_listed(missing)}"] if missing else []),
        *([f"unexpected {_listed(unexpected)}"] if unexpected else []),
        *([f"shapes differ: {_listed(shapes)}"] if shapes else []),
    ]
    if problems:
        raise DataError(f"--state-dict {path} does not fit the model: {'; '.join(problems)}.")
    model.load_state_dict(state)


def _listed(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def call_factory(spec: str, option: str) -> Any:
    """What the callable of ``module:factory`` returns when called without arguments (the
    module importable from the current directory); a factory that needs arguments, or raises,
    gives a one-line error naming ``option`` and ``spec``."""
    with current_directory_importable():
        factory = import_factory(spec, option)
    required = _required_parameters(factory)
    if required:
        raise InvalidParameterError(
            f"{option} {spec}: the factory needs the arguments {', '.join(required)}, but qem "
            "calls it without any; give them defaults, or point to a function without "
            "parameters that calls it."
        )
    try:
        return factory()
    except Exception as error:  # the user's code: any error type
        raise InvalidParameterError(
            f"{option} {spec}: the factory raised {type(error).__name__}: {error}"
        ) from error


def _required_parameters(factory: Any) -> list[str]:
    """Parameters of ``factory`` without a default (none when its signature is unknown)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


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


def import_factory(spec: str, option: str = "--model"):
    """The callable ``factory`` of ``module:factory``; the error says how to make the module
    importable."""
    module_name, _, factory_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        top = module_name.split(".")[0]
        if error.name is not None and (module_name + ".").startswith(error.name + "."):
            raise InvalidParameterError(
                f"{option} {spec}: module {module_name!r} not found in the current directory "
                f"({os.getcwd()}) or on PYTHONPATH; run qem from the directory holding {top}.py "
                f"(or the package {top}/), or set PYTHONPATH to that directory."
            ) from None
        raise InvalidParameterError(
            f"{option} {spec}: importing {module_name} failed: {error}"
        ) from error
    except ImportError as error:
        raise InvalidParameterError(
            f"{option} {spec}: importing {module_name} failed: {error}"
        ) from error
    except Exception as error:  # the module's own code failed while it was imported
        raise InvalidParameterError(
            f"{option} {spec}: importing {module_name} raised {type(error).__name__}: {error}"
        ) from error
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise InvalidParameterError(
            f"{option} {spec}: module {module_name} ({module.__file__}) has no callable "
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


def probe_public(model: nn.Module, inputs: Inputs, spec: str) -> None:
    """Run ``model`` in eval mode on the first 2 and the first 3 PUBLIC inputs (a Tensor, or a
    dict of Tensors passed as keyword arguments), before any private data is read: a program
    exported with a fixed batch size, or a model that does not take these inputs, gets a qem
    error here rather than halfway through a run."""
    with eval_mode(model), torch.no_grad():
        for rows in sorted({min(n, batch_size_of(inputs)) for n in PROBE_ROWS}):
            batch = take_rows(inputs, slice(0, rows))
            try:
                call_model(model, batch)
            except Exception as error:  # guard failures and shape errors have many types
                cause = f"{type(error).__name__}: {error}".strip()
                if spec.endswith(".pt2"):
                    raise UnsupportedModelError(
                        f"{spec} fails on a public batch of {rows} rows ({cause}): it was "
                        "probably exported with a fixed batch size; re-export it with a dynamic "
                        f"batch dimension: {EXPORT_RECIPE}."
                    ) from None
                raise UnsupportedModelError(
                    f"--model {spec} fails on a public batch of {rows} rows of "
                    f"{_described(batch)} ({cause}){_dtype_hint(batch, cause)}."
                ) from None


def _described(batch: Inputs) -> str:
    """The shapes and dtypes of a batch's inputs, for an error message."""
    entries = [(key, t) for key, t in sorted(batch.items())] if isinstance(batch, dict) else []
    if not entries:
        return f"shape {tuple(batch.shape)} ({batch.dtype})"
    return ", ".join(f"{key} {tuple(t.shape)} ({t.dtype})" for key, t in entries)


def _dtype_hint(batch: Inputs, cause: str) -> str:
    """A hint when integer inputs reach a model that computes in floating point."""
    tensors = batch.values() if isinstance(batch, dict) else [batch]
    integer = any(not (t.is_floating_point() or t.dtype == torch.bool) for t in tensors)
    if integer and ("Long" in cause or "dtype" in cause):
        return (
            "; integer inputs stay integers: pass --scale-uint8 for image bytes (uint8), or "
            "store floating features as floats"
        )
    return ""


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
