"""Load a user's model file without running code the file brings.

A ``.pt2`` archive from ``torch.export.save`` is a zip of JSON (the program), raw tensor bytes
and one pickle. ``torch.export.load`` runs code from a crafted archive in several ways, all
before or while the model first runs:

* pickles: payloads marked ``use_pickle``, constants that are custom or opaque objects, and
  legacy weight files go through ``torch.load(weights_only=False)`` or ``pickle.loads``; the
  sample inputs are retried with ``weights_only=False`` when the safe load fails;
* ``data/aotinductor/``: compiled shared libraries, loaded as native code;
* symbolic shapes: every ``expr_str`` of the program is parsed by ``sympy.sympify``, which
  evaluates the string as Python;
* guards: ``guards_code`` strings are pasted into Python source that ``.module()`` executes in a
  namespace holding ``torch`` and ``math``;
* the graph: a node target or operator argument resolves to any attribute of ``torch``,
  ``math`` or ``operator`` (e.g. ``torch.os.system``) and is called by ``forward``; names
  (parameter, buffer, argument names) are pasted into the generated ``forward`` source.

:func:`load_exported_model` reads the file once, checks the archive with
:func:`check_export_archive` and hands torch the checked bytes. The check admits what
``torch.export.save`` writes for a program of tensor operators (torch 2.13, archive version 0):
members from a fixed list under one root folder; weights and constants stored as raw bytes
(no ``use_pickle``, no object constants); sample inputs that load with
``torch.load(weights_only=True)``; symbolic expressions made only of sympy's constructors,
numbers and quoted plain names; guards made only of input sizes, arithmetic and comparisons;
node targets that are registered operators (``torch.ops``), higher-order operators or the
symbolic-size operators; names of plain characters. Anything else raises
UnsupportedModelError and nothing is loaded.
"""

from __future__ import annotations

import io
import json
import math
import operator
import re
import tokenize
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.utils._sympy.functions as torch_sympy_functions
from torch import nn
from torch._export.serde.serialize import _SYM_OPS  # the symbolic-size ops torch deserialises
from torch.export.pt2_archive import PT2ArchiveReader
from torch.export.pt2_archive import constants as pt2

from qem.errors import DataError, UnsupportedModelError

__all__ = ["check_export_archive", "load_exported_model"]

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_QUOTED_PLAIN = re.compile(r"""(['"])[A-Za-z0-9_.+\-]*\1""")
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
# Program fields whose strings become names or attribute paths in generated code.
_NAME_FIELDS = frozenset(
    {
        "name",
        "as_name",
        "parameter_name",
        "buffer_name",
        "tensor_constant_name",
        "custom_obj_name",
        "user_input_name",
        "fqn",
        "class_fqn",
    }
)
_NAME_LIST_FIELDS = frozenset({"forward_arg_names", "field_names", "input_names", "output_names"})
_NAME_KEYED_FIELDS = frozenset(
    {
        "tensor_values",
        "sym_int_values",
        "sym_bool_values",
        "sym_float_values",
        "custom_obj_values",
        "range_constraints",
    }
)
# sympy's srepr constructors and the assumptions torch gives shape symbols.
# fmt: off
_SYMPY_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod",
    "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
    "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
    "Piecewise", "ExprCondPair", "BooleanTrue", "BooleanFalse", "true", "false", "oo",
    "Infinity", "NegativeInfinity", "True", "False", "precision", "positive", "negative",
    "nonnegative", "nonpositive", "integer", "real", "finite",
}) | frozenset(torch_sympy_functions.__all__)
_GUARD_NAMES = frozenset({"L", "and", "or", "not", "True", "False", "math", "torch"})
_GUARD_ATTRIBUTES = frozenset({
    "size", "stride", "storage_offset", "floor", "ceil", "trunc", "sym_max", "sym_min",
    "sym_float", "sym_int", "sym_not", "sym_ite",
})
_OPERATORS = frozenset({
    "(", ")", "[", "]", ",", ".", "=", "+", "-", "*", "/", "//", "%", "**", "<", ">", "<=", ">=",
    "==", "!=", "&", "|", "~",
})
# fmt: on


def load_exported_model(path: str | Path) -> nn.Module:
    """The ``nn.Module`` of a torch.export ``.pt2`` file, loaded only after
    :func:`check_export_archive` accepted it (see the module docstring)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read model file {path}: {error}") from error
    check_export_archive(data, str(path))
    try:
        return torch.export.load(io.BytesIO(data)).module()
    except Exception as error:  # torch's own errors for a checked but unloadable program
        raise UnsupportedModelError(f"{path}: torch.export cannot load it: {error}") from error


def check_export_archive(data: bytes, where: str = "model file") -> None:
    """Raise UnsupportedModelError unless ``data`` is a ``.pt2`` archive that loads without
    running code it brings (the rules are in the module docstring)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            listed = archive.namelist()
        reader = PT2ArchiveReader(io.BytesIO(data))
        members = set(reader.get_file_names())
    except Exception as error:  # zipfile and torch's reader raise several types
        raise UnsupportedModelError(
            f"{where} is not a torch.export archive ({error}); save the model with "
            "torch.export.save(torch.export.export(model, (x,)), 'm.pt2')."
        ) from None
    roots = {name.split("/", 1)[0] for name in listed}
    if len(listed) != len(set(listed)) or len(roots) != 1 or not all("/" in n for n in listed):
        _refuse(where, "its zip members are duplicated or not under one folder")
    if {name.split("/", 1)[1] for name in listed if "/" in name} != members:
        _refuse(where, "zip readers disagree on its members")
    if _read(reader, pt2.ARCHIVE_VERSION_PATH, where).decode() != pt2.ARCHIVE_VERSION_VALUE:
        _refuse(where, "its archive version is not the one this torch writes")
    allowed = {pt2.ARCHIVE_FORMAT_PATH, pt2.ARCHIVE_VERSION_PATH, "byteorder"}
    models = [m for m in members if m.startswith(pt2.MODELS_DIR) and m.endswith(".json")]
    if pt2.MODELS_FILENAME_FORMAT.format("model") not in models:
        _refuse(where, "it holds no program models/model.json")
    for model in models:
        name = model[len(pt2.MODELS_DIR) : -len(".json")]
        try:
            allowed |= _check_program(reader, name, where)
        except UnsupportedModelError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # malformed JSON
            _refuse(where, f"its program {name!r} is malformed ({error!r})")
    unexpected = sorted(
        m for m in members - allowed if not (m.startswith(".data/") or m.startswith(pt2.EXTRA_DIR))
    )
    if unexpected:
        _refuse(where, f"it holds members qem does not load: {unexpected[:5]}")


def _check_program(reader: PT2ArchiveReader, name: str, where: str) -> set[str]:
    """Check one program's JSON, payload configs and sample inputs; return its members.
    Malformed JSON surfaces as ValueError, KeyError, TypeError or AttributeError."""
    program_file = pt2.MODELS_FILENAME_FORMAT.format(name)
    weights_file = pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(name)
    constants_file = pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(name)
    inputs_file = pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(name)
    members = {program_file, weights_file, constants_file, inputs_file}
    program = json.loads(_read(reader, program_file, where))
    payloads = {
        pt2.WEIGHTS_DIR: json.loads(_read(reader, weights_file, where))["config"],
        pt2.CONSTANTS_DIR: json.loads(_read(reader, constants_file, where))["config"],
    }
    sample_inputs = _read(reader, inputs_file, where)
    for directory, config in payloads.items():
        for fqn, meta in config.items():
            path_name = meta.get("path_name", "")
            tensor = directory == pt2.WEIGHTS_DIR or path_name.startswith(
                pt2.TENSOR_CONSTANT_FILENAME_PREFIX
            )
            if meta.get("use_pickle", True) or not tensor:
                _refuse(where, f"{fqn!r} is stored as a pickled object")
            _check_name(path_name, where)
            _check_name(fqn, where)
            members.add(directory + path_name)
    if sample_inputs:
        try:
            torch.load(io.BytesIO(sample_inputs), weights_only=True)
        except Exception as error:  # torch.load's restricted unpickler refuses with several
            _refuse(where, f"its sample inputs are not plain tensors ({error})")
    for guard in program.get("guards_code", []):
        _check_expression(guard, _GUARD_NAMES, _GUARD_ATTRIBUTES, where)
    for key, value in _fields(program):
        if key == "expr_str":
            _check_expression(value, _SYMPY_NAMES, frozenset(), where, symbols=True)
        elif key in ("target", "as_operator"):
            _check_operator(value, where)
        elif key in _NAME_FIELDS:
            _check_name(value, where)
        elif key in _NAME_LIST_FIELDS:
            for item in value or []:
                _check_name(item, where)
        elif key in _NAME_KEYED_FIELDS:
            for item in value:
                _check_name(item, where)
    return members


def _read(reader: PT2ArchiveReader, member: str, where: str) -> bytes:
    try:
        return reader.read_bytes(member)
    except Exception as error:  # torch's reader raises RuntimeError for a missing member
        raise UnsupportedModelError(f"{where}: cannot read its member {member}: {error}") from None


def _fields(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of every JSON object nested in ``value``."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from _fields(item)
    elif isinstance(value, list):
        for item in value:
            yield from _fields(item)


def _check_name(value: Any, where: str) -> None:
    """Accept None (an optional name) or letters, digits, _ and dots between them."""
    if value is not None and not (isinstance(value, str) and _PLAIN_NAME.fullmatch(value)):
        _refuse(where, f"the name {value!r} has characters other than letters, digits, _ and .")


def _check_operator(value: Any, where: str) -> None:
    """Resolve ``value`` as torch's deserialiser does; accept only registered operators,
    higher-order operators and the symbolic-size operators."""
    roots = {"_operator": operator, "torch": torch, "math": math}
    head, *path = value.split(".") if isinstance(value, str) else ("",)
    target = roots.get(head)
    for attribute in path:
        target = getattr(target, attribute, None)
    allowed = (torch._ops.OpOverload, torch._ops.HigherOrderOperator)
    if not (isinstance(target, allowed) or any(target is op for op in _SYM_OPS)):
        _refuse(where, f"its graph calls {value!r}, which is not a torch operator")


def _check_expression(
    text: Any,
    names: frozenset[str],
    attributes: frozenset[str],
    where: str,
    symbols: bool = False,
) -> None:
    """Accept one line of Python made of numbers, quoted plain names, the operators in
    ``_OPERATORS``, the ``names`` (and, if ``symbols``, shape symbols such as ``s0``) and, after
    a dot, the ``attributes``; nothing else reaches ``eval``/``exec``."""
    if not isinstance(text, str) or "\n" in text or "\r" in text:
        _refuse(where, f"the expression {text!r} is not one line of text")
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        _refuse(where, f"the expression {text!r} does not parse")
    previous = ""
    for token in tokens:
        kind, string = token.type, token.string
        if kind in (tokenize.NEWLINE, tokenize.ENDMARKER) and not string.strip():
            continue
        if kind == tokenize.NAME:
            known = attributes if previous == "." else names
            ok = string in known or (symbols and previous != "." and _SYMBOL.fullmatch(string))
        elif kind == tokenize.OP:
            ok = string in _OPERATORS
        else:
            ok = kind == tokenize.NUMBER or (
                kind == tokenize.STRING and _QUOTED_PLAIN.fullmatch(string) is not None
            )
        if not ok:
            _refuse(where, f"the expression {text!r} contains {string!r}")
        previous = string


def _refuse(where: str, why: str) -> None:
    raise UnsupportedModelError(
        f"{where}: qem refuses this torch.export archive because {why}; loading it could run "
        "code it carries. Re-export a plain model with torch.export.save(torch.export.export("
        "model, (x,)), 'm.pt2')."
    )
