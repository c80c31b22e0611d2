"""What a round tells the person running qem: its public summary on the ``qem.finetune`` logger
(INFO; its timings at DEBUG, as diagnostics) and the warning when its release was not applied."""

from __future__ import annotations

import logging

from qem.report import RoundRecord

logger = logging.getLogger("qem.finetune")
"""INFO: each round's public summary; DEBUG: its timings (diagnostics, not for publication)."""


def log_round(record: RoundRecord, total: int, seconds: dict[str, float]) -> None:
    """Round summary at INFO, from public values only (N_t is the schedule's public weight,
    never a Poisson round's realised size); its timings at DEBUG, as diagnostics."""
    privacy = (
        f"z = {record.noise_multiplier:.4g}"
        if record.noise_multiplier is not None
        else f"epsilon_t = {record.epsilon:.4g}"
    )
    logger.info(
        "round %d/%d: N_t = %.6g, %s, clip norm C = %.4g, step length %.4g",
        record.round,
        total,
        record.N,
        privacy,
        record.clip_norm,
        record.step_length,
    )
    logger.debug(
        "round %d seconds per phase (diagnostics, not for publication: timings of the private "
        "pass depend on the private data): %s",
        record.round,
        ", ".join(f"{phase} {value:.3g}" for phase, value in seconds.items()),
    )


def zero_step_message(rounds: list[int], total: int, validation_source: dict) -> str:
    """The one warning of a run whose releases in ``rounds`` (1-based) were not applied."""
    causes = [
        "the budget is too small for the number of private records (the release is mostly "
        "noise: try a larger epsilon, fewer rounds, or a schedule with fewer, larger rounds)",
        "the clip norm (a public quantile may clip nearly every private gradient, or too few)",
        "validation data unlike the private data (the step is scored on public validation data)",
    ]
    if validation_source["source"] != "user":
        causes.append(
            "the validation split is held out from the public data the model was pretrained "
            "on, where theta0 is already near the minimum: pass validation_data resembling the "
            "private data"
        )
    which = ", ".join(map(str, rounds[:10])) + (", ..." if len(rounds) > 10 else "")
    return (
        f"{len(rounds)} of {total} round(s) (round {which}): the release did not lower the "
        "public validation loss beyond its noise (step_significance), so its step length is 0; "
        "the release joins the next round's step (docs/theory.md §9b), and one that no later "
        "step takes is never applied (unapplied_releases in the report), its budget spent all "
        "the same. Likely causes: " + "; ".join(causes) + "."
    )


def invalid_records_message(per_round: list[int]) -> str:
    """The one warning of a run some of whose private records were invalid (for the curator:
    the count is private and goes nowhere near the privacy report)."""
    rounds = sum(1 for count in per_round if count)
    return (
        f"{sum(per_round)} private record reads in {rounds} of {len(per_round)} round(s) were "
        "invalid (a label outside the model's outputs, a wrong label dtype, or a loss or "
        "gradient that is not finite) and contributed zero (invalid_records='zero'); a record "
        "read by several rounds counts once per round. This count is for you, who hold the "
        "data (diagnostics.json), not for publication. List them with qem.check_data(...) or "
        "`qem check` and fix the data pipeline."
    )
