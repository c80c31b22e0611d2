"""Checks that examples of a batch do not interact, which per-example gradients need: example
i's loss must depend on example i alone (docs/theory.md, the Kronecker mixing check).

``check_examples_independent`` refuses batch-statistics normalisers (both paths).
``MixingCheck`` guards the hooked path, which takes every example's gradient from one backward
pass of the SUM of the losses: a data-independent probe on synthetic inputs of a public seed.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qem.data import Inputs, batch_size_of, input_entries, inputs_from_entries, signature_of
from qem.errors import UnsupportedModelError

PROBE_SIZE = 32
"""Examples in the synthetic batch that checks a model does not mix examples."""
PROBE_SEED = 20_240_508
"""Public seed of the synthetic probe batch (its inputs and loss weights)."""

LossesOf = Callable[[torch.Tensor], torch.Tensor]
"""losses_of(outputs) -> (B,): the per-example losses of a batch's outputs."""
HookedGradients = Callable[[LossesOf, Inputs], torch.Tensor]
"""gradients(losses_of, inputs) -> (B, m): per-example gradient features taken from one
backward pass of sum_i losses_of(model(inputs))_i (the path MixingCheck guards)."""


def check_examples_independent(model: nn.Module) -> None:
    """Raise UnsupportedModelError if a module mixes examples of a batch.

    Per-example gradients exist only when example i's loss depends on example i alone. A
    BatchNorm that normalises with batch statistics (train mode, or no running statistics)
    couples the examples; put it in eval mode or replace it (for example by GroupNorm).
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        ):
            raise UnsupportedModelError(
                f"module {name!r} ({type(module).__name__}) normalises with batch statistics, "
                "which mixes examples, so per-example gradients are undefined; call model.eval() "
                "(with running statistics) or replace it by GroupNorm/LayerNorm."
            )


class MixingCheck:
    """Raise UnsupportedModelError if example i's hooked gradient depends on example j.

    The hooked path differentiates the SUM of the batch's losses, so a layer that mixes
    examples (batch-mean centring, a batch normaliser, attention across the batch) makes
    "g_i" carry the other examples' data and voids the sensitivity bound. The check runs on a
    synthetic probe, never on the batch's values, so whether it raises does not depend on the
    data (only on the model and the form of the inputs: each entry's trailing shape, dtype and
    device): ``min(B, PROBE_SIZE)`` inputs drawn from a public seed (``_probe_entries``:
    standard normal, 0/1 for integer inputs, attention masks 0/1 with the first position on)
    and the per-example loss <r_i, f(x_i)> with public random r_i. A probe whose gradients are
    not finite verifies nothing and is refused. The hooked gradients are computed twice, the
    second time with a public random half of the examples given new inputs AND new r_i; the
    other half must not move beyond rounding (sqrt of the dtype's epsilon, relative). A change
    of x_j catches mixing in the forward pass and in the backward Jacobian, a change of r_j
    (standing for a change of the label or of the loss value) catches mixing in the backward
    pass only. Both passes replay the same random state, so dropout masks agree. Cost: two
    hooked passes over the probe once per (model, modes of its submodules, input shape and
    dtype) per MixingCheck.
    """

    def __init__(self) -> None:
        self._verified: weakref.WeakKeyDictionary[nn.Module, set[tuple]] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(
        self, model: nn.Module, inputs: Inputs, gradients: HookedGradients, dtype: torch.dtype
    ) -> None:
        """Check ``model`` for inputs of the form of ``inputs`` (values unread); ``dtype`` (the
        gradients' precision) sets the rounding tolerance."""
        size = min(batch_size_of(inputs), PROBE_SIZE)
        if size < 2:  # a batch of one cannot mix
            return
        signature = (tuple(m.training for m in model.modules()), signature_of(inputs))
        verified = self._verified.setdefault(model, set())
        if signature in verified:
            return
        generator = torch.Generator(device="cpu").manual_seed(PROBE_SEED)
        changed = torch.randperm(size, generator=generator)[: size // 2]
        kept = torch.ones(size, dtype=torch.bool)
        kept[changed] = False
        form = dict(input_entries(inputs))
        probe, other = (_probe_entries(form, size, generator) for _ in range(2))
        perturbed = {key: t.clone() for key, t in probe.items()}
        for key, t in perturbed.items():
            t[changed] = other[key][changed]

        def linear_loss(change: bool) -> LossesOf:
            def losses_of(outputs: torch.Tensor) -> torch.Tensor:
                flat = outputs.reshape(size, -1)
                weights = torch.Generator(device="cpu").manual_seed(PROBE_SEED + 1)
                r, r_new = (torch.randn(flat.shape, generator=weights) for _ in range(2))
                if change:
                    r[changed] = r_new[changed]
                return (flat * r.to(flat)).sum(dim=1)

            return losses_of

        results = []
        for change, batch in ((False, probe), (True, perturbed)):
            with _replayed_randomness():
                synthetic = inputs_from_entries(
                    {key: t.to(form[key].device) for key, t in batch.items()}
                )
                results.append(gradients(linear_loss(change), synthetic)[kept])
        before, after = results
        if not (torch.isfinite(before).all() and torch.isfinite(after).all()):
            raise UnsupportedModelError(
                "the synthetic probe batch that checks the model does not mix examples gave "
                "non-finite gradients, so the check cannot pass. Use 'srht' or 'dense', whose "
                "torch.func path runs each example as a batch of one."
            )
        scale = float(before.abs().max())
        moved = float((after - before).abs().max())
        if moved > math.sqrt(torch.finfo(dtype).eps) * scale:
            raise UnsupportedModelError(
                "the model mixes examples within a batch: changing half the examples of a "
                f"synthetic probe batch moved the others' projected gradients by {moved:.3g} "
                f"(largest entry {scale:.3g}). The Kronecker shortcut takes per-example "
                "gradients from one backward pass of the summed loss, which is exact only when "
                "example i's loss depends on example i alone (batch-mean centring, batch "
                "normalisers and attention across the batch break this). Remove that layer, or "
                "use 'srht' or 'dense', whose torch.func path runs each example as a batch of one."
            )
        verified.add(signature)


def _probe_entries(
    form: dict[str, torch.Tensor], size: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Synthetic inputs of a public seed: ``size`` examples of each entry of ``form`` (key ->
    tensor, qem.data.input_entries), same trailing shape and dtype, on the CPU. Floating
    entries are standard normal; integer and bool entries 0/1 (valid indices for any embedding
    with two or more rows: token ids, token types); an entry whose key contains "mask" is 0/1
    in its dtype with each example's first position 1, so that an attention mask keeps at least
    one position of every example."""
    probe = {}
    for key, tensor in form.items():
        shape, dtype = (size, *tensor.shape[1:]), tensor.dtype
        if "mask" in key:
            values = torch.randint(0, 2, shape, generator=generator)
            values.reshape(size, -1)[:, 0] = 1
            probe[key] = values.to(dtype)
        elif dtype.is_floating_point:
            probe[key] = torch.randn(shape, generator=generator, dtype=dtype)
        else:
            probe[key] = torch.randint(0, 2, shape, generator=generator).to(dtype)
    return probe


@contextmanager
def _replayed_randomness() -> Iterator[None]:
    """Run the block from a fixed random state and restore the caller's state afterwards."""
    with torch.random.fork_rng():
        torch.manual_seed(PROBE_SEED)
        yield
