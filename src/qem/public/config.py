"""``PublicSide``: what every round of a run computes from public data and earlier releases, and
on which cadence (the configuration that qem.public.side carries out)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from torch import nn

from qem.checks import check_count, check_positive
from qem.curvature.base import Curvature
from qem.errors import InvalidParameterError
from qem.parameters import Layers
from qem.subspace.base import Subspace
from qem.subspace.kronecker import Kronecker, spans_every_trainable_parameter


@dataclass(frozen=True)
class PublicSide:
    """What every round computes from public data and earlier releases, and on which cadence.

    The subspace: a kind (``make_subspace``) or a built ``Subspace``, its ``k``, public seed
    and ``layers``; "auto" (the default) is resolved for the model by :meth:`for_model`;
    ``resample_every`` R draws a new one every R rounds (seed ``subspace_seed + t // R``), None
    keeps one for the run, "auto" draws one per round when rounds read different records
    (partitioned, Poisson) and keeps one when every round reads all of them. The
    curvature: a kind (``make_curvature``) or a built ``Curvature``, damped by gamma; one
    public estimate every ``curvature_every`` rounds (a curvature that ``reprojects`` projects
    its stored estimate into each new subspace without a data pass; any other is re-estimated
    whenever the subspace changes). The clip norm C: ``clip_norm``, or the ``clip_quantile`` of
    public per-example gradient norms, recomputed every ``curvature_every`` rounds too.
    ``public_sample_size`` limits the curvature and clip passes to that many public examples.
    """

    subspace: str | Subspace = "auto"
    k: int | None = None
    subspace_seed: int = 0
    layers: Layers | None = None
    resample_every: int | Literal["auto"] | None = "auto"
    curvature: str | Curvature | None = None
    damping: float = 1e-2
    curvature_every: int = 1
    clip_norm: float | None = None
    clip_quantile: float = 0.9
    public_sample_size: int | None = None

    def for_model(self, model: nn.Module) -> PublicSide:
        """This configuration with subspace "auto" resolved for ``model``: Kronecker when it
        spans every trainable parameter of ``layers`` (each in an untied nn.Linear or
        nn.Conv2d), SRHT otherwise (an exported program's modules, embeddings, norms); then the
        curvature follows (K-FAC in a Kronecker subspace, GGN otherwise). Public: it reads only
        the model's structure."""
        if self.subspace != "auto":
            return self
        kronecker = spans_every_trainable_parameter(model, self.layers)
        return replace(self, subspace="kronecker" if kronecker else "srht")

    def __post_init__(self) -> None:
        if self.curvature is None and self.subspace != "auto":
            kronecker = self.subspace == "kronecker" or isinstance(self.subspace, Kronecker)
            object.__setattr__(self, "curvature", "kfac" if kronecker else "ggn")
        check_positive("damping gamma", self.damping, "Typical values are 1e-3 to 1.")
        object.__setattr__(
            self, "curvature_every", check_count("curvature_every", self.curvature_every)
        )
        if self.resample_every not in (None, "auto"):
            check_count("resample_every", self.resample_every)
        if self.public_sample_size is not None:
            check_count("public_sample_size", self.public_sample_size)
        if self.clip_norm is not None:
            check_positive("clip_norm C", self.clip_norm)
        if isinstance(self.subspace, Subspace) and self.layers is not None:
            raise InvalidParameterError(
                "layers= applies to a subspace given by name; a built Subspace has its layers "
                "already (pass layers to its constructor)."
            )

    def redraw_every(self, same_records_every_round: bool) -> int | None:
        """The subspace cadence R (None: one subspace) for a schedule of this kind."""
        if self.resample_every != "auto":
            every = self.resample_every
        else:
            every = None if same_records_every_round else 1
        if every is not None and isinstance(self.subspace, Subspace):
            raise InvalidParameterError(
                "a schedule that resamples the subspace needs it as a name (e.g. 'kronecker'), "
                "not a built Subspace, so that each round can draw a new one."
            )
        return every
