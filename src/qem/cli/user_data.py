"""The user's data at the command line: a data file (qem.datasets.files: NPZ, IDX pair) or
``module:factory``, a callable (found as ``--model``'s is) returning anything ``qem.fine_tune``
accepts as data: (inputs, targets) tensors, a dict of tensors with "labels", a map-style
Dataset (a Hugging Face ``datasets.Dataset`` in torch format, say) or a DataLoader.

:func:`is_factory` needs no torch (the command checks that data files exist before importing
it); the readers import it when called."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from qem.data import DataLike, Inputs

FILE_SUFFIXES = (".npz",)


def is_factory(spec: str) -> bool:
    """Whether ``spec`` names ``module:factory`` rather than a data file (an NPZ, or an IDX
    pair given with a comma)."""
    return ":" in spec and "," not in spec and not spec.endswith(FILE_SUFFIXES)


def load_data(
    spec: str, option: str, *, float_dtype: torch.dtype, scale_uint8: bool, addressable: bool
) -> DataLike:
    """The data ``spec`` names, for the command-line option ``option`` (used in errors).
    Files are read with their conversions (qem.datasets.files); a factory's data is passed on
    as it returns it, once qem.data has checked its form (``addressable``: private data,
    which must be addressable by row)."""
    from qem.cli.user_model import call_factory
    from qem.data import as_dataset
    from qem.datasets.files import load_supervised_file

    if not is_factory(spec):
        return load_supervised_file(spec, float_dtype=float_dtype, scale_uint8=scale_uint8)
    data = call_factory(spec, option)
    as_dataset(data, f"{option} {spec}", addressable=addressable)  # its form, before any run
    return data


def first_inputs(data: DataLike, rows: int) -> Inputs:
    """The inputs of the first ``rows`` examples of ``data`` (public data: the model probe and
    the example of ``--export-pt2``)."""
    from qem.data import batches

    inputs, _ = next(iter(batches(data, rows, name="public data")))
    return inputs
