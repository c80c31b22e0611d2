"""Per-layer Kronecker basis over the layer types of the per-example engine (qem.per_example.layers:
nn.Linear, nn.Conv2d): the gradient G of [W | b] of each layer is projected as P_out^T G P_in,
and per-example projections cost about one forward/backward."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from qem.data import Inputs, batch_size_of
from qem.defaults import SUBSPACE_K
from qem.errors import InvalidParameterError, ShapeError, UnsupportedModelError
from qem.losses import LossFn
from qem.model_calls import call_model
from qem.parameters import Layers, describe_layers, layer_list, select_modules
from qem.per_example import (
    LayerCall,
    LossesOf,
    MixingCheck,
    backpropagate,
    check_examples_independent,
    check_recording,
    per_example_losses,
    record_calls,
    shared_machine_threads,
)
from qem.per_example.layers import check_layer, layer_type, supported_names
from qem.subspace.base import Subspace
from qem.subspace.dense import orthonormal_gaussian


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
    _cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )

    @property
    def weight_cols(self) -> int:
        """Columns of G that come from the weight."""
        return self.in_dim - (self.bias is not None)

    def factors_as(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_in, P_out) in ``dtype``, converted once per dtype (the model's precision)."""
        if dtype not in self._cast:
            self._cast[dtype] = (self.p_in.to(dtype), self.p_out.to(dtype))
        return self._cast[dtype]


class Kronecker(Subspace):
    """P = blockdiag_l (P_out,l (x) P_in,l) over the Linear and Conv2d layers (every layer type
    qem.per_example.layers registers), in module order.

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

    Per-example gradients (``per_example_gradients``, qem.per_example): forward hooks record
    each layer's input a_i (Conv2d: unfolded, (in*kh*kw, L) with L output positions), and one
    backward pass of the SUM of the per-example losses gives the backprops
    delta_i = d loss_i / d output_i (out, L). This is exact only when examples do not interact:
    BatchNorm with batch statistics is refused, and any other mixing (batch-mean centring,
    attention across the batch) is refused by a data-independent check on a synthetic probe
    batch (qem.per_example.MixingCheck), run once per model configuration; the loss is applied
    to each example as a batch of one (``per_example_losses``). Then P_out^T G_i P_in =
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
            k = min(sum(out_dim * in_dim for out_dim, in_dim in dims), SUBSPACE_K)
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
        self._mixing = MixingCheck()

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
        cannot mix them either (``per_example_losses``); on the threads other processes leave
        free (qem.per_example.shared_machine_threads)."""
        check_examples_independent(model)
        dtype = next(iter(self.parameters_of(model).values())).dtype
        with shared_machine_threads():
            self._mixing(model, inputs, partial(self._hooked_gradients, model), dtype)
            return self._hooked_gradients(
                model, lambda outputs: per_example_losses(loss_fn, outputs, targets), inputs
            )

    def _hooked_gradients(
        self, model: nn.Module, losses_of: LossesOf, inputs: Inputs
    ) -> torch.Tensor:
        """(B, k) float64: per layer, sum over calls and positions of (P_out^T delta_i)
        (P_in^T a_i)^T, with a_i and delta_i recorded (qem.per_example.capture) during one
        forward and one backward pass of sum_i losses_of(model(inputs))_i."""
        batch = batch_size_of(inputs)
        with record_calls(model, [m.module for m in self.layers]) as recording:
            with torch.enable_grad():
                losses = losses_of(call_model(model, inputs))
            if losses.shape != (batch,):
                raise ShapeError(
                    f"the loss returned shape {tuple(losses.shape)} for a batch of {batch}; "
                    "qem needs one loss per example."
                )
        check_recording(recording, batch, "restrict with layers= or use 'srht' or 'dense'.")
        backpropagate(losses.sum(), recording)
        modules = dict(model.named_modules())
        grads = torch.zeros(batch, self.k, dtype=torch.float64, device=self.device)
        start = 0
        for layer in self.layers:
            size = layer.k_out * layer.k_in
            block = grads[:, start : start + size].view(batch, layer.k_out, layer.k_in)
            self._add_layer_projection(modules[layer.module], layer, recording[layer.module], block)
            start += size
        return grads

    def _add_layer_projection(
        self, module: nn.Module, layer: KroneckerLayer, calls: list[LayerCall], block: torch.Tensor
    ) -> None:
        """block (B, k_out, k_in), float64 += sum over calls and positions of
        (P_out^T delta)(P_in^T [a; 1])^T."""
        rule = layer_type(module)
        for call in calls:
            if call.backprop is None:  # this call's output did not reach the loss
                continue
            # Projected in the model's precision (the per-example gradients themselves are no
            # more precise); clipping and sums downstream are float64.
            activation = call.activation.to(device=self.device)
            backprop = call.backprop.to(device=self.device, dtype=activation.dtype)
            p_in, p_out = layer.factors_as(activation.dtype)
            cols = layer.weight_cols
            p_a = rule.projected_inputs(module, activation, p_in[:cols])
            p_delta = rule.projected_backprops(module, backprop, p_out)
            if layer.bias is not None:
                p_a = p_a + p_in[cols]
            block += p_delta.transpose(1, 2) @ p_a  # (B, k_out, k_in), summed in float64

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


def _chosen_layers(model: nn.Module, layers: Layers | None) -> list[str]:
    """Names of the modules of a registered layer type (Linear, Conv2d) to span, in module
    order: every one with a trainable weight (``layers`` None), or those among and inside the
    modules ``layers`` chooses, frozen ones skipped. A chosen module without such a layer in
    it, or a layer named explicitly whose weight is frozen, is an error."""
    modules = dict(model.named_modules())
    if layers is None:
        return [
            n for n, m in modules.items() if layer_type(m) is not None and m.weight.requires_grad
        ]
    named = {spec for spec in layer_list(layers) if isinstance(spec, str)}
    chosen: set[str] = set()
    for name in select_modules(model, layers):
        module = modules[name]
        inside = [n for n, m in module.named_modules(prefix=name) if layer_type(m) is not None]
        if not inside:
            raise UnsupportedModelError(
                f"module {name!r} is a {type(module).__name__}; Kronecker spans only "
                f"{supported_names()} layers."
            )
        is_layer = layer_type(module) is not None
        if name in named and is_layer and not module.weight.requires_grad:
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
        check_layer(name, module)
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
                f"Kronecker spans only {supported_names()} weights and biases, but the "
                f"trainable parameters {others} belong to other modules. Freeze them "
                "(requires_grad=False), pass layers=[...] to span chosen layers only, or use "
                "'srht' or 'dense'."
            )
    if not spanned:
        raise UnsupportedModelError(f"the model has no trainable {supported_names()} layer.")
    return spanned


def spans_every_trainable_parameter(model: nn.Module, layers: Layers | None = None) -> bool:
    """Whether a Kronecker subspace can span ``model`` (restricted to ``layers``): its trainable
    parameters all sit, untied, in the layer types it supports."""
    try:
        _find_layers(model, layers)
    except UnsupportedModelError:
        return False
    return True


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
