"""Kronecker-factored GGN (K-FAC: Martens & Grosse 2015; Conv2d as KFC: Grosse & Martens 2016),
estimated on public data, kept across rounds and projected into each round's Kronecker subspace
without a data pass (docs/theory.md §13).

Per spanned layer l (a layer type of qem.per_example.layers: nn.Linear, nn.Conv2d; gradient
matrix [grad W | grad b] as in ``qem.subspace.kronecker``), with per-position inputs a_{i,t}
(in_dim; a trailing 1 when the bias is trained) and output backprops
u_{i,c,t} = d <s_{i,c}, f(x_i)> / d out_{i,t}, where H_L,i = S_i S_i^T is the loss Hessian in the
outputs and s_{i,c} the columns of its symmetric square root:

    GGN_l  ~  G_l (x) F_l,
    G_l = 1/(sum_i L_i) sum_i sum_c sum_t u_{i,c,t} u_{i,c,t}^T    (out x out),
    F_l = 1/n sum_i sum_t a_{i,t} a_{i,t}^T                          (in_dim x in_dim),

with L_i the positions of example i (Conv2d output pixels, Linear middle dimensions; calls of a
module used twice count as positions): the KFC scaling, F summed over positions and G averaged,
so that a Linear layer on (B, in) inputs gets plain K-FAC. The output side is the exact
factorisation of the GGN (m backward passes per batch, m = outputs per example), not a sampled
Fisher: no randomness, and the same GGN that "ggn" computes exactly, up to the Kronecker
factorisation and the dropped cross-layer blocks.

In a Kronecker subspace P = blockdiag_l (P_out,l (x) P_in,l), whose coordinates are the blocks
vec_row(P_out^T G_l P_in) in module order,

    A = blockdiag_l (P_out^T G_l P_out) (x) (P_in^T F_l P_in) + gamma I_k .
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import hessian, vmap

from qem.curvature.base import Curvature, check_finite, damped
from qem.data import DataHasher, DataLike, Inputs, batch_size_of
from qem.errors import InvalidParameterError
from qem.losses import LossFn
from qem.model_calls import call_model, eval_mode
from qem.parameters import check_finite_parameters
from qem.per_example import (
    backpropagate,
    check_recording,
    record_calls,
    shared_machine_threads,
)
from qem.per_example.layers import layer_type
from qem.subspace.base import Subspace
from qem.subspace.kronecker import Kronecker, KroneckerLayer

F64 = torch.float64


@dataclass
class LayerFactors:
    """G (out x out, output side) and F (in_dim x in_dim, input side) of one layer, float64."""

    output: torch.Tensor
    input: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in_dim) of the layer's gradient matrix."""
        return len(self.output), len(self.input)


class KFAC(Curvature):
    """K-FAC GGN for Kronecker subspaces, kept across rounds (``reprojects``).

    A call with ``refresh=True`` makes one pass over the public data at the model's current
    parameters; a call with ``refresh=False`` projects the stored factors into the subspace it
    is given (a new subspace of the same layers is fine: no data pass). The public side decides
    which (qem.public.side: every ``curvature_every`` rounds). A subspace whose layers the
    stored factors do not cover forces a new estimate. ``describe()`` reports the calls, the
    data passes and the fingerprint of the public data of the last estimate.
    """

    kind = "kfac"
    reprojects = True

    def __init__(self, damping: float, batch_size: int = 64, progress: bool = True) -> None:
        super().__init__(damping, batch_size=batch_size, progress=progress)
        self.factors: dict[str, LayerFactors] = {}
        self.calls = 0
        self.data_passes = 0

    def matrix(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        subspace: Subspace,
        public_data: DataLike,
        *,
        refresh: bool = True,
    ) -> np.ndarray:
        """A = blockdiag_l (P_out^T G_l P_out) (x) (P_in^T F_l P_in) + gamma I_k, float64: the
        factors estimated on ``public_data`` when ``refresh`` (or when the stored ones do not
        cover the subspace's layers), else the stored ones projected into ``subspace``."""
        if not isinstance(subspace, Kronecker):
            raise InvalidParameterError(
                f"curvature 'kfac' needs a Kronecker subspace (subspace='kronecker'), got "
                f"{subspace.kind!r}: its factors G (x) F project only into P_out (x) P_in. "
                "Use 'ggn' for other subspaces."
            )
        self.calls += 1
        if refresh or not self._covers(subspace.layers):
            self.factors = self.estimate(model, loss_fn, subspace.layers, public_data)
        return self.project(subspace)

    def _covers(self, layers: list[KroneckerLayer]) -> bool:
        return all(
            m.module in self.factors and self.factors[m.module].shape == (m.out_dim, m.in_dim)
            for m in layers
        )

    def project(self, subspace: Kronecker) -> np.ndarray:
        """The stored factors in ``subspace``: the damped, checked block-diagonal A."""
        blocks = []
        for layer in subspace.layers:
            factors = self.factors[layer.module]
            output = layer.p_out.T @ factors.output.to(layer.p_out) @ layer.p_out
            inputs = layer.p_in.T @ factors.input.to(layer.p_in) @ layer.p_in
            blocks.append(torch.kron(output, inputs))
        return damped(torch.block_diag(*blocks).cpu().numpy(), self.damping)

    def estimate(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        layers: list[KroneckerLayer],
        public_data: DataLike,
    ) -> dict[str, LayerFactors]:
        """One pass over the public data: the factors G_l, F_l of each layer (module docstring),
        accumulated in float64. Records the data's size and fingerprint."""
        check_finite_parameters(model)
        modules = dict(model.named_modules())
        reference = modules[layers[0].module].weight
        sums = {
            m.module: LayerFactors(
                output=torch.zeros(m.out_dim, m.out_dim, dtype=F64, device=reference.device),
                input=torch.zeros(m.in_dim, m.in_dim, dtype=F64, device=reference.device),
            )
            for m in layers
        }
        positions = dict.fromkeys(sums, 0)
        hasher = DataHasher()
        with eval_mode(model):
            for inputs, targets in self.public_batches(
                model, loss_fn, reference, public_data, hasher
            ):
                with shared_machine_threads():
                    _accumulate(model, loss_fn, layers, inputs, targets, sums, positions)
        for name, factors in sums.items():
            check_finite(factors.output, self.kind)
            check_finite(factors.input, self.kind)
            factors.output /= max(positions[name], 1)
            factors.input /= hasher.n
        self.data_passes += 1
        self.n_public = hasher.n
        self.public_data_fingerprint = hasher.hexdigest()
        return sums

    def describe(self) -> dict:
        """The base description plus the calls made and the data passes made."""
        return {
            **super().describe(),
            "calls": self.calls,
            "data_passes": self.data_passes,
        }


def _accumulate(
    model: nn.Module,
    loss_fn: LossFn,
    layers: list[KroneckerLayer],
    inputs: Inputs,
    targets: torch.Tensor,
    sums: dict[str, LayerFactors],
    positions: dict[str, int],
) -> None:
    """Add one batch's sum_i sum_t a a^T and sum_i sum_c sum_t u u^T (float64) to ``sums``
    and its positions sum_i L_i to ``positions``: one forward, m backward passes (the inputs
    and backprops per position from qem.per_example)."""
    modules = dict(model.named_modules())
    with record_calls(model, [m.module for m in layers]) as recording, torch.enable_grad():
        outputs = call_model(model, inputs)
    batch = batch_size_of(inputs)
    check_recording(recording, batch, "K-FAC needs its inputs and outputs.")
    for layer in layers:
        module = modules[layer.module]
        for call in recording[layer.module]:
            a = layer_type(module).inputs(module, call.activation)
            if layer.bias is not None:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            a = a.reshape(-1, layer.in_dim).to(F64)
            sums[layer.module].input += a.T @ a
            positions[layer.module] += a.shape[0]
    roots = _loss_hessian_roots(loss_fn, outputs.detach(), targets).to(outputs)
    flat = outputs.reshape(batch, -1)
    for c in range(flat.shape[1]):
        column = (flat * roots[:, :, c]).sum()  # sum_i <s_{i,c}, f(x_i)>
        backpropagate(column, recording, retain_graph=c < flat.shape[1] - 1)
        for layer in layers:
            module = modules[layer.module]
            for call in recording[layer.module]:
                if call.backprop is not None:
                    u = layer_type(module).backprops(module, call.backprop)
                    u = u.reshape(-1, layer.out_dim).to(F64)
                    sums[layer.module].output += u.T @ u


def _loss_hessian_roots(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """S_i with S_i S_i^T = H_L,i, the Hessian of example i's loss in its outputs: the
    symmetric square root (B, m, m), float64, negative eigenvalues (rounding) clamped to 0."""
    batch = outputs.shape[0]

    def one_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(out.unsqueeze(0), y.unsqueeze(0)).sum()

    m = outputs[0].numel()
    loss_hessian = vmap(hessian(one_loss))(outputs, targets).reshape(batch, m, m)
    values, vectors = torch.linalg.eigh(loss_hessian.to(F64))
    return (vectors * values.clamp(min=0).sqrt().unsqueeze(1)) @ vectors.transpose(1, 2)
