"""MIMIC-Extract loader and care-unit scenario on the synthetic file; AUROC of a model on it."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import replace
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from qem.datasets.mimic import (
    MimicCohort,
    impute,
    load_mimic_extract,
    mimic_careunit_scenario,
    observed_statistics,
    split_subjects,
)
from qem.datasets.scenarios import Scenario
from qem.datasets.synthetic_mimic import write_synthetic_mimic
from qem.errors import DataError
from qem.metrics import evaluate_auroc
from qem.models import build_model
from qem.pretrain import pretrain


@pytest.fixture(scope="module")
def h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mimic(tmp_path_factory.mktemp("mimic") / "all.h5", 600, seed=1)


@pytest.fixture(scope="module")
def raw(h5: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    with pd.HDFStore(h5, "r") as store:
        return store["patients"], store["vitals_labs"]


@pytest.fixture(scope="module")
def cohort(h5: Path) -> MimicCohort:
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        return load_mimic_extract(h5, seed=0)


def test_cohort_keeps_exactly_eligible_first_stays(
    cohort: MimicCohort, raw: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    stays = raw[0].reset_index()
    first = stays.loc[stays.groupby("subject_id")["intime"].idxmin()]
    eligible = first[(first.age > 15) & (first.los_icu > 1.5) & (first.max_hours > 30)]
    assert set(cohort.icustay_id.tolist()) == set(eligible.icustay_id.tolist())
    assert len(set(cohort.subject_id.tolist())) == len(cohort.subject_id)
    # the file really contains every kind of stay that must be excluded
    later = stays[~stays.icustay_id.isin(first.icustay_id)]
    smaller_id_later = later.icustay_id < later.subject_id.map(
        first.set_index("subject_id").icustay_id
    )
    assert smaller_id_later.any()  # ordering by icustay_id instead of intime would be caught
    assert (first.age <= 15).any() and (first.los_icu * 24 <= 36).any()
    assert not set(cohort.icustay_id.tolist()) & set(later.icustay_id.tolist())
    labels = eligible.set_index("icustay_id").loc[cohort.icustay_id]
    assert np.array_equal(cohort.labels["mort_icu"], labels.mort_icu.to_numpy())
    assert np.array_equal(cohort.labels["los_3"], (labels.los_icu > 3).to_numpy().astype(int))
    assert np.array_equal(cohort.care_unit, labels.first_careunit.to_numpy().astype(str))


def test_window_masks_and_standardisation(
    cohort: MimicCohort, raw: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    means = raw[1].xs("mean", axis=1, level="Aggregation Function")
    means = means.droplevel(["subject_id", "hadm_id"])
    grid = pd.MultiIndex.from_tuples(list(product(cohort.icustay_id, range(24))))
    expected = means.reindex(grid).to_numpy().reshape(len(cohort.icustay_id), 24, -1)
    assert cohort.raw.shape == expected.shape and cohort.feature_names == list(means.columns)
    assert np.array_equal(cohort.raw, expected.astype(np.float32), equal_nan=True)
    observed = ~np.isnan(expected)
    assert np.array_equal(cohort.mask, observed.astype(np.float32))
    assert 0.05 < cohort.mask.mean() < 0.95
    reference = cohort.rows("train", {"SICU"})
    mean = np.nanmean(expected[reference], axis=(0, 1))
    std = np.nanstd(expected[reference], axis=(0, 1))
    assert np.allclose(observed_statistics(cohort.raw[reference])[0], mean)
    assert np.allclose(observed_statistics(cohort.raw[reference])[1], std)
    values = cohort.standardised(reference)
    standardised = (expected - mean) / std
    assert np.allclose(values[observed], standardised[observed], atol=1e-5)
    assert not np.allclose(values, cohort.standardised(cohort.rows("train", {"CCU"})))
    features = cohort.features(reference)
    n, width = len(cohort.raw), 24 * len(cohort.feature_names)
    assert features.shape == (n, 2 * width) and features.dtype == torch.float32
    assert torch.equal(features[:, :width], torch.from_numpy(values.reshape(n, -1)))
    assert torch.equal(features[:, width:], torch.from_numpy(cohort.mask.reshape(n, -1)))
    assert not torch.isnan(features).any()


def test_variable_never_observed_in_reference_rows_is_zero() -> None:
    raw = np.full((3, 24, 2), np.nan, dtype=np.float32)
    raw[:, :, 0] = np.arange(3)[:, None]
    raw[2, 5, 1] = 130.0  # observed only outside the reference rows
    cohort = MimicCohort(
        raw=raw,
        labels={},
        subject_id=np.arange(3),
        icustay_id=np.arange(3),
        care_unit=np.array(["A", "A", "B"]),
        split=np.array(["train"] * 3),
        feature_names=["x", "y"],
        synthetic=True,
        source="",
    )
    values = cohort.standardised(np.array([0, 1]))
    assert np.array_equal(values[:, 0, 0], [-1.0, 1.0, 3.0])  # mean 0.5, std 0.5
    assert not values[:, :, 1].any() and cohort.mask[2, 5, 1] == 1


def test_split_by_subject(h5: Path, cohort: MimicCohort) -> None:
    groups = {
        s: set(cohort.subject_id[cohort.split == s].tolist()) for s in ("train", "valid", "test")
    }
    assert not (groups["train"] & groups["valid"] or groups["train"] & groups["test"])
    assert not groups["valid"] & groups["test"]
    n = len(cohort.subject_id)
    for split, share in (("train", 0.7), ("valid", 0.1), ("test", 0.2)):
        assert abs(len(groups[split]) / n - share) < 0.06
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        other = load_mimic_extract(h5, seed=1)
    assert not np.array_equal(other.split, cohort.split)
    assert np.array_equal(other.icustay_id, cohort.icustay_id)
    # a subject's split depends on no other subject: split half of them on their own
    half = np.arange(0, n, 2)
    assert np.array_equal(split_subjects(cohort.subject_id[half], 0), cohort.split[half])
    repeated = np.repeat(cohort.subject_id[:5], 3)
    assert np.array_equal(split_subjects(repeated, 0), np.repeat(cohort.split[:5], 3))


def test_impute_rules() -> None:
    nan = np.nan
    values = np.array([[[nan, 5.0, nan], [1.0, nan, nan], [nan, nan, nan], [3.0, nan, nan]]])
    filled = impute(values)
    # column 0: leading NaN -> stay mean 2, then forward fill; 1: forward fill; 2: never seen -> 0
    assert np.array_equal(filled[0, :, 0], [2.0, 1.0, 1.0, 3.0])
    assert np.array_equal(filled[0, :, 1], [5.0, 5.0, 5.0, 5.0])
    assert np.array_equal(filled[0, :, 2], [0.0, 0.0, 0.0, 0.0])


def test_careunit_scenario(cohort: MimicCohort) -> None:
    scenario = mimic_careunit_scenario(cohort, "mort_icu", public_unit="MICU")
    assert scenario.metric == "auroc" and scenario.num_classes == 2 and scenario.synthetic
    assert scenario.name.startswith("synthetic_") and "SYNTHETIC" in scenario.description
    units = {
        side: set(cohort.care_unit[idx.numpy()].tolist()) for side, idx in scenario.indices.items()
    }
    assert units["public_train"] == units["public_valid"] == {"MICU"}
    assert "MICU" not in units["private_train"] | units["test"] and len(units["test"]) > 1
    splits = {
        side: set(cohort.split[idx.numpy()].tolist()) for side, idx in scenario.indices.items()
    }
    assert splits == {
        "public_train": {"train"},
        "public_valid": {"valid"},
        "private_train": {"train"},
        "test": {"test"},
    }
    x, y = scenario.private_train
    rows = scenario.indices["private_train"].numpy()
    assert torch.equal(x, cohort.features(scenario.indices["public_train"].numpy())[rows])
    assert torch.equal(y, torch.from_numpy(cohort.labels["mort_icu"][rows]))
    with pytest.raises(DataError, match="choose one of"):
        mimic_careunit_scenario(cohort, "mort_icu", public_unit="NICU")
    with pytest.raises(DataError, match="unknown MIMIC task"):
        mimic_careunit_scenario(cohort, "los_7")


def _public_inputs(scenario: Scenario) -> list[torch.Tensor]:
    return [*scenario.public_train, *scenario.public_valid]


def test_public_inputs_do_not_depend_on_private_stays(
    cohort: MimicCohort, raw: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    """Changing a private stay's hourly values, or dropping a private stay from the cohort,
    leaves every public tensor bit-identical (standardisation and split read no private row)."""
    before = mimic_careunit_scenario(cohort, "mort_icu", public_unit="MICU")
    private_rows = before.indices["private_train"].numpy()
    changed, dropped = cohort.icustay_id[private_rows[:2]]
    # in the loaded cohort's raw values
    shifted = cohort.raw.copy()
    shifted[private_rows[0]] += 1000.0
    after = mimic_careunit_scenario(replace(cohort, raw=shifted), "mort_icu", public_unit="MICU")
    assert not torch.equal(before.private_train[0], after.private_train[0])
    for old, new in zip(_public_inputs(before), _public_inputs(after), strict=True):
        assert torch.equal(old, new)
    # in the raw file: one private stay's values shifted, another one made ineligible (age 10)
    patients, vitals = raw[0].copy(), raw[1].copy()
    means = [column for column in vitals.columns if column[1] == "mean"]
    vitals.loc[vitals.index.get_level_values("icustay_id") == changed, means] += 1000.0
    patients.loc[patients.index.get_level_values("icustay_id") == dropped, "age"] = 10.0
    edited = tmp_path / "edited.h5"
    with pd.HDFStore(edited, "w") as store, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the level name "Aggregation Function"
        store.put("patients", patients, format="table")
        store.put("vitals_labs", vitals)
    from_file = mimic_careunit_scenario(edited, "mort_icu", public_unit="MICU")
    assert len(from_file.private_train[1]) == len(private_rows) - 1
    for old, new in zip(_public_inputs(before), _public_inputs(from_file), strict=True):
        assert torch.equal(old, new)


@pytest.mark.parametrize("task", ["mort_icu", "los_3"])
def test_synthetic_tasks_are_learnable(cohort: MimicCohort, task: str) -> None:
    scenario = mimic_careunit_scenario(cohort, task)
    model = build_model("logreg", seed=0, in_features=scenario.test[0].shape[1], out_features=2)
    pretrain(model, scenario.private_train, epochs=20, lr=1e-3, seed=0, progress=False)
    assert evaluate_auroc(model, scenario.test) > 0.75


def test_real_schema_is_not_flagged_and_bad_files_fail(h5: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.h5"
    shutil.copy(h5, plain)
    with pd.HDFStore(plain, "a") as store:
        store.remove("qem_synthetic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not load_mimic_extract(plain).synthetic
    with pytest.raises(DataError, match="no MIMIC-Extract file"):
        load_mimic_extract(tmp_path / "missing.h5")
    with pd.HDFStore(tmp_path / "partial.h5", "w") as store:
        store.put("patients", pd.DataFrame({"age": [40.0]}), track_times=False)
    with pytest.raises(DataError, match="vitals_labs"):
        load_mimic_extract(tmp_path / "partial.h5")
    (tmp_path / "text.h5").write_text("not HDF5")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        load_mimic_extract(tmp_path / "text.h5")
