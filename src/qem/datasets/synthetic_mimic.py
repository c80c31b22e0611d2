"""A synthetic stand-in for MIMIC-Extract's ``all_hourly_data.h5``, for tests and demos.

MIMIC-III is credentialed data: qem never ships or downloads it. This module writes a small
file with the same schema as the keys qem reads, so the loader and the care-unit scenario can
be exercised end to end:

* ``patients``: index (subject_id, hadm_id, icustay_id); columns gender, ethnicity, age,
  admittime, intime, outtime, los_icu (days), max_hours, first_careunit, mort_icu, mort_hosp,
  hospital_expire_flag, hospstay_seq, readmission_30.
* ``vitals_labs``: index (subject_id, hadm_id, icustay_id, hours_in) with one row for every
  hour 0..max_hours of every stay; columns (LEVEL2, Aggregation Function) with aggregations
  count, mean, std; NaN where nothing was measured.
* ``qem_synthetic``: a one-row table (seed, n_subjects) that marks the file as synthetic; the
  loader flags ``synthetic=True`` and warns, and every result built on it says so.

As MIMIC-Extract does, ``patients`` is written in pandas' table format (string columns as
fixed-width bytes) and ``vitals_labs`` in the fixed format (numeric blocks only).

The generator covers what the cohort filters must handle: several stays per subject (whose
icustay_id order differs from their time order), children (age <= 15), stays of 36 hours or
less, five care units with shifted feature distributions. Two latent per-stay variables drive
the outcomes: mort_icu ~ Bernoulli(sigmoid(3 r - 3 + 0.3 [unit is CCU])) and
log los_icu = 0.9 + 0.7 s + 0.15 e; the hourly means carry r and s plus noise, so both tasks
are learnable from the first 24 hours.
Nothing here resembles real patients.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from qem.errors import InvalidParameterError
from qem.extras import missing_extra

try:
    import pandas as pd
    import tables
except ImportError as error:
    raise missing_extra(error, "mimic", "the synthetic MIMIC-Extract file") from error

SYNTHETIC_KEY = "qem_synthetic"
CARE_UNITS = ("MICU", "SICU", "CSRU", "CCU", "TSICU")
_UNIT_PROBS = (0.35, 0.15, 0.2, 0.15, 0.15)
# LEVEL2 name: (mean, sd, loading on mortality latent r, loading on length latent s, P(hourly obs))
_VARIABLES = {
    "heart rate": (85.0, 15.0, 0.8, 0.5, 0.9),
    "systolic blood pressure": (120.0, 20.0, -0.7, -0.4, 0.8),
    "respiratory rate": (18.0, 5.0, 0.3, 0.8, 0.8),
    "oxygen saturation": (97.0, 2.0, -0.5, -0.5, 0.7),
    "temperature": (37.0, 0.7, 0.0, 0.6, 0.3),
    "glucose": (130.0, 40.0, 0.2, 0.2, 0.2),
    "lactate": (2.0, 1.0, 1.0, 0.0, 0.1),
    "white blood cell count": (10.0, 4.0, 0.2, 0.7, 0.05),
}
_MAX_LOS_DAYS = 8.0


def write_synthetic_mimic(path: str | Path, n_subjects: int = 1000, seed: int = 0) -> Path:
    """Write a synthetic ``all_hourly_data.h5`` for ``n_subjects`` subjects; return its path."""
    if n_subjects < 10:
        raise InvalidParameterError(f"n_subjects={n_subjects}: pass at least 10.")
    path = Path(path)
    rng = np.random.default_rng(seed)
    patients, latents = _patients(rng, n_subjects)
    vitals = _vitals_labs(rng, patients, latents)
    with pd.HDFStore(path, mode="w") as store, warnings.catch_warnings():
        # MIMIC-Extract's level name "Aggregation Function" is not a Python identifier.
        warnings.simplefilter("ignore", tables.NaturalNameWarning)
        store.put("patients", patients, format="table", track_times=False)
        store.put("vitals_labs", vitals, track_times=False)
        marker = pd.DataFrame({"seed": [seed], "n_subjects": [n_subjects]})
        store.put(SYNTHETIC_KEY, marker, track_times=False)
    return path


def _patients(rng: np.random.Generator, n_subjects: int) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per stay, and the per-stay latents (r, s) and care-unit index."""
    stays_per_subject = rng.choice([1, 2, 3], size=n_subjects, p=[0.6, 0.3, 0.1])
    n = int(stays_per_subject.sum())
    subject_id = np.repeat(np.arange(1, n_subjects + 1) * 7 + 100, stays_per_subject)
    hadm_id = rng.choice(np.arange(100_000, 200_000), size=n, replace=False)
    icustay_id = rng.choice(np.arange(200_000, 300_000), size=n, replace=False)
    child = np.repeat(rng.random(n_subjects) < 0.05, stays_per_subject)
    age = np.where(child, rng.uniform(0, 15, n), rng.uniform(18, 89, n)).round(2)
    unit = rng.choice(len(CARE_UNITS), size=n, p=_UNIT_PROBS)
    r, s = rng.standard_normal(n), rng.standard_normal(n)
    log_los = 0.9 + 0.7 * s + 0.15 * rng.standard_normal(n)
    los_icu = np.clip(np.exp(log_los), 0.3, _MAX_LOS_DAYS).round(4)
    mort_icu = (rng.random(n) < 1 / (1 + np.exp(-(3.0 * r - 3.0 + 0.3 * (unit == 3))))).astype(int)
    admittime = pd.Timestamp("2100-01-01") + pd.to_timedelta(rng.uniform(0, 3650, n), unit="D")
    intime = admittime + pd.to_timedelta(rng.uniform(0, 2, n), unit="D")
    outtime = intime + pd.to_timedelta(los_icu, unit="D")
    stay_rank = pd.Series(intime).groupby(subject_id).rank(method="first").to_numpy()
    patients = pd.DataFrame(
        {
            "gender": rng.choice(["M", "F"], size=n),
            "ethnicity": rng.choice(["WHITE", "BLACK", "ASIAN", "OTHER"], size=n),
            "age": age,
            "admittime": admittime,
            "intime": intime,
            "outtime": outtime,
            "los_icu": los_icu,
            "max_hours": np.floor(los_icu * 24).astype(int),
            "first_careunit": np.asarray(CARE_UNITS)[unit],
            "mort_icu": mort_icu,
            "mort_hosp": np.maximum(mort_icu, (rng.random(n) < 0.03).astype(int)),
            "hospital_expire_flag": mort_icu,
            "hospstay_seq": stay_rank.astype(int),
            "readmission_30": (stay_rank > 1).astype(int),
        },
        index=pd.MultiIndex.from_arrays(
            [subject_id, hadm_id, icustay_id], names=["subject_id", "hadm_id", "icustay_id"]
        ),
    )
    return patients, np.stack([r, s, unit], axis=1)


def _vitals_labs(
    rng: np.random.Generator, patients: pd.DataFrame, latents: np.ndarray
) -> pd.DataFrame:
    """Hourly (count, mean, std) per variable for hours 0..max_hours of each stay."""
    hours = patients["max_hours"].to_numpy() + 1
    stay = np.repeat(np.arange(len(patients)), hours)
    hours_in = np.concatenate([np.arange(h) for h in hours])
    r, s, unit = (latents[stay, j] for j in range(3))
    unit_shift = rng.normal(0, 0.5, size=(len(CARE_UNITS), len(_VARIABLES)))
    stay_effect = rng.normal(0, 0.3, size=(len(patients), len(_VARIABLES)))
    columns: dict[tuple[str, str], np.ndarray] = {}
    for j, (name, (mean, sd, a, b, p_obs)) in enumerate(_VARIABLES.items()):
        z = a * r + b * s + unit_shift[unit.astype(int), j] + stay_effect[stay, j]
        value = mean + sd * (z + 0.5 * rng.standard_normal(len(stay)))
        observed = rng.random(len(stay)) < p_obs
        count = observed * (1 + rng.binomial(2, 0.3, size=len(stay)))
        columns[(name, "count")] = count.astype(float)
        columns[(name, "mean")] = np.where(observed, value, np.nan)
        columns[(name, "std")] = np.where(count > 1, sd * 0.1 * rng.random(len(stay)), np.nan)
    index = pd.MultiIndex.from_arrays(
        [
            patients.index.get_level_values(level).to_numpy()[stay]
            for level in ("subject_id", "hadm_id", "icustay_id")
        ]
        + [hours_in],
        names=["subject_id", "hadm_id", "icustay_id", "hours_in"],
    )
    frame = pd.DataFrame(columns, index=index)
    frame.columns = pd.MultiIndex.from_tuples(
        list(columns), names=["LEVEL2", "Aggregation Function"]
    )
    return frame
