"""Per-layer Kronecker basis for nn.Linear and nn.Conv2d: the gradient G of [W | b] of each layer
is projected as P_out^T G P_in, and per-example projections cost about one forward/backward."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from qem.data import Inputs, batch_size_of, input_entries, inputs_from_entries, signature_of
from qem.errors import InvalidParameterError, ShapeError, UnsupportedModelError
from qem.model_calls import call_model
from qem.parameters import Layers, describe_layers, layer_list, select_modules
from qem.subspace.base import LossFn, Subspace, check_examples_independent
from qem.subspace.dense import orthonormal_gaussian

_SUPPORTED = (nn.Linear, nn.Conv2d)
PROBE_SIZE = 32
"""Examples in the synthetic batch that checks a model does not mix examples."""
PROBE_SEED = 20_240_508
"""Public seed of the synthetic probe batch (its inputs and loss weights)."""


@dataclass
class KroneckerLayer:
    """One spanned layer: G in R^{out x in_dim} (weight flattened to out x (in*kh*kw), then the
    bias as last column when it is trained) and its factors P_out (out x k_out),
    P_in (in_dim x k_in)."""

    module: str
    weight: str
    bias: str | None
    out_dim: int
    in_dim: int
    k_out: int = 0
    k_in: int = 0
    p_out: torch.Tensor | None = None
    p_in: torch.Tensor | None = None

    @property
    def weight_cols(self) -> int:
        """Columns of G that come from the weight."""
        return self.in_dim - (self.bias is not None)


class Kronecker(Subspace):
    """P = blockdiag_l (P_out,l (x) P_in,l) over the Linear and Conv2d layers, in module order.

    For layer l with gradient matrix G_l = [grad W | grad b] (out x in_dim, conv weights
    flattened as out x (in*kh*kw)), the block of P^T g is vec_row(P_out^T G_l P_in) (k_out*k_in
    entries). Factors are Haar-random orthonormal (QR of seeded Gaussians), so P^T P = I_k.
    ``parameter_names`` are the spanned weights and biases in ``named_parameters`` order.

    Allocation of k (unless ``shapes=[(k_out, k_in), ...]`` gives it per layer, module order):
    layer l gets a budget k d_l / d proportional to its size d_l = out*in_dim; budgets are
    rounded from the smallest layer to the largest, each to a product k_out*k_in (1 <= k_out <=
    out, 1 <= k_in <= in_dim, k_out/k_in within a factor 4 of out/in_dim) closest to the budget
    plus the rounding error carried from the previous layers. The achieved total is ``self.k``
    (usually the requested k; ``describe()`` reports both).

    Per-example gradients (``per_example_gradients``): forward hooks record each layer's input
    a_i (Conv2d: unfolded, (in*kh*kw, L) with L output positions), tensor hooks the backprop
    delta_i = d loss_i / d output_i (out, L), obtained from one backward pass of the SUM of the
    per-example losses. This is exact only when examples do not interact: BatchNorm with batch
    statistics is refused, and any other mixing (batch-mean centring, attention across the
    batch) is refused by a data-independent check on a synthetic probe batch (see
    ``_check_no_mixing``), run once per model configuration; the loss is applied to each
    example as a batch of one (``per_example_losses``). Then P_out^T G_i P_in =
    sum_L (P_out^T delta_i)(P_in^T a_i)^T: both sides are projected first, the d-dimensional
    gradient is never formed. Memory is that of the unfolded activations, O(B in_dim L) per
    Conv2d.

    Any trainable parameter outside Linear/Conv2d layers (LayerNorm, embeddings, ...) is refused
    unless ``layers`` restricts P (then the others are not spanned): module names and module
    types (``layers=["classifier", nn.Linear]``; nn.Linear means every Linear). P spans the
    Linear and Conv2d layers among the chosen modules and inside them (a chosen block spans its
    Linear layers, not its LayerNorm); layers whose weight is frozen (requires_grad=False) are
    skipped, and so is a frozen bias. Conv2d needs groups=1; a module called several times in a
    forward pass is summed over calls.
    """

    kind = "kronecker"

    def __init__(
        self,
        model: nn.Module,
        k: int | None = None,
        seed: int | None = None,
        *,
        layers: Layers | None = None,
        shapes: list[tuple[int, int]] | None = None,
    ) -> None:
        self.layers = _find_layers(model, layers)
        dims = [(layer.out_dim, layer.in_dim) for layer in self.layers]
        if shapes is not None:
            shapes = _check_shapes(shapes, self.layers)
            total = sum(a * b for a, b in shapes)
            if k is not None and k != total:
                raise InvalidParameterError(
                    f"k={k} disagrees with the per-layer shapes, whose total is {total}; "
                    "give one of them."
                )
            k = total
        elif k is None:
            raise InvalidParameterError("Kronecker needs k (total dimension) or shapes=.")
        names = [n for layer in self.layers for n in (layer.weight, layer.bias) if n]
        super().__init__(model, k, parameter_names=names, seed=seed)
        self.layer_selection = describe_layers(layers)
        self.requested_k = self.k
        if shapes is None:
            shapes = allocate(dims, self.k)
        generator = self._generator()
        offset = 0
        self.offsets: dict[str, int] = {}
        for name in self.parameter_names:
            self.offsets[name] = offset
            offset += math.prod(self.parameter_shapes[name])
        for layer, (k_out, k_in) in zip(self.layers, shapes, strict=True):
            layer.k_out, layer.k_in = k_out, k_in
            layer.p_out = orthonormal_gaussian(layer.out_dim, k_out, generator).to(self.device)
            layer.p_in = orthonormal_gaussian(layer.in_dim, k_in, generator).to(self.device)
        self.k = sum(a * b for a, b in shapes)
        self._verified: weakref.WeakKeyDictionary[nn.Module, set[tuple]] = (
            weakref.WeakKeyDictionary()
        )

    def _matrices(self, x: torch.Tensor, layer: KroneckerLayer) -> torch.Tensor:
        """G_l (..., out, in_dim) from flat vectors x (..., d)."""
        lead, cols = x.shape[:-1], layer.weight_cols
        start = self.offsets[layer.weight]
        g = x[..., start : start + layer.out_dim * cols].reshape(*lead, layer.out_dim, cols)
        if layer.bias is not None:
            start = self.offsets[layer.bias]
            g = torch.cat([g, x[..., start : start + layer.out_dim, None]], dim=-1)
        return g

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """P^T g: the blocks vec_row(P_out^T G_l P_in), stacked in module order."""
        x = self._vectors(g, self.d)
        blocks = [
            (layer.p_out.T @ self._matrices(x, layer) @ layer.p_in).flatten(-2)
            for layer in self.layers
        ]
        return torch.cat(blocks, dim=-1)

    def lift(self, w: torch.Tensor) -> torch.Tensor:
        """P w: each block W_l (k_out x k_in) of w becomes G_l = P_out W_l P_in^T."""
        w = self._vectors(w, self.k)
        lead = w.shape[:-1]
        out = w.new_zeros((*lead, self.d))
        start = 0
        for layer in self.layers:
            size = layer.k_out * layer.k_in
            block = w[..., start : start + size].reshape(*lead, layer.k_out, layer.k_in)
            g = layer.p_out @ block @ layer.p_in.T
            start += size
            cols = layer.weight_cols
            at = self.offsets[layer.weight]
            out[..., at : at + layer.out_dim * cols] = g[..., :cols].flatten(-2)
            if layer.bias is not None:
                at = self.offsets[layer.bias]
                out[..., at : at + layer.out_dim] = g[..., cols]
        return out

    def per_example_gradients(
        self, model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: torch.Tensor
    ) -> torch.Tensor:
        """g_i = P^T grad loss_i, (B, k) float64, from hooked activations and backprops, after
        checking (once per model configuration) that the model does not mix examples; the loss
        cannot mix them either (``per_example_losses``)."""
        check_examples_independent(model)
        self._check_no_mixing(model, inputs)
        return self._hooked_gradients(
            model, lambda outputs: per_example_losses(loss_fn, outputs, targets), inputs
        )

    def _hooked_gradients(
        self,
        model: nn.Module,
        losses_of: Callable[[torch.Tensor], torch.Tensor],
        inputs: Inputs,
    ) -> torch.Tensor:
        """(B, k) float64: per layer, sum over calls and positions of (P_out^T delta_i)
        (P_in^T a_i)^T, with a_i recorded by forward hooks and delta_i by tensor hooks during one
        backward pass of sum_i losses_of(model(inputs))_i."""
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        calls: dict[str, list[list[torch.Tensor | None]]] = {m.module: [] for m in self.layers}

        def record(name: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                entry: list[torch.Tensor | None] = [args[0].detach(), None]
                calls[name].append(entry)
                if output.requires_grad:
                    output.register_hook(lambda grad: entry.__setitem__(1, grad.detach()))

            return hook

        batch = batch_size_of(inputs)
        handles = [modules[m.module].register_forward_hook(record(m.module)) for m in self.layers]
        try:
            with torch.enable_grad():
                losses = losses_of(call_model(model, inputs))
                if losses.shape != (batch,):
                    raise ShapeError(
                        f"the loss returned shape {tuple(losses.shape)} for a batch of "
                        f"{batch}; qem needs one loss per example."
                    )
                weights = [params[m.weight] for m in self.layers]
                torch.autograd.grad(losses.sum(), weights, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        blocks = []
        for layer in self.layers:
            if not calls[layer.module]:
                raise UnsupportedModelError(
                    f"layer {layer.module!r} was not called through its forward() (its parent "
                    "may use its weights directly); restrict with layers= or use 'srht'."
                )
            module = modules[layer.module]
            blocks.append(self._layer_projection(module, layer, calls[layer.module], batch))
        return torch.cat(blocks, dim=-1)

    def _check_no_mixing(self, model: nn.Module, inputs: Inputs) -> None:
        """Raise UnsupportedModelError if example i's hooked gradient depends on example j.

        The hooked path differentiates the SUM of the batch's losses, so a layer that mixes
        examples (batch-mean centring, a batch normaliser, attention across the batch) makes
        "g_i" carry the other examples' data and voids the sensitivity bound. The check runs
        on a synthetic probe, never on the batch's values, so whether it raises does not
        depend on the data (only on the model and the form of the inputs: each entry's trailing
        shape, dtype and device): ``min(B, PROBE_SIZE)`` inputs drawn from a public seed
        (``_probe_entries``: standard normal, 0/1 for integer inputs, attention masks 0/1 with
        the first position on) and the per-example loss <r_i, f(x_i)> with public random r_i.
        A probe whose gradients are not finite verifies nothing and is refused. The
        hooked gradients are computed twice, the second time with a public random half of the
        examples given new inputs AND new r_i; the other half must not move beyond rounding
        (sqrt of the dtype's epsilon, relative). A change of x_j catches mixing in the forward
        pass and in the backward Jacobian, a change of r_j (standing for a change of the label
        or of the loss value) catches mixing in the backward pass only. Both passes replay
        the same random state, so dropout masks agree. Cost: two hooked passes over the probe
        once per (model, modes of its submodules, input shape and dtype) per subspace.
        """
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

        def linear_loss(change: bool) -> Callable[[torch.Tensor], torch.Tensor]:
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
                results.append(self._hooked_gradients(model, linear_loss(change), synthetic)[kept])
        before, after = results
        if not (torch.isfinite(before).all() and torch.isfinite(after).all()):
            raise UnsupportedModelError(
                "the synthetic probe batch that checks the model does not mix examples gave "
                "non-finite gradients, so the check cannot pass. Use 'srht' or 'dense', whose "
                "torch.func path runs each example as a batch of one."
            )
        scale = float(before.abs().max())
        moved = float((after - before).abs().max())
        dtype = next(iter(self.parameters_of(model).values())).dtype
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

    def _layer_projection(
        self,
        module: nn.Module,
        layer: KroneckerLayer,
        calls: list[list[torch.Tensor | None]],
        batch: int,
    ) -> torch.Tensor:
        """sum over calls and positions of (P_out^T delta)(P_in^T a)^T, flattened: (B, k_l)."""
        total = torch.zeros(batch, layer.k_out, layer.k_in, dtype=torch.float64, device=self.device)
        for activation, backprop in calls:
            if activation.shape[0] != batch:
                raise UnsupportedModelError(
                    f"layer {layer.module!r} received a tensor of shape "
                    f"{tuple(activation.shape)} whose first dimension is not the batch ({batch}); "
                    "Kronecker needs layers applied per example. Use 'srht' or 'dense'."
                )
            if backprop is None:  # this call's output did not reach the loss
                continue
            # Projected in the model's precision (the per-example gradients themselves are no
            # more precise); clipping and sums downstream are float64.
            activation = activation.to(device=self.device)
            backprop = backprop.to(device=self.device, dtype=activation.dtype)
            p_delta, p_a = _projected_call(module, layer, activation, backprop)
            total += (p_delta.transpose(1, 2) @ p_a).to(torch.float64)  # (B, k_out, k_in)
        return total.flatten(1)

    def describe(self) -> dict:
        """The base description plus the requested k and each layer's factor shapes."""
        return {
            **super().describe(),
            "requested_k": self.requested_k,
            "layers": [
                {
                    "module": m.module,
                    "out": m.out_dim,
                    "in": m.in_dim,
                    "k_out": m.k_out,
                    "k_in": m.k_in,
                }
                for m in self.layers
            ],
        }


def _projected_call(
    module: nn.Module, layer: KroneckerLayer, activation: torch.Tensor, backprop: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """P_out^T delta (B, L, k_out) and P_in^T [a; 1] (B, L, k_in) per position of one layer
    call, so that the example's projected gradient is their product summed over the L positions.

    Conv2d: a = unfold(input) (B, in*kh*kw, L), delta = d loss / d output as (B, out, L).
    Linear on (B, ..., in): the middle dimensions are the positions.
    """
    batch, cols = activation.shape[0], layer.weight_cols
    p_in, p_out = layer.p_in.to(activation.dtype), layer.p_out.to(activation.dtype)
    p_weight = p_in[:cols]
    if isinstance(module, nn.Conv2d):
        a = conv_patches(module, activation)
        delta = backprop.reshape(batch, layer.out_dim, -1)
        p_a = (p_weight.T @ a).transpose(1, 2)
        p_delta = (p_out.T @ delta).transpose(1, 2)
    else:
        if activation.dim() < 2:
            raise UnsupportedModelError(
                f"Linear input of shape {tuple(activation.shape)}: Kronecker needs a batch "
                "dimension."
            )
        p_a = activation.reshape(batch, -1, cols) @ p_weight
        p_delta = backprop.reshape(batch, -1, layer.out_dim) @ p_out
    if layer.bias is not None:
        p_a = p_a + p_in[cols]
    return p_delta, p_a


def per_example_losses(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor | None
) -> torch.Tensor:
    """(B,) losses, ``loss_fn`` applied to each example as a batch of one (torch.func.vmap, as
    the generic path does), so that a loss mixing the examples of a batch (a batch mean
    subtracted, weights normalised over the batch) cannot carry one example into another's
    gradient."""

    def one(output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        value = loss_fn(output.unsqueeze(0), None if target is None else target.unsqueeze(0))
        if value.shape != (1,):
            raise ShapeError(
                f"the loss returned shape {tuple(value.shape)} for a batch of 1; qem needs one "
                "loss per example."
            )
        return value[0]

    return vmap(one, in_dims=(0, None if targets is None else 0))(outputs, targets)


def conv_patches(module: nn.Conv2d, activation: torch.Tensor) -> torch.Tensor:
    """The unfolded patches of a Conv2d's (padded) input, (B, in*kh*kw, L) with L output
    positions, so that the output at position t is W_flat a[:, :, t] (+ b)."""
    if activation.dim() != 4:
        raise UnsupportedModelError(
            f"Conv2d input of shape {tuple(activation.shape)}: Kronecker needs batched "
            "(B, C, H, W) inputs."
        )
    padded = F.pad(
        activation,
        _conv_padding(module),
        mode="constant" if module.padding_mode == "zeros" else module.padding_mode,
    )
    return F.unfold(padded, module.kernel_size, dilation=module.dilation, stride=module.stride)


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


def _conv_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of a Conv2d, as F.pad takes it (torch's 'same' puts
    the odd pixel on the right/bottom)."""
    if module.padding == "valid":
        return (0, 0, 0, 0)
    if module.padding == "same":
        pads = []
        for dilation, size in zip(module.dilation, module.kernel_size, strict=True):
            total = dilation * (size - 1)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return (left, right, top, bottom)
    ph, pw = module.padding
    return (pw, pw, ph, ph)


def _chosen_layers(model: nn.Module, layers: Layers | None) -> list[str]:
    """Names of the Linear/Conv2d modules to span, in module order: every one with a trainable
    weight (``layers`` None), or those among and inside the modules ``layers`` chooses, frozen
    ones skipped. A chosen module without a Linear/Conv2d in it, or a layer named explicitly
    whose weight is frozen, is an error."""
    modules = dict(model.named_modules())
    if layers is None:
        return [
            n for n, m in modules.items() if isinstance(m, _SUPPORTED) and m.weight.requires_grad
        ]
    named = {spec for spec in layer_list(layers) if isinstance(spec, str)}
    chosen: set[str] = set()
    for name in select_modules(model, layers):
        module = modules[name]
        inside = [n for n, m in module.named_modules(prefix=name) if isinstance(m, _SUPPORTED)]
        if not inside:
            raise UnsupportedModelError(
                f"module {name!r} is a {type(module).__name__}; Kronecker spans only nn.Linear "
                "and nn.Conv2d layers."
            )
        if name in named and isinstance(module, _SUPPORTED) and not module.weight.requires_grad:
            raise UnsupportedModelError(f"the weight of {name!r} is frozen; nothing to span.")
        chosen.update(n for n in inside if modules[n].weight.requires_grad)
    return [n for n in modules if n in chosen]


def _find_layers(model: nn.Module, layers: Layers | None) -> list[KroneckerLayer]:
    """The spanned layers in module order (``_chosen_layers``), after checking every trainable
    parameter is covered (when ``layers`` is None) and each layer can be spanned."""
    modules = dict(model.named_modules())
    param_name = {id(p): n for n, p in model.named_parameters()}
    spanned, seen = [], set()
    for name in _chosen_layers(model, layers):
        module = modules[name]
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise UnsupportedModelError(
                f"Conv2d {name!r} has groups={module.groups}; Kronecker supports groups=1 only. "
                "Use 'srht' or 'dense', or exclude it with layers=."
            )
        bias = module.bias if module.bias is not None and module.bias.requires_grad else None
        tensors = [module.weight] if bias is None else [module.weight, bias]
        if any(id(t) in seen for t in tensors):
            raise UnsupportedModelError(
                f"layer {name!r} shares parameters with another layer; Kronecker needs "
                "untied weights."
            )
        seen.update(id(t) for t in tensors)
        tied = [param_name[id(t)] for t in tensors if param_name[id(t)].rpartition(".")[0] != name]
        if tied:
            raise UnsupportedModelError(
                f"layer {name!r} uses the parameters {tied} of another module (tied weights); "
                "Kronecker needs each spanned parameter used by its layer only."
            )
        weight = module.weight
        spanned.append(
            KroneckerLayer(
                module=name,
                weight=param_name[id(weight)],
                bias=None if bias is None else param_name[id(bias)],
                out_dim=weight.shape[0],
                in_dim=weight[0].numel() + (bias is not None),
            )
        )
    if layers is None:
        owner = {id(p): type(m).__name__ for m in modules.values() for p in m.parameters(False)}
        others = [
            f"{n} ({owner[id(p)]})"
            for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in seen
        ]
        if others:
            raise UnsupportedModelError(
                f"Kronecker spans only nn.Linear and nn.Conv2d weights and biases, but the "
                f"trainable parameters {others} belong to other modules. Freeze them "
                "(requires_grad=False), pass layers=[...] to span chosen layers only, or use "
                "'srht' or 'dense'."
            )
    if not spanned:
        raise UnsupportedModelError("the model has no trainable nn.Linear or nn.Conv2d layer.")
    return spanned


def _check_shapes(
    shapes: list[tuple[int, int]], layers: list[KroneckerLayer]
) -> list[tuple[int, int]]:
    """Validate explicit per-layer (k_out, k_in)."""
    shapes = [(int(a), int(b)) for a, b in shapes]
    if len(shapes) != len(layers):
        raise InvalidParameterError(
            f"shapes has {len(shapes)} entries but Kronecker spans {len(layers)} layers "
            f"{[m.module for m in layers]}."
        )
    for (k_out, k_in), layer in zip(shapes, layers, strict=True):
        if not (1 <= k_out <= layer.out_dim and 1 <= k_in <= layer.in_dim):
            raise InvalidParameterError(
                f"layer {layer.module!r}: (k_out, k_in)=({k_out}, {k_in}) must satisfy "
                f"1 <= k_out <= {layer.out_dim} and 1 <= k_in <= {layer.in_dim}."
            )
    return shapes


def allocate(dims: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
    """Per-layer (k_out, k_in) for a total near k: budgets proportional to out*in_dim, rounded
    smallest layer first with the rounding error carried forward (see Kronecker's docstring)."""
    if k < len(dims):
        raise InvalidParameterError(
            f"k={k} is smaller than the number of spanned layers ({len(dims)}): each layer needs "
            "at least one direction. Raise k or restrict with layers=."
        )
    d = sum(o * i for o, i in dims)
    shapes: list[tuple[int, int]] = [(0, 0)] * len(dims)
    carry = 0.0
    for index in sorted(range(len(dims)), key=lambda j: dims[j][0] * dims[j][1]):
        out_dim, in_dim = dims[index]
        budget = k * out_dim * in_dim / d + carry
        shapes[index] = _closest_product(max(budget, 1.0), out_dim, in_dim)
        carry = budget - shapes[index][0] * shapes[index][1]
    return shapes


def _closest_product(target: float, out_dim: int, in_dim: int) -> tuple[int, int]:
    """(k_out, k_in) with k_out*k_in closest to target, aspect within 4x of out/in_dim
    (ties: closest aspect)."""
    ideal = math.sqrt(target * out_dim / in_dim)
    low = max(1, math.floor(ideal / 2))
    high = min(out_dim, max(low, math.ceil(ideal * 2)))
    best, best_key = (1, 1), (math.inf, math.inf)
    for k_out in range(low, high + 1):
        k_in = min(in_dim, max(1, round(target / k_out)))
        key = (abs(k_out * k_in - target), abs(math.log(k_out / ideal)))
        if key < best_key:
            best, best_key = (k_out, k_in), key
    return best
