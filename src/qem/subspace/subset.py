"""Parameter subsets: P = I on chosen parameters (by name, by module or by module type), the
others held fixed."""

from __future__ import annotations

from torch import nn

from qem.errors import InvalidParameterError, UnsupportedModelError
from qem.parameters import Layers, describe_layers, layer_parameter_names, modules_within
from qem.subspace.identity import Identity

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ParameterSubset(Identity):
    """P = the coordinate embedding of the chosen parameters (k = their total size).

    ``names`` selects trainable parameters by their ``named_parameters`` name, ``modules``
    selects every trainable parameter of the named modules (and their submodules), ``layers``
    those of module names and types (qem.parameters); any of them may be given (union).
    Per-example gradients differentiate only the chosen parameters.
    """

    kind = "subset"

    def __init__(
        self,
        model: nn.Module,
        names: list[str] | str | None = None,
        modules: list[str] | str | None = None,
        *,
        layers: Layers | None = None,
    ) -> None:
        if names is None and modules is None and layers is None:
            raise InvalidParameterError(
                "ParameterSubset needs names=, modules= or layers=; use Identity for all "
                "parameters."
            )
        names = [names] if isinstance(names, str) else list(names or [])
        modules = [modules] if isinstance(modules, str) else list(modules or [])
        chosen = set(names)
        self.modules: tuple[str, ...] = tuple(modules)
        for module_name in self.modules:
            chosen.update(_module_parameter_names(model, module_name))
        if layers is not None:
            chosen.update(layer_parameter_names(model, layers))
        ordered = [n for n, _ in model.named_parameters() if n in chosen]
        ordered += sorted(chosen.difference(ordered))  # unknown names: reported by the base
        super().__init__(model, parameter_names=ordered)
        self.layer_selection = describe_layers(layers)

    def describe(self) -> dict:
        """The base description plus the module names used for the selection, if any."""
        return {**super().describe(), "modules": list(self.modules)}


def _module_parameter_names(model: nn.Module, module_name: str) -> list[str]:
    """Names of the trainable parameters of ``module_name`` and its submodules."""
    modules = dict(model.named_modules())
    if module_name not in modules:
        raise UnsupportedModelError(
            f"the model has no module named {module_name!r}; available: {[n for n in modules if n]}"
        )
    prefix = f"{module_name}." if module_name else ""
    found = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix)]
    if not found:
        raise UnsupportedModelError(f"module {module_name!r} has no trainable parameters.")
    return found


def last_layer(model: nn.Module, layers: Layers | None = None) -> ParameterSubset:
    """The parameters of the last Linear or Conv module in module order (``named_modules``),
    among the modules ``layers`` chooses and inside them when given."""
    allowed = None if layers is None else set(modules_within(model, layers))
    candidates = [
        name
        for name, m in model.named_modules()
        if isinstance(m, _LAYER_TYPES)
        and any(p.requires_grad for p in m.parameters())
        and (allowed is None or name in allowed)
    ]
    if not candidates:
        raise UnsupportedModelError(
            "the model has no trainable Linear or Conv module"
            + ("" if layers is None else f" among the layers {describe_layers(layers)}")
            + "; choose parameters with ParameterSubset(names=...) instead."
        )
    subspace = ParameterSubset(model, modules=[candidates[-1]])
    subspace.layer_selection = describe_layers(layers)
    return subspace


def biases(model: nn.Module, layers: Layers | None = None) -> ParameterSubset:
    """All trainable parameters whose name ends with 'bias' (of the modules ``layers`` chooses,
    when given)."""
    if layers is None:
        candidates = [n for n, p in model.named_parameters() if p.requires_grad]
    else:
        candidates = layer_parameter_names(model, layers)
    names = [n for n in candidates if n.endswith("bias")]
    if not names:
        raise UnsupportedModelError("the model has no trainable parameters named '...bias'.")
    subspace = ParameterSubset(model, names=names)
    subspace.layer_selection = describe_layers(layers)
    return subspace
