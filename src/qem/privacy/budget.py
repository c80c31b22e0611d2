"""The target guarantee of a run: (epsilon, delta) (delta None in pure mode) for one
neighbouring relation, with the public weight N of the quadratic (docs/theory.md §1: the
dataset size under replace-one, a declared size that does not depend on the private data under
add/remove) and pure mode's radius R of the domain {w : ||w||_A <= R} (None: chosen by qem)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from qem.checks import check_delta, check_epsilon, check_positive, parse_option
from qem.errors import InvalidParameterError
from qem.privacy.sensitivity import Adjacency

MODES = ("gdp", "pure")


@dataclass(frozen=True)
class Budget:
    """What a run may spend; validated on construction (``delta`` is ignored in pure mode)."""

    epsilon: float
    delta: float | None = 1e-5
    mode: str = "gdp"
    adjacency: Adjacency | str = Adjacency.REPLACE_ONE
    N: float | None = None
    radius: float | None = None

    def __post_init__(self) -> None:
        set_field = object.__setattr__
        set_field(self, "epsilon", check_epsilon(self.epsilon))
        if self.mode not in MODES:
            raise InvalidParameterError(f"mode must be 'gdp' or 'pure', got {self.mode!r}.")
        set_field(self, "delta", check_delta(self.delta) if self.mode == "gdp" else None)
        set_field(self, "adjacency", parse_option(Adjacency, self.adjacency, "adjacency"))
        if self.N is not None:
            set_field(self, "N", int(check_positive("N", self.N)))
        if self.radius is not None:
            set_field(self, "radius", check_positive("radius R", self.radius))

    def for_records(self, n: int) -> Budget:
        """This budget with N set: the declared N, or ``n`` under replace-one (add/remove needs
        a declared N: the number of records would otherwise be released by the weight)."""
        if self.N is not None:
            return self
        if self.adjacency is Adjacency.ADD_REMOVE:
            raise InvalidParameterError(
                "add/remove adjacency needs a declared, public dataset size N that does not "
                "depend on the private data; pass N."
            )
        return replace(self, N=int(check_positive("N", n)))
