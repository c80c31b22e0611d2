"""What ``fine_tune`` returns: the fine-tuned model, its privacy report (publishable), the
data-free preview of every round, the diagnostics (NOT publishable) and the releases w_t."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from qem.io import save_run
from qem.report import Diagnostics, PrivacyReport


class ZeroStepWarning(UserWarning):
    """Rounds whose release did not lower the public validation loss were not applied (one
    warning per run, naming them)."""


class InvalidRecordsWarning(UserWarning):
    """Private records whose gradient could not be computed contributed zero (one warning per
    run, with their count: for the person running qem, never in the privacy report)."""


@dataclass
class FineTuneResult:
    """The fine-tuned model, its privacy report (publishable), the data-free preview of every
    round, the diagnostics (NOT publishable: timings) and the releases w_t themselves."""

    model: nn.Module
    report: PrivacyReport
    preview: list[dict] = field(default_factory=list)
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    releases: list[np.ndarray] = field(default_factory=list)

    def save(self, directory: str, overwrite: bool = False) -> None:
        """Write the state dict, privacy_report.json and diagnostics.json together,
        atomically (qem.io)."""
        save_run(
            directory,
            self.model.state_dict(),
            self.report.to_dict(),
            diagnostics=self.diagnostics.to_dict(),
            overwrite=overwrite,
        )
