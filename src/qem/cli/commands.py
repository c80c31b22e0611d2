"""The subcommands of ``qem``: name, module and one-line summary, declared without importing
any subcommand module (so that ``qem --help`` starts without torch, pandas or scipy.stats)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """``module`` defines ``add_parser(subparsers)``, which registers the subcommand with
    ``summary(name)`` as its help and sets ``handler``."""

    name: str
    module: str
    summary: str


COMMANDS: tuple[Command, ...] = (
    Command(
        "preview",
        "qem.cli.preview",
        "preview mu, beta, noise scale and expected excess loss for a budget",
    ),
    Command(
        "finetune",
        "qem.cli.finetune",
        "fine-tune a model privately on NPZ/IDX data and write model + privacy report",
    ),
    Command(
        "check",
        "qem.cli.check",
        "list the private records qem would zero (by index and reason), releasing nothing",
    ),
    Command(
        "demo",
        "qem.cli.demo",
        "private fine-tuning demos (MNIST S1, MIMIC care units) with their privacy report",
    ),
    Command(
        "experiment",
        "qem.cli.experiment",
        "run privacy-utility sweeps and report them as tables and plots",
    ),
    Command(
        "audit",
        "qem.cli.audit",
        "empirical privacy audit: membership inference on a worst-case neighbouring pair",
    ),
)


def summary(name: str) -> str:
    """The one-line help of subcommand ``name``."""
    return next(command.summary for command in COMMANDS if command.name == name)
