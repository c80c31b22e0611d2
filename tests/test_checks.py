"""qem.checks is the one home for option parsing: every entry point that takes an enum-valued
option refuses an unknown name with qem's own error listing every choice."""

from __future__ import annotations

import numpy as np
import pytest

from cases import make_linear, make_task
from qem.baselines.dpsgd import dpsgd
from qem.baselines.none import none
from qem.baselines.nonprivate import nonprivate
from qem.checks import check_count, check_positive, parse_option
from qem.errors import InvalidParameterError
from qem.finetune import fine_tune
from qem.losses import cross_entropy
from qem.mechanism.quadratic import Mode, QuadraticExponentialMechanism
from qem.privacy.sensitivity import Adjacency, ClipNorm, Sensitivity


def _choices(enum) -> list[str]:
    return [repr(member.value) for member in enum]


@pytest.mark.parametrize(
    ("call", "enum"),
    [
        (lambda m, d: fine_tune(m, cross_entropy, d, d, epsilon=1.0, adjacency="foo"), Adjacency),
        (lambda m, d: fine_tune(m, cross_entropy, d, d, epsilon=1.0, clipping="l2"), ClipNorm),
        (lambda m, d: dpsgd(m, cross_entropy, d, d, epsilon=1, delta=1e-5, adjacency="foo"), None),
        (lambda m, d: none(m, cross_entropy, d, d, adjacency="foo"), None),
        (lambda m, d: nonprivate(m, cross_entropy, d, d, adjacency="foo"), None),
        (
            lambda m, d: QuadraticExponentialMechanism(np.eye(2), N=8, clip_norm=1.0, mode="exact"),
            Mode,
        ),
        (lambda m, d: Sensitivity(clip_norm=1.0, clipping="l2"), ClipNorm),
    ],
    ids=["fine_tune", "fine_tune-clipping", "dpsgd", "none", "nonprivate", "mechanism", "sens"],
)
def test_unknown_option_lists_the_choices(call, enum):
    model, data = make_linear(), make_task(8, 0)
    enum = enum or Adjacency
    with pytest.raises(InvalidParameterError) as raised:
        call(model, data)
    for choice in _choices(enum):
        assert choice in str(raised.value)


def test_parse_option_accepts_members_and_values():
    assert parse_option(Adjacency, "add_remove", "adjacency") is Adjacency.ADD_REMOVE
    assert parse_option(Adjacency, Adjacency.REPLACE_ONE, "adjacency") is Adjacency.REPLACE_ONE


@pytest.mark.parametrize("value", ["1", True, 0, -1.0, float("nan"), float("inf")])
def test_check_positive_refuses(value):
    with pytest.raises(InvalidParameterError):
        check_positive("epsilon", value)


@pytest.mark.parametrize("value", [0, 1.0, True, "2"])
def test_check_count_refuses(value):
    with pytest.raises(InvalidParameterError):
        check_count("rounds", value)
