"""The public side of a round (docs/theory.md §13, §15): the one owner of the cadences that do
not read private data. Round t gets

* the subspace P_t: drawn from its public seed ``subspace_seed + t // R`` every R rounds
  (``PublicSide.resample_every``), or one for the whole run;
* the public quadratic A_t = P_t^T H0 P_t + gamma I, factored once (``PublicQuadratic``): a
  public curvature estimate every ``curvature_every`` rounds; a curvature that ``reprojects``
  (K-FAC) projects its stored estimate into every round's subspace without a data pass, any
  other is re-estimated when the subspace changes;
* the clip norm C_t: given, or the public quantile of per-example gradient norms in the norm
  clipping uses, recomputed on the curvature's cadence (every ``curvature_every`` rounds; in
  between the last public value is kept, valid whatever the subspace since it is public).

Under a process group (qem.distributed) the subspace is rebuilt on every rank from its public
seed, and rank 0 alone computes the quadratic and C, which are broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.utils.data import Dataset

from qem.curvature.base import Curvature
from qem.curvature.factory import make_curvature
from qem.distributed import LocalProcess
from qem.losses import LossFn
from qem.privacy.sensitivity import ClipNorm
from qem.public.clip_norm import public_clip_norm
from qem.public.config import PublicSide
from qem.quadratic import PublicQuadratic
from qem.subspace.base import Subspace
from qem.subspace.factory import make_subspace
from qem.timing import PhaseTimer


@dataclass(frozen=True)
class RoundPublic:
    """What round t uses besides the private gradients: all public."""

    basis: Subspace
    quadratic: PublicQuadratic
    clip_norm: float
    clip_norm_source: str


class PublicSideState:
    """The public side of a run (module docstring): ``prepare(t, ...)`` gives round t's
    subspace, quadratic and clip norm, computing each only when its cadence says so."""

    def __init__(
        self,
        config: PublicSide,
        loss_fn: LossFn,
        public: Dataset,
        *,
        redraw_every: int | None,
        clipping: ClipNorm,
        batch_size: int,
        progress: bool,
    ) -> None:
        self.config, self.loss_fn, self.public = config, loss_fn, public
        self.redraw_every, self.clipping, self.batch_size = redraw_every, clipping, batch_size
        self.curvature: Curvature = (
            config.curvature
            if isinstance(config.curvature, Curvature)
            else make_curvature(
                config.curvature, config.damping, batch_size=batch_size, progress=progress
            )
        )
        self.basis: Subspace | None = (
            config.subspace if isinstance(config.subspace, Subspace) else None
        )
        self.draw: int | None = None
        self.quadratic: PublicQuadratic | None = None
        self.clip_norm = 0.0
        self.curvature_description: dict | None = None

    @property
    def clip_norm_source(self) -> str:
        """Where C comes from, for the report."""
        if self.config.clip_norm is not None:
            return "user"
        return f"public quantile {self.config.clip_quantile}"

    def prepare(
        self, t: int, model: nn.Module, timer: PhaseTimer, group: LocalProcess
    ) -> RoundPublic:
        """Round t's public side, each part recomputed only when due (module docstring)."""
        new_basis = self._redraw(t, model)
        due = t % self.config.curvature_every == 0
        reprojects = self.curvature.reprojects
        if self.quadratic is None or new_basis or due:  # else A and C are this round's too
            first = self.quadratic is None
            refresh = first or due or not reprojects
            self.quadratic, self.clip_norm = group.quadratic_from_root(
                (lambda: self._quadratic_and_clip_norm(model, refresh, first or due, timer))
                if group.is_root
                else None,
                self.basis.k,
            )
            self.curvature_description = group.json_from_root(self.describe_curvature)
            timer.lap("public_broadcast")
        return RoundPublic(self.basis, self.quadratic, self.clip_norm, self.clip_norm_source)

    def _redraw(self, t: int, model: nn.Module) -> bool:
        """Draw round t's subspace if its draw index changed; whether it did."""
        draw = 0 if self.redraw_every is None else t // self.redraw_every
        if self.basis is not None and (
            draw == self.draw or isinstance(self.config.subspace, Subspace)
        ):
            self.draw = draw
            return False
        config = self.config
        self.basis = make_subspace(
            config.subspace,
            model,
            k=config.k,
            seed=config.subspace_seed + draw,
            layers=config.layers,
        )
        self.draw = draw
        return True

    def _quadratic_and_clip_norm(
        self, model: nn.Module, refresh: bool, clip: bool, timer: PhaseTimer
    ) -> tuple[PublicQuadratic, float]:
        """The round's quadratic (a data pass when ``refresh``) and clip norm (a public pass
        when ``clip``, else the last one: any public C is valid)."""
        quadratic = self.curvature.quadratic(
            model, self.loss_fn, self.basis, self.public, refresh=refresh
        )
        timer.lap("curvature")
        if self.config.clip_norm is not None:
            return quadratic, float(self.config.clip_norm)
        if not clip:
            return quadratic, self.clip_norm
        C = public_clip_norm(
            model,
            self.loss_fn,
            self.basis,
            self.public,
            quantile=self.config.clip_quantile,
            clipping=self.clipping,
            cholesky=quadratic.cholesky,
            batch_size=self.batch_size,
        )
        timer.lap("clip_norm")
        return quadratic, C

    def describe_curvature(self) -> dict:
        """The curvature's public description, with the refresh cadence of a reprojecting one."""
        description = self.curvature.describe()
        if self.curvature.reprojects:
            description["refresh_every"] = self.config.curvature_every
        return description
