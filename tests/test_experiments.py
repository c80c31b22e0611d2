"""Experiment runner, report and CLI, with a fake method and a fake scenario (the real methods
and scenarios are tested in their own files)."""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import statistics
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

from qem.baselines.registry import METHODS
from qem.cli import experiment as experiment_cli
from qem.datasets.scenarios import Scenario
from qem.errors import InvalidParameterError, OutputExistsError
from qem.experiments import cells as cells_module
from qem.experiments import registry as registry_module
from qem.experiments import report as report_module
from qem.experiments import runner as runner_module
from qem.experiments.config import load_config, parse_config
from qem.experiments.registry import Registry, accepted_hyperparameters, default_registry
from qem.experiments.releases import CellFailedError
from qem.experiments.report import write_report
from qem.experiments.runner import run_experiment
from qem.finetune import FineTuneResult, fine_tune
from qem.io import read_run
from qem.jsonfiles import write_json_atomic
from qem.privacy.accounting import ADD_OR_REMOVE, gdp_dp_event
from qem.privacy.gdp import calibrate_gdp_mu, gdp_epsilon
from qem.privacy.ledger import accountant_block

FIXTURES = Path(__file__).parent / "fixtures" / "experiments"
REPO = Path(__file__).parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CELL_KEYS = {
    "scenario", "method", "epsilon", "seed", "metric", "metric_name", "loss", "seconds",
    "peak_memory_mb", "hyperparameters", "grid_scores", "report",
}  # fmt: skip
FEATURES, CLASSES = 4, 3


def toy_scenario(seed: int = 0) -> Scenario:
    """Labels y = argmax(x W): a linear model with weight W^T is exactly right."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(FEATURES, CLASSES, generator=generator, dtype=torch.float64)

    def pair(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, FEATURES, generator=generator, dtype=torch.float64)
        return x, (x @ weight).argmax(dim=1)

    scenario = Scenario("toy", "toy", pair(30), pair(30), pair(40), pair(50))
    scenario.true_weight = weight.T.contiguous()  # type: ignore[attr-defined]
    return scenario


class Fakes:
    """A registry whose method sets the model to the true weights when ``good`` is True (zeros
    otherwise, which predicts class 0), records its calls with the noise it would draw (from
    its seed, and from torch's global generator) and raises ``error`` on call ``fail_at``."""

    def __init__(self, fail_at: int | None = None, error: BaseException | None = None) -> None:
        self.fail_at = fail_at
        self.error = error or RuntimeError("simulated crash")
        self.calls: list[dict] = []
        self.pretrained: list[nn.Module] = []
        self.scenario = toy_scenario()

    def method(self, model, loss_fn, public_data, private_data, *, epsilon, delta, adjacency,
               validation_data, seed, progress, good=False, scale=1.0):  # fmt: skip
        noise = float(np.random.default_rng(seed).standard_normal())
        self.calls.append({"epsilon": epsilon, "seed": seed, "good": good, "model": model,
                           "noise": noise, "torch_noise": float(torch.randn(()))})  # fmt: skip
        if len(self.calls) == self.fail_at:
            raise self.error
        with torch.no_grad():
            target = self.scenario.true_weight if good else torch.zeros_like(model.weight)
            model.weight.copy_(scale * target)
        report = {"epsilon": epsilon, "delta": delta, "seed": seed, "noise": noise}
        return FineTuneResult(model, report)

    def picky(self, model, loss_fn, public_data, private_data, *, epsilon, delta, adjacency,
              validation_data, seed, progress, threshold):  # fmt: skip
        """The true weights when epsilon <= threshold (zeros otherwise), so the best threshold
        depends on epsilon; the report accounts a mu-GDP Gaussian release calibrated to
        (epsilon, delta), as qem's reports do."""
        self.calls.append({"epsilon": epsilon, "seed": seed, "threshold": threshold})
        with torch.no_grad():
            good = epsilon <= threshold
            model.weight.copy_(
                self.scenario.true_weight if good else torch.zeros_like(model.weight)
            )
        mu = calibrate_gdp_mu(epsilon, delta)
        accountant = accountant_block(gdp_dp_event(mu), ADD_OR_REMOVE, name="fake", epsilon=epsilon,
                                      delta=delta)  # fmt: skip
        return FineTuneResult(model, {"epsilon": epsilon, "delta": delta, "accountant": accountant})

    def none(self, model, loss_fn, public_data, private_data, **kwargs):
        self.calls.append({"epsilon": kwargs["epsilon"], "seed": kwargs["seed"], "model": model})
        return FineTuneResult(model, {"epsilon": None})

    def pretrainer(self, scenario, spec, config, loss_fn, cache_dir, progress) -> nn.Module:
        model = nn.Linear(FEATURES, CLASSES, bias=False).double()
        nn.init.zeros_(model.weight)
        self.pretrained.append(model)
        return model

    def registry(self) -> Registry:
        return Registry(
            scenarios={"toy": lambda **options: self.scenario},
            methods={"fake": self.method, "picky": self.picky, "none": self.none},
            pretrainer=self.pretrainer,
        )


def toy_config(**changes) -> dict:
    config = {
        "name": "toy",
        "scenarios": [{"name": "toy"}],
        "methods": [
            {"name": "fake", "label": "fake_grid", "grid": {"good": [False, True]}},
            {"name": "none"},
        ],
        "epsilons": [1, 4],
        "seeds": [0, 1],
        "pretrain": {"epochs": 1, "seed": 0},
    }
    config.update(changes)
    return config


def expected_keys() -> set[str]:
    fake = {f"toy__fake_grid__eps{e}__seed{s}" for e in ("1.0", "4.0") for s in (0, 1)}
    return fake | {f"toy__none__epsnone__seed{s}" for s in (0, 1)}


def test_interrupted_sweep_resumes_without_duplicates_or_losses(tmp_path):
    # 4 fake cells x 2 grid points + 2 budget-free cells = 10 calls; call 5 is in cell 3.
    crashing = Fakes(fail_at=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(toy_config(), tmp_path, progress=False, registry=crashing.registry())
    cells = tmp_path / "cells"
    assert sorted(p.name for p in cells.iterdir()) == [
        "toy__fake_grid__eps1.0__seed0.json",
        "toy__fake_grid__eps1.0__seed1.json",
    ]  # two whole cells, and no temporary file of the interrupted one
    assert not (tmp_path / "results.json").exists()
    before = {p.name: p.read_bytes() for p in cells.iterdir()}

    resumed = Fakes()
    results = run_experiment(toy_config(), tmp_path, progress=False, registry=resumed.registry())
    assert len(resumed.calls) == 2 * 2 + 2  # only the 4 unfinished cells ran
    files = sorted(cells.iterdir())
    assert {p.stem for p in files} == expected_keys()
    assert all(p.suffix == ".json" and not p.name.startswith(".") for p in files)
    for name, content in before.items():
        assert (cells / name).read_bytes() == content
    for path in files:
        record = json.loads(path.read_text())
        assert set(record) >= CELL_KEYS
        assert record["key"] == path.stem
    rows = json.loads((tmp_path / "results.json").read_text())
    assert rows == results
    assert all(set(row) == {"scenario", "method", "epsilon", "seed", "metric", "seconds"}
               for row in rows)  # fmt: skip
    identities = {(r["scenario"], r["method"], r["epsilon"], r["seed"]) for r in rows}
    assert len(rows) == len(identities) == 6

    finished = Fakes()
    run_experiment(toy_config(), tmp_path, progress=False, registry=finished.registry())
    assert finished.calls == [] and finished.pretrained == []  # nothing left to do or load


def test_cell_records_the_choice_on_public_validation_and_the_test_metric(tmp_path):
    fakes = Fakes()
    config = toy_config(epsilons=[2], seeds=[3])
    config["methods"][0]["fixed"] = {"scale": 2.0}
    run_experiment(config, tmp_path, progress=False, registry=fakes.registry())
    record = json.loads((tmp_path / "cells" / "toy__fake_grid__eps2.0__seed3.json").read_text())
    test_y, valid_y = fakes.scenario.test[1], fakes.scenario.public_valid[1]
    zero_valid = float((valid_y == 0).double().mean())  # the zero model predicts class 0
    assert record["hyperparameters"] == {"good": True, "scale": 2.0}
    grid = [g["hyperparameters"] for g in record["grid_scores"]]
    assert grid == [{"good": False}, {"good": True}]
    assert [g["valid_metric"] for g in record["grid_scores"]] == pytest.approx([zero_valid, 1.0])
    assert record["valid_metric"] == 1.0
    assert (record["metric"], record["metric_name"]) == (1.0, "accuracy")
    assert (record["epsilon"], record["delta"], record["seed"]) == (2.0, 1e-5, 3)
    assert record["report"] == {"epsilon": 2.0, "delta": 1e-5, "seed": None,
                                "noise": fakes.calls[1]["noise"]}  # fmt: skip
    assert (record["reproducible"], record["noise_seed"]) == (False, None)
    assert set(record["seconds"]) == {"tuning", "fine_tune", "evaluate", "total"}
    assert record["seconds"]["total"] >= record["seconds"]["tuning"] >= 0
    assert record["peak_memory_mb"] > 0
    assert math.isfinite(record["loss"]) and record["loss"] > 0

    none = json.loads((tmp_path / "cells" / "toy__none__epsnone__seed3.json").read_text())
    assert none["epsilon"] is None and none["delta"] is None
    assert none["metric"] == pytest.approx(float((test_y == 0).double().mean()))
    assert [c["epsilon"] for c in fakes.calls] == [2.0, 2.0, None]
    # one pretraining for the scenario; every method got its own copy, never the original
    assert len(fakes.pretrained) == 1
    assert all(c["model"] is not fakes.pretrained[0] for c in fakes.calls)
    assert torch.count_nonzero(fakes.pretrained[0].weight) == 0


def test_default_pretrainer_caches_the_public_model_once_per_scenario(tmp_path):
    fakes = Fakes()
    registry = Registry(
        scenarios={"toy": lambda **options: fakes.scenario},
        methods={"none": fakes.none},
        pretrainer=registry_module.cached_pretrainer,
    )
    logreg = {"name": "logreg", "options": {"in_features": FEATURES, "out_features": CLASSES}}
    config = toy_config(methods=[{"name": "none"}], model=logreg)
    config["pretrain"] = {"epochs": 20, "lr": 0.05, "batch_size": 10, "seed": 0}
    cache = tmp_path / "cache"
    for run in ("a", "b"):
        run_experiment(config, tmp_path / run, progress=False, registry=registry, cache_dir=cache)
    assert len(list(cache.glob("toy-logreg-*.safetensors"))) == 1  # trained once, then loaded
    runs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/results.json"))]
    first, second = ([row["metric"] for row in rows] for rows in runs)
    assert first == second  # the same pretrained model, from the cache
    assert first[0] == first[1] > 0.6  # learnt from the public data; shared by the seeds


def test_rerun_with_a_changed_method_refuses_but_new_seeds_extend(tmp_path):
    run_experiment(toy_config(seeds=[0]), tmp_path, progress=False, registry=Fakes().registry())
    extended = Fakes()
    run_experiment(toy_config(seeds=[0, 1]), tmp_path, progress=False, registry=extended.registry())
    assert len(extended.calls) == 2 * 2 + 1  # only the seed-1 cells
    changed = toy_config(seeds=[0, 1])
    changed["methods"][0]["grid"] = {"good": [True]}
    with pytest.raises(OutputExistsError, match="different configuration"):
        run_experiment(changed, tmp_path, progress=False, registry=Fakes().registry())


def test_unknown_names_and_hyperparameters_fail_before_any_work(tmp_path):
    fakes = Fakes()
    config = toy_config(methods=[{"name": "dpsgd"}])
    with pytest.raises(InvalidParameterError, match="unknown method 'dpsgd'"):
        run_experiment(config, tmp_path, progress=False, registry=fakes.registry())
    config = toy_config(scenarios=[{"name": "mnist_s9"}])
    with pytest.raises(InvalidParameterError, match="unknown scenario 'mnist_s9'"):
        run_experiment(config, tmp_path, progress=False, registry=fakes.registry())
    config = toy_config(methods=[{"name": "fake", "fixed": {"learning_rate": 0.1}}])
    with pytest.raises(InvalidParameterError, match="learning_rate"):
        run_experiment(config, tmp_path, progress=False, registry=fakes.registry())
    assert fakes.calls == [] and fakes.pretrained == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
        ({"epsilons": []}, "epsilons must be a non-empty list"),
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"methods": []}, "methods must be a non-empty list"),
        ({"epsilons": [1, 0]}, r"epsilons\[1\] must be > 0"),
        ({"epsilons": [1, 1.0]}, "epsilons must be unique"),
        ({"seeds": [0, -1]}, r"seeds\[1\] must be an integer >= 0"),
        ({"delta": 1.5}, r"delta must lie in \(0, 1\)"),
        ({"adjacency": "swap"}, "adjacency must be one of"),
        ({"loss": "hinge"}, "loss must be one of"),
        ({"pretrain": {"epochs": 1}}, r"pretrain: missing required key\(s\) \['seed'\]"),
        ({"pretrain": {"epochs": 1, "seed": 0, "momentum": 0.9}}, "momentum"),
        ({"scenarios": [{"name": "toy", "opts": {}}]}, r"scenarios\[0\]: unknown key"),
        ({"methods": [{"name": "fake", "grid": {"k": []}}]}, r"grid\['k'\] must be a non-empty"),
        ({"methods": [{"name": "fake", "fixed": {"epsilon": 1}}]}, "set by the runner"),
        ({"methods": [{"name": "fake", "grid": {"k": [1]}, "fixed": {"k": 2}}]}, "both grid"),
        ({"methods": [{"name": "fake"}, {"name": "fake"}]}, "method labels must be unique"),
        ({"methods": [{"name": "fake", "label": "a__b"}]}, "no '__'"),
        ({"methods": [{"name": "fake", "fixed": {"noise": False}}]}, "for tests only"),
        ({"reproducible": "yes"}, "reproducible must be true or false"),
    ],
)
def test_config_validation_errors_say_what_to_change(change, message):
    with pytest.raises(InvalidParameterError, match=message):
        parse_config(toy_config(**change))


def test_missing_key_and_bad_json_file(tmp_path):
    config = toy_config()
    del config["seeds"]
    with pytest.raises(InvalidParameterError, match=r"missing required key\(s\) \['seeds'\]"):
        parse_config(config)
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(InvalidParameterError, match="not valid JSON"):
        load_config(path)


def test_example_config_is_valid():
    config = load_config(REPO / "configs" / "smoke.json")
    assert config.name == "smoke" and config.epsilons == (1.0, 8.0)
    assert parse_config(config.to_dict()) == config


def test_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "cell.json"
    write_json_atomic(path, {"metric": 0.5})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"metric": math.nan})  # strict JSON refuses NaN
    monkeypatch.setattr(runner_module.os, "replace", _fail_replace)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"metric": 0.9})
    assert json.loads(path.read_text()) == {"metric": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["cell.json"]


def _fail_replace(source, target):
    raise OSError("disk full")


def parse_tables(markdown: str) -> dict[tuple[str, str], dict[str, dict[str, str]]]:
    """{(scenario, table title): {row name: {column name: text}}} from ``results.md``."""
    tables: dict = {}
    scenario = title = None
    header: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("## "):
            scenario, title, header = line[3:].split(" ")[0], None, []
        elif line.startswith("### "):
            title, header = line[4:], []
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not header:
                header = cells
            elif set(cells) != {"---"}:
                tables.setdefault((scenario, title), {})[cells[0]] = dict(
                    zip(header, cells, strict=True)
                )
    return tables


def parse_mean_sd(text: str) -> tuple[float, float | None]:
    match = re.fullmatch(r"(-?[\d.]+)(?: ± ([\d.]+))?(?: \(.*\))*", text)
    assert match, text
    return float(match[1]), None if match[2] is None else float(match[2])


def fixture_cells() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((FIXTURES / "cells").glob("*.json"))]


def test_report_tables_equal_the_fixture_cells_and_plots_are_png(tmp_path):
    written = write_report(FIXTURES, tmp_path)
    assert {p.name for p in written} == {
        "results.md", "summary.json", "privacy_utility_mnist_s1.png",
        "privacy_utility_mimic_mort_icu.png", "seconds.png", "metric_vs_seconds.png",
    }  # fmt: skip
    markdown = (tmp_path / "results.md").read_text()
    tables = parse_tables(markdown)
    cells = fixture_cells()
    checked = 0
    for (scenario, title), rows in tables.items():
        field = {"Test accuracy": "metric", "Test AUROC": "metric"}.get(title)
        field = "fine_tune" if title == "Fine-tuning seconds" else field
        if field is None:
            continue
        digits = 2 if field == "fine_tune" else 4
        for method, columns in rows.items():
            for column, text in list(columns.items())[1:]:
                epsilon = None if column == "no budget" else float(column.removeprefix("ε = "))
                values = [
                    c["seconds"]["fine_tune"] if field == "fine_tune" else c[field]
                    for c in cells
                    if (c["scenario"], c["method"], c["epsilon"]) == (scenario, method, epsilon)
                ]
                finite = [v for v in values if v is not None]
                if not values:
                    assert text == "—"
                    continue
                mean, sd = parse_mean_sd(text)
                if field == "fine_tune":  # the median, no spread
                    assert sd is None
                    assert mean == pytest.approx(statistics.median(finite), abs=0.6e-2)
                    checked += 1
                    continue
                assert mean == pytest.approx(statistics.fmean(finite), abs=0.6 * 10**-digits)
                if len(finite) > 1:
                    assert sd == pytest.approx(statistics.stdev(finite), abs=0.6 * 10**-digits)
                checked += 1
    assert checked == 2 * 6 + 2 * 3  # filled entries of the metric and seconds tables
    s1 = tables[("mnist_s1", "Test accuracy")]
    assert s1["qem_T2"]["ε = 1"] == "0.9200 ± 0.0200"  # (0.90, 0.92, 0.94), written by hand
    assert s1["none"]["no budget"] == "0.8533 ± 0.0058"
    assert tables[("mimic_mort_icu", "Test AUROC")]["dpsgd"]["ε = 1"] == "0.6600 (1 null)"
    ratio = tables[("mnist_s1", "Seconds ratio DP-SGD / qem")]["dpsgd / qem_T2"]
    medians = [statistics.median([c["seconds"]["fine_tune"] for c in cells if c["scenario"]
               == "mnist_s1" and c["method"] == m and c["epsilon"] == 1.0])
               for m in ("dpsgd", "qem_T2")]  # fmt: skip
    assert float(ratio["ε = 1"]) == pytest.approx(medians[0] / medians[1], abs=0.005)
    assert "## mimic_mort_icu (SYNTHETIC" in markdown
    assert "'(k null)' means k of the seeds' runs had no finite value" in markdown
    assert "cells present" not in markdown  # no config.json: the whole sweep is unknown
    summary = json.loads((tmp_path / "summary.json").read_text())
    entry = next(e for e in summary if (e["scenario"], e["method"], e["epsilon"])
                 == ("mnist_s1", "qem_T2", 1.0))  # fmt: skip
    assert entry["metric_mean"] == pytest.approx(0.92) and entry["seeds"] == 3
    for path in written[2:]:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 200 and width > 200


def test_cli_run_and_report(tmp_path, monkeypatch, capsys):
    fakes = Fakes()
    monkeypatch.setattr(runner_module, "default_registry", fakes.registry)
    config_path = tmp_path / "toy.json"
    config_path.write_text(json.dumps(toy_config()))
    parser = experiment_parser()
    run_dir = tmp_path / "run"
    args = parser.parse_args(["experiment", "run", str(config_path), "--out", str(run_dir),
                              "--no-progress"])  # fmt: skip
    assert args.handler(args) == 0
    assert len(json.loads((run_dir / "results.json").read_text())) == 6
    args = parser.parse_args(["experiment", "report", str(run_dir), "--out", str(tmp_path / "r")])
    assert args.handler(args) == 0
    markdown = (tmp_path / "r" / "results.md").read_text()
    assert markdown.startswith("# Experiment results: toy")
    assert "| fake_grid | 1.0000 ± 0.0000 | 1.0000 ± 0.0000 | — |" in markdown
    assert str(tmp_path / "r" / "seconds.png") in capsys.readouterr().out


def experiment_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qem")
    experiment_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def single_cell_config(**changes) -> dict:
    """One cell of the fake method with grid good = [False, True]."""
    return toy_config(methods=toy_config()["methods"][:1], epsilons=[1], seeds=[0], **changes)


def test_noise_is_fresh_for_every_release_unless_the_sweep_is_reproducible(tmp_path):
    runs = {}
    for run, reproducible in (("a", False), ("b", False), ("c", True), ("d", True)):
        fakes = Fakes()
        config = toy_config(reproducible=reproducible)
        run_experiment(config, tmp_path / run, progress=False, registry=fakes.registry())
        runs[run] = [call for call in fakes.calls if "noise" in call]
        assert len(runs[run]) == 2 * 2 * 2  # epsilons x seeds x grid points
        for source in ("noise", "torch_noise"):  # the method's own draw; torch's global one
            draws = [call[source] for call in runs[run]]
            assert len(set(draws)) == len(draws)  # no two releases of a sweep share noise
    draws = {run: {call[s] for call in calls for s in ("noise", "torch_noise")}
             for run, calls in runs.items()}  # fmt: skip
    assert not draws["a"] & draws["b"]  # OS entropy: a rerun draws new noise
    assert all(call["seed"] is None for call in runs["a"] + runs["b"])
    assert draws["c"] == draws["d"] and not draws["c"] & draws["a"]  # reproducible reruns
    assert [c["seed"] for c in runs["c"]] == [c["seed"] for c in runs["d"]]
    seeds = [call["seed"] for call in runs["c"]]
    assert all(isinstance(seed, int) for seed in seeds) and len(set(seeds)) == len(seeds)
    for run, reproducible in (("a", False), ("c", True)):
        for path in (tmp_path / run / "cells").glob("toy__fake_grid__*.json"):
            record = json.loads(path.read_text())
            assert record["reproducible"] is reproducible
            grid_seeds = [entry["noise_seed"] for entry in record["grid_scores"]]
            assert record["noise_seed"] == grid_seeds[1] == record["report"]["seed"]  # chosen
            assert all((seed is None) is (not reproducible) for seed in grid_seeds)


def test_a_sweep_resumes_only_with_the_noise_setting_it_started_with(tmp_path):
    run_experiment(toy_config(seeds=[0]), tmp_path, progress=False, registry=Fakes().registry())
    fakes = Fakes()
    with pytest.raises(OutputExistsError, match="reproducible = False, this run has True"):
        run_experiment(toy_config(seeds=[0], reproducible=True), tmp_path, progress=False,
                       registry=fakes.registry())  # fmt: skip
    path = tmp_path / "cells" / "toy__fake_grid__eps1.0__seed0.json"
    record = json.loads(path.read_text())
    del record["reproducible"]  # as written before cells recorded it
    path.write_text(json.dumps(record))
    with pytest.raises(OutputExistsError, match="before cells recorded how their noise"):
        run_experiment(toy_config(seeds=[0]), tmp_path, progress=False, registry=fakes.registry())
    assert fakes.calls == []


def test_cli_reproducible_flag_reaches_the_config(tmp_path, monkeypatch):
    fakes = Fakes()
    monkeypatch.setattr(runner_module, "default_registry", fakes.registry)
    config_path = tmp_path / "toy.json"
    config_path.write_text(json.dumps(toy_config()))  # no "reproducible" key: false
    run_dir = tmp_path / "run"
    args = experiment_parser().parse_args(
        ["experiment", "run", str(config_path), "--out", str(run_dir), "--no-progress",
         "--reproducible"]
    )  # fmt: skip
    assert args.handler(args) == 0
    assert json.loads((run_dir / "config.json").read_text())["reproducible"] is True
    records = [json.loads(p.read_text()) for p in (run_dir / "cells").glob("*.json")]
    assert len(records) == 6 and all(record["reproducible"] is True for record in records)
    assert all(isinstance(call["seed"], int) for call in fakes.calls)


def test_releases_reach_disk_before_scoring_and_a_failed_cell_names_them(tmp_path, monkeypatch):
    def unreadable_test_set(*args, **kwargs):
        raise RuntimeError("test set unreadable")

    monkeypatch.setattr(cells_module, "evaluate_loss", unreadable_test_set)
    fakes = Fakes()
    config = single_cell_config()
    partial = tmp_path / "cells" / "toy__fake_grid__eps1.0__seed0.partial"
    with pytest.raises(CellFailedError, match=re.escape(str(partial))) as caught:
        run_experiment(config, tmp_path, progress=False, registry=fakes.registry())
    assert "test set unreadable" in str(caught.value) and caught.value.saved == partial
    assert not (tmp_path / "cells" / "toy__fake_grid__eps1.0__seed0.json").exists()
    targets = [torch.zeros(CLASSES, FEATURES, dtype=torch.float64), fakes.scenario.true_weight]
    seconds = []
    for index, target in enumerate(targets):
        saved = read_run(partial / f"point{index}")  # the released model and report
        assert torch.equal(saved.state_dict["weight"], target)
        assert saved.report["noise"] == fakes.calls[index]["noise"]
        record = json.loads((partial / f"point{index}.json").read_text())
        assert record["hyperparameters"] == {"good": bool(index)}
        seconds.append(record["seconds"])

    monkeypatch.undo()
    resumed = Fakes()
    run_experiment(config, tmp_path, progress=False, registry=resumed.registry())
    assert resumed.calls == []  # both releases loaded: no new noise drawn on the private data
    cell = json.loads((tmp_path / "cells" / "toy__fake_grid__eps1.0__seed0.json").read_text())
    assert cell["metric"] == 1.0 and cell["report"]["noise"] == fakes.calls[1]["noise"]
    assert [entry["seconds"] for entry in cell["grid_scores"]] == seconds
    assert not partial.exists()  # the finished cell's JSON replaces them


def test_a_method_failing_after_a_saved_grid_point_keeps_that_release(tmp_path):
    partial = tmp_path / "cells" / "toy__fake_grid__eps1.0__seed0.partial"
    with pytest.raises(CellFailedError, match="simulated crash"):
        run_experiment(single_cell_config(), tmp_path, progress=False,
                       registry=Fakes(fail_at=2).registry())  # fmt: skip
    assert sorted(p.name for p in partial.iterdir()) == ["point0", "point0.json"]

    changed = single_cell_config()
    changed["methods"][0]["grid"] = {"good": [True, False]}
    with pytest.raises(OutputExistsError, match="release of another configuration"):
        run_experiment(changed, tmp_path, progress=False, registry=Fakes().registry())

    resumed = Fakes()
    run_experiment(single_cell_config(), tmp_path, progress=False, registry=resumed.registry())
    assert [call["good"] for call in resumed.calls] == [True]  # only the unsaved grid point


def test_ctrl_c_prints_the_resume_command_and_keeps_finished_cells(tmp_path, monkeypatch, capsys):
    # 4 fake cells x 2 grid points; call 6 is the second grid point of cell 3 (eps 4, seed 0)
    interrupted = Fakes(fail_at=6, error=KeyboardInterrupt())
    monkeypatch.setattr(runner_module, "default_registry", interrupted.registry)
    config_path = tmp_path / "toy.json"
    config_path.write_text(json.dumps(toy_config()))
    run_dir = tmp_path / "run"
    argv = ["experiment", "run", str(config_path), "--out", str(run_dir), "--no-progress"]
    parser = experiment_parser()
    args = parser.parse_args(argv)
    assert args.handler(args) == 130
    command = shlex.join(["qem", *argv])
    assert command in capsys.readouterr().err
    assert sorted(p.name for p in (run_dir / "cells").iterdir()) == [
        "toy__fake_grid__eps1.0__seed0.json",
        "toy__fake_grid__eps1.0__seed1.json",
        "toy__fake_grid__eps4.0__seed0.partial",
    ]

    resumed = Fakes()
    monkeypatch.setattr(runner_module, "default_registry", resumed.registry)
    args = parser.parse_args(shlex.split(command)[1:])
    assert args.handler(args) == 0
    assert len(resumed.calls) == 1 + 2 + 2  # cell 3's unsaved point, cell 4, the 2 none cells
    assert {p.stem for p in (run_dir / "cells").iterdir()} == expected_keys()


def test_report_says_which_cells_of_the_sweep_are_missing(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_experiment(toy_config(), run_dir, progress=False, registry=Fakes().registry())
    for key in ("toy__fake_grid__eps4.0__seed1", "toy__none__epsnone__seed0"):
        (run_dir / "cells" / f"{key}.json").unlink()
    args = experiment_parser().parse_args(["experiment", "report", str(run_dir)])
    assert args.handler(args) == 0
    missing = "toy__fake_grid__eps4.0__seed1, toy__none__epsnone__seed0"
    line = f"4 of 6 cells present; missing: {missing}."
    assert line in capsys.readouterr().out
    assert line in (run_dir / "results.md").read_text()
    monkeypatch.setattr(report_module, "MISSING_LISTED", 1)
    write_report(run_dir)
    line = "4 of 6 cells present; missing: toy__fake_grid__eps4.0__seed1 and 1 more."
    assert line in (run_dir / "results.md").read_text()


def test_hyperparameters_are_checked_against_the_function_they_reach(tmp_path):
    qem_accepts = accepted_hyperparameters(METHODS["qem"], fine_tune)
    assert {"k", "rounds", "subspace", "damping", "clip_norm"} <= qem_accepts
    assert {"lr", "epochs", "batch_size"} <= accepted_hyperparameters(METHODS["dpsgd"])
    registry_module.check_registry(load_config(REPO / "configs" / "smoke.json"), default_registry())
    for method in ("qem", "qem_identity", "dpsgd"):
        methods = [{"name": method, "fixed": {"learning_rate": 0.1}}]
        config = toy_config(scenarios=[{"name": "mnist_s1"}], methods=methods)
        with pytest.raises(InvalidParameterError, match=r"hyperparameter\(s\) \['learning_rate'\]"):
            run_experiment(config, tmp_path / method, progress=False)
        assert not (tmp_path / method).exists()  # refused before anything was built or written
    fakes = Fakes()  # a method taking **kwargs it passes nowhere the registry names
    config = toy_config(methods=[{"name": "none", "fixed": {"epochs": 1}}])
    with pytest.raises(InvalidParameterError, match=r"no hyperparameter\(s\) \['epochs'\]"):
        run_experiment(config, tmp_path / "none", progress=False, registry=fakes.registry())


def test_tuning_epsilon_serving_each_epsilon_is_the_nearest_on_a_log_scale():
    tuning = parse_config(toy_config(tuning={"epsilons": [8, 1], "seed": 0})).tuning
    served = {eps: tuning.serving(eps) for eps in (0.1, 0.5, 1, 2, 2.8, 2.9, 4, 8, 100)}
    assert served == {0.1: 1, 0.5: 1, 1: 1, 2: 1, 2.8: 1, 2.9: 8, 4: 8, 8: 8, 100: 8}
    for change, message in (({"epsilons": []}, "non-empty"), ({"seed": -1}, "integer >= 0"),
                            ({"rounds": 3}, "unknown key")):  # fmt: skip
        with pytest.raises(InvalidParameterError, match=message):
            parse_config(toy_config(tuning={"epsilons": [1], "seed": 0, **change}))
    assert parse_config(toy_config()).tuning is None  # without it: every cell tunes itself


def tuned_config(**changes) -> dict:
    """The picky method (best threshold 2 at epsilon 1, 16 at epsilon 8), tuned at 1 and 8."""
    methods = [{"name": "picky", "grid": {"threshold": [2, 16]}}, {"name": "none"}]
    return toy_config(methods=methods, epsilons=[0.5, 1, 2, 4, 8], seeds=[0, 1],
                      tuning={"epsilons": [1, 8], "seed": 0}, **changes)  # fmt: skip


def test_tuning_split_serves_every_epsilon_and_accounts_the_grid_beside_each_cell(tmp_path):
    fakes = Fakes()
    run_experiment(tuned_config(reproducible=True), tmp_path, progress=False,
                   registry=fakes.registry())  # fmt: skip
    tuning = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "tuning").glob("*.json")}
    assert sorted(tuning) == ["toy__picky__eps1.0__seed0", "toy__picky__eps8.0__seed0"]
    assert tuning["toy__picky__eps1.0__seed0"]["hyperparameters"] == {"threshold": 2}  # tie: 1st
    assert tuning["toy__picky__eps8.0__seed0"]["hyperparameters"] == {"threshold": 16}
    picky = [call for call in fakes.calls if "threshold" in call]
    assert len(picky) == 2 * 2 + 5 * 2  # two grids of two points, then one release per cell
    seeds = [call["seed"] for call in picky]
    assert len(set(seeds)) == len(seeds)  # the eps-1 seed-0 cell draws apart from its tuning
    delta = 1e-5
    for eps in (0.5, 1.0, 2.0, 4.0, 8.0):
        tuned_at = 1.0 if eps <= 2 else 8.0
        for seed in (0, 1):
            record = json.loads((tmp_path / "cells" / f"toy__picky__eps{eps}__seed{seed}.json")
                                .read_text())  # fmt: skip
            assert record["hyperparameters"] == {"threshold": 2 if eps <= 2 else 16}
            assert record["metric"] == 1.0 and len(record["grid_scores"]) == 1
            assert record["tuning"]["epsilon"] == tuned_at
            assert record["tuning"]["grid_points"] == 2
            assert record["tuning"]["key"] == f"toy__picky__eps{tuned_at}__seed0"
            # independent check: the grid's two releases and the cell's, each mu-GDP, compose
            # to sqrt(sum mu^2)-GDP; PLD is a slightly pessimistic discretisation of it
            grid_mu, own_mu = calibrate_gdp_mu(tuned_at, delta), calibrate_gdp_mu(eps, delta)
            grid = gdp_epsilon(math.sqrt(2) * grid_mu, delta)
            total = gdp_epsilon(math.sqrt(2 * grid_mu**2 + own_mu**2), delta)
            spent = record["budget_spent_by_tuning"]
            assert spent["releases"] == 3
            assert total - 1e-6 <= spent["epsilon"] <= total * 1.01 + 1e-3
            assert grid - 1e-6 <= record["tuning"]["budget"]["epsilon"] <= grid * 1.01 + 1e-3

    rerun = Fakes()
    run_experiment(tuned_config(reproducible=True), tmp_path, progress=False,
                   registry=rerun.registry())  # fmt: skip
    assert rerun.calls == []

    report_dir = tmp_path / "report"
    write_report(tmp_path, report_dir)
    markdown = (report_dir / "results.md").read_text()
    tables = parse_tables(markdown)
    behind = tables[("toy", "Tuning behind each column")]["picky"]
    grid_spent = json.loads((tmp_path / "cells" / "toy__picky__eps0.5__seed0.json").read_text())
    text = f"ε 1: 2 points, ε {grid_spent['tuning']['budget']['epsilon']:.3g} together"
    assert behind["ε = 0.5"] == behind["ε = 2"] == text
    assert behind["ε = 4"].startswith("ε 8: 2 points")
    spent = tables[("toy", "Budget spent, tuning included")]["picky"]
    assert float(spent["ε = 0.5"]) == pytest.approx(
        grid_spent["budget_spent_by_tuning"]["epsilon"], abs=6e-4
    )
    assert float(spent["ε = 8"]) > 8  # the column's epsilon is only the last release
    assert (
        "no budget" not in spent and "none" not in tables[("toy", "Budget spent, tuning included")]
    )
    assert "(2 of 2 tuning cells)" in markdown
    grid_rows = [line for line in markdown.splitlines() if line.startswith("| toy | picky |")]
    assert len(grid_rows) == 4 and sum(line.endswith("| yes |") for line in grid_rows) == 2
    summary = json.loads((report_dir / "summary.json").read_text())
    entry = next(e for e in summary if e["method"] == "picky" and e["epsilon"] == 4.0)
    assert entry["tuning"]["hyperparameters"] == {"threshold": 16}
    assert entry["epsilon_spent_with_tuning"] == pytest.approx(float(spent["ε = 4"]), rel=1e-2)


def test_a_cell_whose_tuning_cell_chose_otherwise_is_refused(tmp_path):
    run_experiment(tuned_config(), tmp_path, progress=False, registry=Fakes().registry())
    path = tmp_path / "tuning" / "toy__picky__eps8.0__seed0.json"
    record = json.loads(path.read_text())
    record["hyperparameters"] = {"threshold": 2}  # as if it had been recomputed
    path.write_text(json.dumps(record))
    fakes = Fakes()
    with pytest.raises(OutputExistsError, match=re.escape("now chose {'threshold': 2}")):
        run_experiment(tuned_config(), tmp_path, progress=False, registry=fakes.registry())
    assert fakes.calls == []
    path.unlink()  # a missing tuning cell is recomputed first, then its cells are checked
    again = Fakes()
    run_experiment(tuned_config(), tmp_path, progress=False, registry=again.registry())
    assert [call["epsilon"] for call in again.calls] == [8.0, 8.0]  # the grid, nothing else


def test_a_grid_may_be_a_union_of_products():
    config = toy_config(methods=[{"name": "fake", "grid": [
        {"good": [False], "scale": [1.0, 2.0]}, {"good": [True], "scale": [3.0]}]}])  # fmt: skip
    method = parse_config(config).methods[0]
    assert method.grid_points() == [{"good": False, "scale": 1.0}, {"good": False, "scale": 2.0},
                                    {"good": True, "scale": 3.0}]  # fmt: skip
    assert parse_config(parse_config(config).to_dict()) == parse_config(config)
    for grid, message in (([], "non-empty list"), ([{"good": []}], r"grid\[0\]\['good'\]")):
        with pytest.raises(InvalidParameterError, match=message):
            parse_config(toy_config(methods=[{"name": "fake", "grid": grid}]))


def test_a_tiny_sweep_of_the_real_methods_on_digits_runs_end_to_end(tmp_path):
    """The real registry: scikit-learn's digits, qem (sequential and partitioned rounds) tuned on
    public validation at epsilon 1 and 8, DP-SGD with fixed hyperparameters (its calibration
    is the slow part), and the report's new columns."""
    logreg = {"name": "logreg", "options": {"in_features": 64, "out_features": 10}}
    sizes = {"public_size": 100, "valid_size": 100, "private_size": 200, "test_size": 300}
    schedules = [{"kind": "sequential", "rounds": 1}, {"kind": "partitioned", "rounds": 2}]
    public_side = {"subspace": "identity", "resample_subspace": False, "curvature": "ggn"}
    config = {
        "name": "digits-tiny",
        "scenarios": [{"name": "digits", "options": sizes, "model": logreg}],
        "methods": [
            {"name": "qem", "grid": {"schedule": schedules}, "fixed": public_side},
            {"name": "dpsgd", "fixed": {"lr": 0.01, "epochs": 1, "batch_size": 64}},
            {"name": "none"},
        ],
        "epsilons": [1, 8],
        "seeds": [0],
        "pretrain": {"epochs": 5, "lr": 0.01, "batch_size": 32, "seed": 0},
        "tuning": {"epsilons": [1, 8], "seed": 0},
    }
    run_dir = tmp_path / "run"
    run_experiment(config, run_dir, progress=False, cache_dir=tmp_path / "cache")
    assert sorted(p.stem for p in (run_dir / "tuning").glob("*.json")) == [
        "digits__qem__eps1.0__seed0", "digits__qem__eps8.0__seed0"
    ]  # fmt: skip
    write_report(run_dir)
    markdown = (run_dir / "results.md").read_text()
    tables = parse_tables(markdown)
    cells = {p.stem: json.loads(p.read_text()) for p in (run_dir / "cells").glob("*.json")}
    for eps in (1.0, 8.0):
        column, qem = f"ε = {eps:g}", cells[f"digits__qem__eps{eps}__seed0"]
        rounds = len(qem["report"]["step_lengths"])
        assert rounds == qem["hyperparameters"]["schedule"]["rounds"]
        fraction = float(tables[("digits", "Rounds with step 0")]["qem"][column])
        assert fraction == pytest.approx(qem["report"]["zero_step_rounds"] / rounds, abs=0.006)
        assert qem["tuning"]["epsilon"] == eps and qem["tuning"]["grid_points"] == 2
        spent = float(tables[("digits", "Budget spent, tuning included")]["qem"][column])
        assert spent == pytest.approx(qem["budget_spent_by_tuning"]["epsilon"], abs=6e-4)
        assert spent > qem["tuning"]["budget"]["epsilon"] > eps  # three releases > two > one
        behind = tables[("digits", "Tuning behind each column")]["qem"][column]
        assert behind.startswith(f"ε {eps:g}: 2 points, ε ")
        assert "tuning" not in cells[f"digits__dpsgd__eps{eps}__seed0"]  # nothing to tune
    accuracy = tables[("digits", "Test accuracy")]
    assert set(accuracy) == {"qem", "dpsgd", "none"}
    assert all(0 < parse_mean_sd(accuracy["qem"][f"ε = {eps}"])[0] <= 1 for eps in (1, 8))
    assert "binomial standard error of one test accuracy" in markdown
    assert "dpsgd" not in tables[("digits", "Budget spent, tuning included")]  # one release
