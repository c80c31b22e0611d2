"""The command-line options of ``qem.fine_tune``, declared once.

``FINE_TUNE_OPTIONS`` lists every keyword of ``fine_tune`` the command line exposes (with its
type, choices and help); ``SCHEDULE_OPTIONS`` the parameters of the round schedules
(qem.schedules) beyond ``rounds``; ``NOT_EXPOSED`` the keywords deliberately left out, each
with the reason. ``qem finetune`` and ``qem demo`` generate their arguments from these tables
(:func:`add_fine_tune_arguments`), check their values (:func:`check_values`) and collect the
keywords for ``fine_tune`` from them (:func:`fine_tune_kwargs`), with the defaults of the
recipe table qem.defaults; a test checks that every keyword of ``fine_tune`` is either exposed
or listed in ``NOT_EXPOSED``.

This module imports nothing heavy (no torch, numpy or dp-accounting until a value is checked
or --layers names a type), so that ``--help`` and argument errors answer at once; ``qem
preview`` and ``qem audit`` declare their privacy budget arguments from the same table
(:func:`add_budget_arguments`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from qem.defaults import COMMAND_LINE_DEFAULTS, FINE_TUNE_DEFAULTS, SUBSPACE_K
from qem.errors import InvalidParameterError


@dataclass(frozen=True)
class Option:
    """One command-line option: ``--keyword-with-dashes`` (or ``flag``) stored as ``keyword``.

    Without ``type`` or ``choices`` it is an on/off switch (``negate``: the switch turns the
    keyword off, as ``--no-progress``). ``choices`` are the accepted names (a test checks them
    against the library's registries); ``nargs`` is argparse's (``"+"``: one or more values,
    given as a list; ``"?"``: an optional value, ``const`` when the flag comes alone)."""

    keyword: str
    help: str
    group: str
    type: type | Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    negate: bool = False
    nargs: str | None = None
    const: object = None

    @property
    def is_switch(self) -> bool:
        """An on/off option without a value."""
        return self.type is None and self.choices is None

    @property
    def flags(self) -> list[str]:
        """The option strings."""
        if self.flag is not None:
            return [self.flag]
        return ["--" + self.keyword.replace("_", "-")]


def layer_spec(text: str) -> Any:
    """One --layers entry: a torch.nn class name (``Linear``) or a dotted path to an nn.Module
    subclass (``torch.nn.Linear``, ``mypackage.blocks.Adapter``) is that type; anything else
    is a module name (``classifier``, ``bert.encoder.layer.0``). Imports torch, so it runs in
    :func:`fine_tune_kwargs`, not while parsing."""
    from torch import nn

    if "." in text:
        module, _, name = text.rpartition(".")
        try:
            candidate = getattr(importlib.import_module(module), name, None)
        except (ImportError, ValueError):  # not an importable module path: a module name
            candidate = None
    else:
        candidate = getattr(nn, text, None)
    if isinstance(candidate, type) and issubclass(candidate, nn.Module):
        return candidate
    return text


BUDGET = "privacy budget"
ROUNDS = "rounds (docs/theory.md §8, §13)"
METHOD = "subspace and curvature"
STEP = "clipping and step length"
RUN = "run"

FINE_TUNE_OPTIONS: tuple[Option, ...] = (
    Option("epsilon", "target epsilon (> 0)", BUDGET, float),
    Option("delta", "target delta in (0, 1), Gaussian-DP mode only", BUDGET, float),
    Option(
        "mode",
        "gdp: Gaussian DP, unbounded domain; pure: eps-DP on the ball ||w||_A <= R by exact "
        "rejection sampling",
        BUDGET,
        choices=("gdp", "pure"),
    ),
    Option("adjacency", "neighbouring datasets", BUDGET, choices=("replace_one", "add_remove")),
    Option(
        "clipping",
        "norm of per-example gradient clipping (dual: ||g||_{A^-1})",
        BUDGET,
        choices=("dual", "euclidean"),
    ),
    Option(
        "N",
        "declared public dataset size (required for add_remove; default: the number of private "
        "records)",
        BUDGET,
        int,
    ),
    Option(
        "schedule",
        "which records each round reads: sequential (all, every round), partitioned (disjoint "
        "chunks; with --epochs) or poisson (each record with probability --sampling-rate); "
        "default: from the number n of private records, one sequential round up to 2,048 "
        "records, else Poisson rounds of 1,024 expected records over one expected epoch (at "
        "most 100 rounds); --rounds alone: sequential, or partitioned with --partition-rounds",
        ROUNDS,
        choices=("sequential", "partitioned", "poisson"),
    ),
    Option("rounds", "number of re-linearised rounds T", ROUNDS, int),
    Option(
        "resample_subspace",
        "a new public subspace every round, or every R rounds with a value (default: every "
        "round when rounds read different records, as partitioned and poisson do; one subspace "
        "for sequential rounds)",
        ROUNDS,
        int,
        nargs="?",
        const=True,
    ),
    Option(
        "partition_rounds",
        "without --schedule: round t reads only the t-th of T disjoint chunks (replace_one, gdp)",
        ROUNDS,
    ),
    Option(
        "subspace",
        "the subspace P of the update theta + P w (default auto: kronecker when every trainable "
        "parameter is in a Linear/Conv2d layer, srht otherwise)",
        METHOD,
        choices=("auto", "identity", "last_layer", "biases", "dense", "srht", "kronecker"),
    ),
    Option(
        "k",
        f"subspace dimension (default min(d, {SUBSPACE_K}) for dense/srht/kronecker, d the "
        "number of parameters spanned; fixed by the parameters for identity/last_layer/biases)",
        METHOD,
        int,
    ),
    Option("subspace_seed", "public seed of P", METHOD, int),
    Option(
        "layers",
        "fine-tune only these modules: module names (classifier, bert.pooler.dense) or module "
        "types (Linear, torch.nn.Conv2d: every module of that type); kronecker spans their "
        "Linear/Conv2d layers, the other subspaces their trainable parameters (default: all)",
        METHOD,
        str,
        nargs="+",
    ),
    Option(
        "curvature",
        "public curvature H0 of A = P^T H0 P + gamma I (default: kfac with the kronecker "
        "subspace, ggn with any other)",
        METHOD,
        choices=("ggn", "kfac", "fisher", "hessian", "identity"),
    ),
    Option("damping", "gamma > 0", METHOD, float),
    Option(
        "curvature_every",
        "one public curvature pass every this many rounds (kfac: factors projected into every "
        "round's subspace; others: A and C kept while the subspace is unchanged)",
        METHOD,
        int,
    ),
    Option(
        "public_sample_size",
        "use only this many public examples for the curvature and clip passes",
        METHOD,
        int,
    ),
    Option(
        "clip_norm",
        "clipping bound C (default: a quantile of public gradient norms)",
        STEP,
        float,
    ),
    Option("clip_quantile", "quantile of public gradient norms that sets C", STEP, float),
    Option(
        "prior_weight",
        "lam (default: step length by public line search in gdp mode)",
        STEP,
        float,
    ),
    Option(
        "momentum",
        "heavy ball over the releases: step along P w_t + m alpha d_(t-1) (post-processing)",
        STEP,
        float,
    ),
    Option(
        "line_search_size",
        "use only this many validation examples for the step line search",
        STEP,
        int,
    ),
    Option(
        "step_significance",
        "keep a step only when the validation loss falls by more than this many paired "
        "standard errors; a release not applied joins the next round's direction",
        STEP,
        float,
    ),
    Option(
        "confirmation_size",
        "run the step acceptance test on the last this many validation examples, which the "
        "step search then does not read",
        STEP,
        int,
    ),
    Option("radius", "pure mode: radius R (default: chosen)", STEP, float),
    Option(
        "seed",
        "reproducible noise and sampling: the report then says the release is NOT private "
        "against anyone who knows the seed, which goes to diagnostics.json only (default: "
        "operating-system entropy)",
        RUN,
        int,
    ),
    Option(
        "secure_noise",
        "draw every normal from the OS CSPRNG by an inverse CDF and snap the release to a grid "
        "(docs/theory.md §10a; takes no --seed)",
        RUN,
    ),
    Option(
        "invalid_records",
        "a private record whose gradient cannot be computed: zero it (no count released) or "
        "raise (docs/theory.md §12)",
        RUN,
        choices=("zero", "raise"),
    ),
    Option("batch_size", "examples per batch of every pass", RUN, int),
    Option(
        "device",
        "run every pass on this device: cpu, cuda or auto (the GPU when there is one); "
        "default: the model's",
        RUN,
        choices=("cpu", "cuda", "auto"),
    ),
    Option(
        "distributed",
        "one release over torchrun's processes (torchrun --nproc-per-node W -m qem.cli.main "
        "finetune --distributed ...): each reads its shard of the private data, rank 0 draws "
        "the noise and writes --out; gloo on the CPU, nccl with --device cuda "
        "(docs/theory.md §16)",
        RUN,
    ),
    Option("progress", "hide progress bars", RUN, flag="--no-progress", negate=True),
)

SCHEDULE_OPTIONS: tuple[Option, ...] = (
    Option("epochs", "--schedule partitioned: passes over the records", ROUNDS, int),
    Option(
        "sampling_rate",
        "--schedule poisson: probability q that a round reads a record",
        ROUNDS,
        float,
    ),
    Option(
        "expected_batch",
        "--schedule poisson: about this many records per round (q = B / N), instead of "
        "--sampling-rate",
        ROUNDS,
        int,
    ),
)
"""Parameters of the schedules of qem.schedules.SCHEDULES other than ``rounds``."""

NOT_EXPOSED: dict[str, str] = {
    # the model and the data are positional: --model, --public, --private in qem finetune
    "validation_data": "a data file (--validation in qem finetune; the scenario's public "
    "validation split in qem demo)",
    "on_release": "a callback: the command saves every release through it (ReleaseSaver)",
    "noise": "test-only switch that releases the exact mean (NOT PRIVATE); never offered",
}
"""Keywords of ``fine_tune`` the command line does not offer, and why."""

PENDING: dict[str, str] = {}
"""Options planned for keywords ``fine_tune`` does not take yet (a test fails once it does)."""

BUDGET_KEYWORDS = ("delta", "mode", "adjacency", "clipping")
"""The budget options beside --epsilon that ``qem preview`` and ``qem audit`` share."""
BUDGET_DEFAULTS: dict[str, object] = {name: FINE_TUNE_DEFAULTS[name] for name in BUDGET_KEYWORDS}
"""fine_tune's defaults of the budget options (qem.defaults)."""


def fine_tune_defaults() -> dict[str, object]:
    """The command line's defaults of fine_tune's keywords (qem.defaults: the library's
    recipe, with progress bars on)."""
    return dict(COMMAND_LINE_DEFAULTS)


def add_options(
    parser: argparse.ArgumentParser,
    options: tuple[Option, ...],
    defaults: Mapping[str, object],
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Declare ``options`` on ``parser`` in their groups. An option without an entry in
    ``defaults`` is required; ``overrides[keyword]`` replaces argparse settings of one option
    (default, choices, help, and "flags": its option strings)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in options:
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        settings: dict[str, Any] = {"dest": option.keyword, "help": option.help}
        if option.is_switch:
            settings["action"] = "store_false" if option.negate else "store_true"
        else:
            settings["type"] = option.type or str
            settings["choices"] = option.choices
            if option.nargs is not None:
                settings["nargs"] = option.nargs
            if option.nargs == "?":
                settings["const"] = option.const
        if option.keyword in defaults:
            settings["default"] = defaults[option.keyword]
        else:
            settings["required"] = True
        settings.update((overrides or {}).get(option.keyword, {}))
        flags = settings.pop("flags", option.flags)
        default = settings.get("default")
        if not option.is_switch and default is not None:
            settings["help"] += f" (default {default})"
        groups[option.group].add_argument(*flags, **settings)


def add_budget_arguments(parser: argparse.ArgumentParser, epsilon: float | None = None) -> None:
    """--epsilon (required unless given), --delta, --mode, --adjacency, --clipping, with
    fine_tune's defaults."""
    budget = tuple(o for o in FINE_TUNE_OPTIONS if o.keyword in ("epsilon", *BUDGET_DEFAULTS))
    defaults = dict(BUDGET_DEFAULTS) if epsilon is None else {**BUDGET_DEFAULTS, "epsilon": epsilon}
    add_options(parser, budget, defaults)


def add_fine_tune_arguments(
    parser: argparse.ArgumentParser,
    defaults: Mapping[str, object] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Every option of FINE_TUNE_OPTIONS and SCHEDULE_OPTIONS, with the command line's defaults
    (:func:`fine_tune_defaults`) updated by ``defaults``."""
    merged = {**fine_tune_defaults(), **(defaults or {})}
    merged.update({option.keyword: None for option in SCHEDULE_OPTIONS})
    add_options(parser, FINE_TUNE_OPTIONS + SCHEDULE_OPTIONS, merged, overrides)


def fine_tune_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The keywords for ``fine_tune`` from parsed options, their values checked first
    (:func:`check_values`). With ``--schedule`` the schedule's JSON form
    (:func:`schedule_spec`) replaces ``--rounds``; without it ``--rounds`` goes to fine_tune's
    shortcut. --layers entries that name types become the types (:func:`layer_spec`)."""
    check_values(args)
    kwargs = {option.keyword: getattr(args, option.keyword) for option in FINE_TUNE_OPTIONS}
    if kwargs["layers"] is not None:
        kwargs["layers"] = [layer_spec(entry) for entry in kwargs["layers"]]
    spec = schedule_spec(args)
    del kwargs["schedule"]
    if spec is None:
        return kwargs
    del kwargs["rounds"]
    return {**kwargs, "schedule": spec}


def schedule_spec(args: argparse.Namespace) -> dict[str, object] | None:
    """The JSON form of ``--schedule`` (qem.schedules.make_schedule) from ``--rounds`` and the
    schedule options given, checked by the schedule itself; None without ``--schedule``, where
    the schedule options are refused."""
    given = {
        option.keyword: getattr(args, option.keyword)
        for option in SCHEDULE_OPTIONS
        if getattr(args, option.keyword) is not None
    }
    kind = args.schedule
    if kind is None:
        if given:
            raise InvalidParameterError(
                f"{_flags(given)}: only with --schedule (sequential, partitioned or poisson); "
                "give one."
            )
        return None
    from qem.schedules import SCHEDULES, make_schedule

    rounds = {} if args.rounds is None else {"rounds": args.rounds}
    spec = {"kind": kind, **rounds, **given}
    parameters = inspect.signature(SCHEDULES[kind]).parameters
    missing = [
        name
        for name, parameter in parameters.items()
        if parameter.default is inspect.Parameter.empty and name not in spec
    ]
    if missing:
        raise InvalidParameterError(f"--schedule {kind} needs {_flags(missing)}.")
    unknown = sorted(set(given) - set(parameters))
    if unknown:
        raise InvalidParameterError(f"--schedule {kind} takes no {_flags(unknown)}.")
    make_schedule(spec)  # the schedule's own checks, before any data is read
    return spec


def _flags(keywords) -> str:
    return ", ".join("--" + keyword.replace("_", "-") for keyword in keywords)


POSITIVE = ("damping", "clip_norm", "prior_weight", "radius", "sampling_rate")
"""Options that must be finite numbers > 0 when given."""
COUNTS = (
    "rounds", "k", "N", "curvature_every", "public_sample_size", "line_search_size",
    "confirmation_size", "batch_size", "epochs", "expected_batch",
)  # fmt: skip
"""Options that must be integers >= 1 when given."""


def check_values(args: argparse.Namespace) -> None:
    """The checks of fine_tune's options that need neither data nor torch, by the library's
    own checkers (so with its messages and typical ranges), before anything heavy is imported:
    the budget, positive numbers, counts, the quantile and momentum ranges (the seed's rules
    are fine_tune's: qem.finetune)."""
    from qem.checks import (
        check_count,
        check_delta,
        check_epsilon,
        check_in_interval,
        check_positive,
    )

    check_epsilon(args.epsilon)
    if args.mode == "gdp":
        check_delta(args.delta)
    given = {keyword: getattr(args, keyword, None) for keyword in (*POSITIVE, *COUNTS)}
    for keyword, value in given.items():
        if value is not None:
            check = check_positive if keyword in POSITIVE else check_count
            check(_flags([keyword]), value)
    resample = getattr(args, "resample_subspace", None)
    if resample is not None and resample is not True:
        check_count("--resample-subspace", resample)
    check_in_interval("--clip-quantile", args.clip_quantile, 0.0, 1.0, closed="high")
    check_in_interval("--momentum", args.momentum, 0.0, 1.0, closed="low")


CLI_ONLY_SPELLINGS = {"validation_data": "--validation", "overwrite": "--overwrite"}
"""Library keywords whose command-line option is not their name in dashes."""


def cli_spelling(message: str) -> str:
    """A library error's ``message`` in the command line's spellings: ``name=value`` of a
    keyword becomes ``--name-in-dashes value`` (``--name`` for ``=True``), and a bare keyword
    that is an identifier (``clip_norm``, ``validation_data``) its option; plain words
    (``mode``, ``k``) are left alone, since prose uses them too."""
    keywords = {o.keyword for o in FINE_TUNE_OPTIONS + SCHEDULE_OPTIONS} | set(CLI_ONLY_SPELLINGS)

    def flag(keyword: str) -> str:
        return CLI_ONLY_SPELLINGS.get(keyword) or _flags([keyword])

    def assignment(match: re.Match) -> str:
        keyword, value = match.group(1), match.group(2).strip("'\"")
        return flag(keyword) if value == "True" else f"{flag(keyword)} {value}"

    alone = r"(?<![-\w./:])"  # not part of a path, a module:factory or a longer name
    names = "|".join(sorted(keywords, key=len, reverse=True))
    value = r"('[^']*'|\"[^\"]*\"|[\w.+-]+)"
    message = re.sub(rf"{alone}({names})={value}", assignment, message)
    identifiers = "|".join(sorted((k for k in keywords if "_" in k), key=len, reverse=True))
    return re.sub(rf"{alone}({identifiers})\b(?!\.\w|/)", lambda m: flag(m.group(1)), message)
