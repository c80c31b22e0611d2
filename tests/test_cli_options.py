"""The command line offers every option of ``fine_tune`` from one declaration
(qem.cli.options), and hands the parsed values to it unchanged."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from torch import nn

from qem.cli.main import build_parser
from qem.cli.options import (
    BUDGET_DEFAULTS,
    FINE_TUNE_OPTIONS,
    NOT_EXPOSED,
    PENDING,
    SCHEDULE_OPTIONS,
    fine_tune_kwargs,
)
from qem.curvature.factory import CURVATURES
from qem.defaults import COMMAND_LINE_DEFAULTS, FINE_TUNE_DEFAULTS
from qem.errors import InvalidParameterError
from qem.finetune import fine_tune
from qem.privacy.sensitivity import Adjacency, ClipNorm
from qem.schedules import SCHEDULES
from qem.statistics import InvalidRecords
from qem.subspace.factory import KINDS

SIGNATURE = inspect.signature(fine_tune)
KEYWORDS = {n for n, p in SIGNATURE.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
EXPOSED = {option.keyword for option in FINE_TUNE_OPTIONS}
REQUIRED = ["--model", "m:f", "--public", "p.npz", "--private", "q.npz", "--out", "o"]


def test_every_keyword_of_fine_tune_is_exposed_or_excluded_with_a_reason():
    forgotten = KEYWORDS - EXPOSED - set(NOT_EXPOSED)
    assert not forgotten, f"fine_tune options missing from qem.cli.options: {sorted(forgotten)}"
    assert EXPOSED <= KEYWORDS, f"stale options: {sorted(EXPOSED - KEYWORDS)}"
    assert set(NOT_EXPOSED) <= KEYWORDS and not EXPOSED & set(NOT_EXPOSED)
    landed = set(PENDING) & KEYWORDS
    assert not landed, f"fine_tune takes {sorted(landed)} now: add it to FINE_TUNE_OPTIONS"


def test_every_schedule_parameter_is_exposed():
    kinds = next(o for o in FINE_TUNE_OPTIONS if o.keyword == "schedule").choices
    assert set(kinds) == set(SCHEDULES)
    parameters = {name for cls in SCHEDULES.values() for name in inspect.signature(cls).parameters}
    assert parameters - {"rounds"} == {option.keyword for option in SCHEDULE_OPTIONS}


def test_choices_are_the_librarys_names():
    choices = {o.keyword: set(o.choices) for o in FINE_TUNE_OPTIONS if o.choices}
    # subset needs parameter names; auto is resolved for the model (PublicSide.for_model)
    assert choices["subspace"] == set(KINDS) - {"subset"} | {"auto"}
    assert choices["curvature"] == set(CURVATURES)
    assert choices["adjacency"] == {a.value for a in Adjacency}
    assert choices["clipping"] == {c.value for c in ClipNorm}
    assert choices["invalid_records"] == {r.value for r in InvalidRecords}
    assert choices["mode"] == {"gdp", "pure"}


def test_budget_defaults_of_preview_and_audit_are_fine_tunes():
    defaults = {name: SIGNATURE.parameters[name].default for name in BUDGET_DEFAULTS}
    assert defaults == BUDGET_DEFAULTS


def parse(argv: list[str], command: str = "finetune"):
    return build_parser(command).parse_args([command, *argv])


def test_defaults_are_fine_tunes_except_progress():
    kwargs = fine_tune_kwargs(parse([*REQUIRED, "--epsilon", "1"]))
    assert kwargs.pop("progress") is True  # on at the command line, off in the library
    assert kwargs == {
        name: 1.0 if name == "epsilon" else SIGNATURE.parameters[name].default
        for name in EXPOSED - {"progress", "schedule"}
    }


GIVEN = {
    "epsilon": 0.5,
    "delta": 1e-6,
    "mode": "gdp",
    "adjacency": "add_remove",
    "clipping": "euclidean",
    "N": 1000,
    "subspace": "kronecker",
    "k": 32,
    "subspace_seed": 7,
    "curvature": "fisher",
    "damping": 0.5,
    "curvature_every": 5,
    "public_sample_size": 100,
    "clip_norm": 2.5,
    "clip_quantile": 0.8,
    "prior_weight": 3.0,
    "momentum": 0.5,
    "line_search_size": 50,
    "step_significance": 2.0,
    "confirmation_size": 30,
    "radius": 4.0,
    "seed": 11,
    "invalid_records": "raise",
    "batch_size": 64,
    "device": "cuda",
    "layers": ["classifier", "Linear", "torch.nn.Conv2d", "bert.embeddings.LayerNorm"],
}
"""A value other than the default for every valued option."""
PARSED = {"layers": ["classifier", nn.Linear, nn.Conv2d, "bert.embeddings.LayerNorm"]}
"""What the command line makes of the values that are not passed on as given: names stay
names, torch.nn class names and dotted paths to nn.Module subclasses become the types."""


def words(keyword: str, value: object) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return ["--" + keyword.replace("_", "-"), *map(str, values)]


def test_every_option_reaches_fine_tune():
    argv = [word for k, v in GIVEN.items() for word in words(k, v)]
    schedule = ["--schedule", "poisson", "--sampling-rate", "0.05", "--rounds", "40"]
    switches = ["--resample-subspace", "4", "--secure-noise", "--no-progress", "--distributed"]
    kwargs = fine_tune_kwargs(parse([*REQUIRED, *argv, *schedule, *switches]))
    assert kwargs == {
        **GIVEN,
        **PARSED,
        "schedule": {"kind": "poisson", "rounds": 40, "sampling_rate": 0.05},
        "resample_subspace": 4,
        "partition_rounds": False,
        "secure_noise": True,
        "progress": False,
        "distributed": True,
    }
    valued = {o.keyword for o in FINE_TUNE_OPTIONS if not o.is_switch}
    assert valued - {"schedule", "rounds", "resample_subspace"} == set(GIVEN)  # all were given
    SIGNATURE.bind(None, None, None, None, **kwargs)  # every keyword is fine_tune's


def test_shortcuts_without_a_schedule():
    kwargs = fine_tune_kwargs(
        parse([*REQUIRED, "--epsilon", "1", "--rounds", "3", "--partition-rounds"])
    )
    assert "schedule" not in kwargs
    assert kwargs["rounds"] == 3 and kwargs["partition_rounds"]
    assert kwargs["resample_subspace"] is None  # the schedule's kind decides
    alone = fine_tune_kwargs(parse([*REQUIRED, "--epsilon", "1", "--resample-subspace"]))
    assert alone["resample_subspace"] is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--schedule", "poisson", "--rounds", "5"], "exactly one of sampling_rate"),
        (["--sampling-rate", "0.1"], "--sampling-rate: only with --schedule"),
        (["--schedule", "sequential", "--epochs", "2"], "--schedule sequential takes no --epochs"),
    ],
)
def test_schedule_options_are_checked(argv, message):
    with pytest.raises(InvalidParameterError, match=message):
        fine_tune_kwargs(parse([*REQUIRED, "--epsilon", "1", *argv]))


def test_an_unknown_name_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        parse([*REQUIRED, "--epsilon", "1", "--curvature", "ggm"])
    assert "invalid choice: 'ggm' (choose from 'ggn', 'kfac', 'fisher'" in capsys.readouterr().err


def test_demo_offers_the_same_options_with_its_own_defaults():
    args = parse(["mnist", "--schedule", "partitioned", "--rounds", "4", "--epochs", "2"], "demo")
    kwargs = fine_tune_kwargs(args)
    assert kwargs["epsilon"] == 1.0 and kwargs["subspace"] == "kronecker" and kwargs["k"] is None
    assert kwargs["schedule"] == {"kind": "partitioned", "rounds": 4, "epochs": 2}
    assert kwargs["progress"] is True
    mimic = fine_tune_kwargs(parse(["mimic", "--secure-noise"], "demo"))
    assert mimic["subspace"] == "auto" and mimic["secure_noise"] and mimic["rounds"] is None
    default = fine_tune_kwargs(parse(["mnist"], "demo"))
    assert {key: default.get(key) for key in ("k", "rounds", "curvature", "schedule")} == {
        "k": None,
        "rounds": None,
        "curvature": None,
        "schedule": None,
    }  # the library's recipe: the schedule follows from n (qem.defaults.default_schedule)


def test_the_recipe_table_is_fine_tunes_signature():
    """qem.defaults holds every default of fine_tune (the lead makes fine_tune read it)."""
    signature = {
        name: parameter.default
        for name, parameter in SIGNATURE.parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    assert dict(FINE_TUNE_DEFAULTS) == signature
    assert dict(COMMAND_LINE_DEFAULTS) == {**signature, "progress": True}


def test_the_loss_choices_are_the_librarys():
    from qem.cli.finetune import LOSS_NAMES
    from qem.losses import LOSSES

    assert set(LOSS_NAMES) == set(LOSSES)


def test_the_docs_name_secure_mode_by_the_apis_spellings():
    """fine_tune's keyword is secure_noise=True (--secure-noise); noise=SecureNoise() is the
    mechanism's constructor argument and appears only beside QuadraticExponentialMechanism."""
    theory = (Path(__file__).parents[1] / "docs" / "theory.md").read_text()
    assert "secure_noise=True" in theory and "--secure-noise" in theory
    for line in (line for line in theory.splitlines() if "noise=SecureNoise()" in line):
        assert "QuadraticExponentialMechanism(" in line, line
