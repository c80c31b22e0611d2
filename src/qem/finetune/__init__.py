"""Private fine-tuning by rounds of exact draws (docs/theory.md §8, §13).

``fine_tune`` (the keyword API, qem.finetune.api) maps its arguments onto configuration objects
and runs the round engine (qem.finetune.engine); ``run_rounds`` takes the objects directly:
``Budget`` (qem.privacy.budget), a schedule (qem.schedules), ``PublicSide`` (qem.public.config),
``PrivatePass``, ``Noise``, ``StepRule`` and ``Performance`` (qem.finetune.config).
"""

from qem.finetune.api import fine_tune
from qem.finetune.config import Noise, Performance, PrivatePass, StepRule
from qem.finetune.engine import run_rounds
from qem.finetune.result import FineTuneResult, InvalidRecordsWarning, ZeroStepWarning
from qem.privacy.budget import Budget
from qem.public.config import PublicSide

__all__ = [
    "Budget",
    "FineTuneResult",
    "InvalidRecordsWarning",
    "Noise",
    "Performance",
    "PrivatePass",
    "PublicSide",
    "StepRule",
    "ZeroStepWarning",
    "fine_tune",
    "run_rounds",
]
