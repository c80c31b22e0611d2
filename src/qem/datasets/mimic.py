"""MIMIC-III ICU tasks from the MIMIC-Extract output ``all_hourly_data.h5`` (Wang et al., 2020,
"MIMIC-Extract"), which the user produces from their own credentialed copy of MIMIC-III; qem
never ships or downloads it. The tests use :mod:`qem.datasets.synthetic_mimic`.

Cohort (one row per subject), following MIMIC-Extract's benchmark notebook:

* the subject's FIRST ICU stay (earliest ``intime``; smallest icustay_id if ``intime`` is
  absent); a subject whose first stay fails a criterion below is excluded, later stays are not
  used instead;
* ``age > 15``;
* ICU stay longer than 36 hours: ``24 * los_icu > 36`` (``los_icu`` is in days);
* at least window + gap hours of hourly data: ``max_hours > 24 + 6`` (the benchmark's
  ``max_hours > WINDOW_SIZE + GAP_TIME``), so no outcome falls in the 6-hour gap after the
  24-hour window of inputs.

Tasks: ``mort_icu`` (death in the ICU) and ``los_3`` (``los_icu > 3`` days), both binary.

Inputs: the ``mean`` aggregation of every LEVEL2 variable of ``vitals_labs`` for hours_in
0..23. Each subject is assigned train/valid/test (70/10/20 in expectation) by a seeded hash of
its own subject_id, so no subject's split depends on any other subject.

Standardisation needs statistics over many stays, and a statistic that feeds the public side
(pretraining, curvature, clip norm, line search) must not read a private stay. The cohort
therefore keeps the raw hourly means, and :meth:`MimicCohort.features` standardises with the
rows it is given: :func:`mimic_careunit_scenario` passes the public care unit's training
stays (``public_train``), the data the public model is fitted on. Each variable is
standardised with the mean and standard deviation of its observed values in those rows;
missing values are then imputed within each stay (forward fill, else the stay's mean of
observed values, else 0 = the reference mean). A variable never observed in the reference rows
has no public scale and is 0 throughout. Forward fill and the stay's mean use only that stay.
A mask (1 = observed) per value is kept, and the flat feature vector is
[24 x F values, 24 x F masks].

The file is read through :func:`qem.datasets.hdf5.open_hdf_store`, which never unpickles
anything but numpy arrays and plain values. MIMIC-Extract writes ``patients`` in pandas' table
format and ``vitals_labs`` in the fixed format; both formats are accepted for both keys.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qem.extras import missing_extra

try:
    import pandas as pd
    from pandas.api.types import is_numeric_dtype
except ImportError as error:
    raise missing_extra(error, "mimic", "the MIMIC-Extract loader") from error

from qem.datasets.hdf5 import open_hdf_store
from qem.datasets.scenarios import Scenario
from qem.datasets.synthetic_mimic import SYNTHETIC_KEY
from qem.errors import DataError

__all__ = [
    "TASKS",
    "MimicCohort",
    "load_mimic_extract",
    "mimic_careunit_scenario",
    "observed_statistics",
]

WINDOW_HOURS = 24
GAP_HOURS = 6
MIN_STAY_HOURS = 36
MIN_AGE = 15
SPLIT_PERCENT = (70, 10, 20)
SPLITS = ("train", "valid", "test")
TASKS = ("mort_icu", "los_3")
STAY_LEVELS = ("subject_id", "hadm_id", "icustay_id")
_PATIENT_COLUMNS = ("age", "los_icu", "max_hours", "first_careunit", "mort_icu")


@dataclass
class MimicCohort:
    """The cohort's raw hourly inputs and labels, one row per subject.

    ``raw`` is (n, 24, F) float32: the hourly means as recorded, NaN where nothing was
    measured. ``split[i]`` is "train", "valid" or "test". ``synthetic`` is True for files
    written by ``write_synthetic_mimic``. Standardised inputs come from :meth:`features`, which
    takes the rows whose statistics to use.
    """

    raw: np.ndarray
    labels: dict[str, np.ndarray]
    subject_id: np.ndarray
    icustay_id: np.ndarray
    care_unit: np.ndarray
    split: np.ndarray
    feature_names: list[str]
    synthetic: bool
    source: str

    @property
    def mask(self) -> np.ndarray:
        """(n, 24, F) float32, 1 where a value was measured."""
        return (~np.isnan(self.raw)).astype(np.float32)

    def standardised(self, reference: np.ndarray) -> np.ndarray:
        """(n, 24, F) float32 values, each variable standardised with the mean and standard
        deviation of its observed values in rows ``reference`` (pass public rows only), then
        imputed (:func:`impute`)."""
        mean, std = observed_statistics(self.raw[reference])
        return impute(((self.raw - mean) / std).astype(np.float32))

    def features(self, reference: np.ndarray) -> torch.Tensor:
        """Flat float32 inputs (n, 2 * 24 * F): hourly values standardised with the statistics
        of rows ``reference`` (:meth:`standardised`), then hourly masks."""
        n = len(self.raw)
        values = self.standardised(reference).reshape(n, -1)
        flat = np.concatenate([values, self.mask.reshape(n, -1)], axis=1)
        return torch.from_numpy(flat)

    def rows(self, split: str, units: set[str] | None = None, exclude: bool = False) -> np.ndarray:
        """Row indices of ``split`` whose care unit is in ``units`` (not in it if ``exclude``)."""
        keep = self.split == split
        if units is not None:
            keep &= np.isin(self.care_unit, sorted(units)) != exclude
        return np.flatnonzero(keep)


def load_mimic_extract(path: str | Path, *, seed: int = 0) -> MimicCohort:
    """Read ``all_hourly_data.h5``, select the cohort and split it by subject (see the module
    docstring); the hourly values stay raw. Warns when the file is a synthetic stand-in."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"no MIMIC-Extract file at {path}; pass the all_hourly_data.h5 that MIMIC-Extract "
            "wrote from your credentialed MIMIC-III copy (qem cannot download it)."
        )
    with open_hdf_store(path) as store:
        keys = set(store.keys())
        missing = {"/patients", "/vitals_labs"} - keys
        if missing:
            raise DataError(
                f"{path} lacks the keys {sorted(missing)}; pass MIMIC-Extract's all_hourly_data.h5."
            )
        synthetic = f"/{SYNTHETIC_KEY}" in keys
        cohort = select_cohort(store["patients"])
        means = _hourly_means(store["vitals_labs"], cohort.index.get_level_values("icustay_id"))
    if synthetic:
        warnings.warn(
            f"{path} is a SYNTHETIC stand-in for MIMIC-Extract written by qem; results on it "
            "say nothing about real patients.",
            UserWarning,
            stacklevel=2,
        )
    subject_id = cohort.index.get_level_values("subject_id").to_numpy()
    split = split_subjects(subject_id, seed)
    if set(split.tolist()) != set(SPLITS):
        raise DataError(
            f"{len(np.unique(subject_id))} subjects are too few for a 70/10/20 split; pass a "
            "larger file."
        )
    return MimicCohort(
        raw=_window_array(means, cohort.index.get_level_values("icustay_id").to_numpy()),
        labels={
            "mort_icu": cohort["mort_icu"].to_numpy().astype(np.int64),
            "los_3": (cohort["los_icu"].to_numpy() > 3).astype(np.int64),
        },
        subject_id=subject_id,
        icustay_id=cohort.index.get_level_values("icustay_id").to_numpy(),
        care_unit=cohort["first_careunit"].astype(str).to_numpy(),
        split=split,
        feature_names=[str(c) for c in means.columns],
        synthetic=synthetic,
        source=str(path),
    )


def select_cohort(patients: pd.DataFrame) -> pd.DataFrame:
    """First ICU stay per subject, kept when age > 15, 24 * los_icu > 36 and
    max_hours > 24 + 6 and both labels are known; indexed by (subject_id, hadm_id, icustay_id)."""
    missing_levels = set(STAY_LEVELS) - set(patients.index.names)
    missing_columns = set(_PATIENT_COLUMNS) - set(patients.columns)
    if missing_levels or missing_columns:
        raise DataError(
            f"'patients' lacks index levels {sorted(missing_levels)} / columns "
            f"{sorted(missing_columns)}; pass MIMIC-Extract's all_hourly_data.h5."
        )
    stays = patients.reset_index()
    order = (
        ["subject_id", "intime", "icustay_id"]
        if "intime" in stays
        else ["subject_id", "icustay_id"]
    )
    first = stays.sort_values(order, kind="stable").drop_duplicates("subject_id", keep="first")
    keep = (
        (first["age"] > MIN_AGE)
        & (first["los_icu"] * 24 > MIN_STAY_HOURS)
        & (first["max_hours"] > WINDOW_HOURS + GAP_HOURS)
        & first["mort_icu"].notna()
        & first["los_icu"].notna()
    )
    cohort = first[keep].set_index(list(STAY_LEVELS)).sort_index()
    if cohort.empty:
        raise DataError("no ICU stay passes the cohort criteria (first stay, age > 15, > 36 h).")
    return cohort


def split_subjects(subject_id: np.ndarray, seed: int) -> np.ndarray:
    """Assign each row "train"/"valid"/"test" (70/10/20 in expectation) from a seeded hash of
    its subject_id alone: a subject's split depends on no other row, so adding, removing or
    changing one stay never moves another subject between splits, and all stays of a subject
    share one split."""
    draws = np.array([_subject_draw(int(s), seed) for s in subject_id], dtype=np.float64)
    bounds = np.cumsum(SPLIT_PERCENT[:2]) / 100
    return np.asarray(SPLITS)[np.searchsorted(bounds, draws, side="right")]


def _subject_draw(subject_id: int, seed: int) -> float:
    """A uniform draw in [0, 1) fixed by (seed, subject_id): the first 8 bytes of BLAKE2b."""
    digest = hashlib.blake2b(f"{seed}:{subject_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def impute(values: np.ndarray) -> np.ndarray:
    """Fill NaNs of (n, T, F) standardised values: forward fill along T within each stay, then
    the stay's mean of observed values, then 0 (the reference mean). Each stay is filled from
    its own values only."""
    observed = ~np.isnan(values)
    last = np.where(observed, np.arange(values.shape[1])[None, :, None], 0)
    np.maximum.accumulate(last, axis=1, out=last)
    filled = np.take_along_axis(values, last, axis=1)
    counts = observed.sum(axis=1, keepdims=True)
    stay_mean = np.where(observed, values, 0.0).sum(axis=1, keepdims=True) / np.maximum(counts, 1)
    filled = np.where(np.isnan(filled), np.where(counts > 0, stay_mean, 0.0), filled)
    return filled.astype(values.dtype, copy=False)


def mimic_careunit_scenario(
    source: str | Path | MimicCohort,
    task: str,
    public_unit: str = "MICU",
    seed: int = 0,
) -> Scenario:
    """Transfer across care units: public = the train (and valid) split of ``public_unit``;
    private = the train split of every other unit; test = the test split of the other units.
    Metric AUROC; targets int64 in {0, 1}; inputs are ``MimicCohort.features`` standardised
    with the statistics of the public training stays only, so every public input is a function
    of public stays (changing a private stay changes no public tensor).
    ``seed`` fixes the subject split when ``source`` is a path."""
    if task not in TASKS:
        raise DataError(f"unknown MIMIC task {task!r}; choose one of {TASKS}.")
    cohort = source if isinstance(source, MimicCohort) else load_mimic_extract(source, seed=seed)
    units = set(cohort.care_unit.tolist())
    if public_unit not in units:
        raise DataError(
            f"care unit {public_unit!r} is not in the cohort; choose one of {sorted(units)}."
        )
    public = {public_unit}
    idx = {
        "public_train": cohort.rows("train", public),
        "public_valid": cohort.rows("valid", public),
        "private_train": cohort.rows("train", public, exclude=True),
        "test": cohort.rows("test", public, exclude=True),
    }
    for side, rows in idx.items():
        if len(np.unique(cohort.labels[task][rows])) < 2:
            raise DataError(
                f"the {side} side of {task} with public unit {public_unit} has "
                f"{len(rows)} stays but not both classes; use a larger cohort or another unit."
            )
    x, y = cohort.features(idx["public_train"]), torch.from_numpy(cohort.labels[task])
    prefix = "synthetic_" if cohort.synthetic else ""
    note = " SYNTHETIC data: says nothing about real patients." if cohort.synthetic else ""
    return Scenario(
        name=f"{prefix}mimic_{task}_{public_unit}",
        description=(
            f"MIMIC-Extract {task}: pretrain on {len(idx['public_train'])} {public_unit} stays, "
            f"fine-tune privately on {len(idx['private_train'])} stays of other units, test on "
            f"{len(idx['test'])} (AUROC).{note}"
        ),
        **{side: (x[rows], y[rows]) for side, rows in idx.items()},
        metric="auroc",
        num_classes=2,
        synthetic=cohort.synthetic,
        indices={side: torch.from_numpy(rows) for side, rows in idx.items()},
    )


def _hourly_means(vitals_labs: pd.DataFrame, icustays: pd.Index) -> pd.DataFrame:
    """The 'mean' aggregation of every LEVEL2 variable, rows of the cohort's stays in hours
    0..23, indexed by (icustay_id, hours_in)."""
    missing = {"icustay_id", "hours_in"} - set(vitals_labs.index.names)
    if missing:
        raise DataError(f"'vitals_labs' lacks index levels {sorted(missing)}.")
    columns = vitals_labs.columns
    if columns.nlevels != 2 or "mean" not in columns.get_level_values(-1):
        raise DataError(
            "'vitals_labs' needs columns (LEVEL2, Aggregation Function) with a 'mean' "
            "aggregation, as MIMIC-Extract writes them."
        )
    vitals_labs = vitals_labs.xs("mean", axis=1, level=-1)
    not_numeric = [str(c) for c, t in vitals_labs.dtypes.items() if not is_numeric_dtype(t)]
    if not_numeric:
        raise DataError(f"'vitals_labs' has non-numeric 'mean' columns {not_numeric[:5]}.")
    hours = vitals_labs.index.get_level_values("hours_in")
    stays = vitals_labs.index.get_level_values("icustay_id")
    window = vitals_labs[(hours >= 0) & (hours < WINDOW_HOURS) & stays.isin(icustays)]
    return window.droplevel(
        [lv for lv in window.index.names if lv not in ("icustay_id", "hours_in")]
    )


def _window_array(means: pd.DataFrame, icustay_id: np.ndarray) -> np.ndarray:
    """(n, 24, F) float32 array of hourly means, NaN where a stay has no row or no value."""
    out = np.full((len(icustay_id), WINDOW_HOURS, means.shape[1]), np.nan, dtype=np.float32)
    stay = pd.Index(icustay_id).get_indexer(means.index.get_level_values("icustay_id"))
    hour = means.index.get_level_values("hours_in").to_numpy().astype(int)
    out[stay, hour] = means.to_numpy(dtype=np.float32)
    return out


def observed_statistics(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-variable (last axis) mean and standard deviation, in float64, of the observed
    (non-NaN) values. A variable never observed gets mean NaN, so it standardises to NaN and
    is imputed to 0; a constant one gets standard deviation 1."""
    flat = values.reshape(-1, values.shape[-1])
    count = (~np.isnan(flat)).sum(axis=0)
    mean = np.nansum(flat, axis=0, dtype=np.float64) / np.maximum(count, 1)
    var = np.nansum((flat - mean) ** 2, axis=0, dtype=np.float64) / np.maximum(count, 1)
    std = np.sqrt(var)
    return np.where(count > 0, mean, np.nan), np.where(std > 0, std, 1.0)
