"""Parameter subsets: P = I on chosen parameters (by name or by module), the others frozen."""

from __future__ import annotations

from torch import nn

from qem.errors import InvalidParameterError, UnsupportedModelError
from qem.subspace.identity import Identity

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ParameterSubset(Identity):
    """P = the coordinate embedding of the chosen parameters (k = their total size).

    ``names`` selects trainable parameters by their ``named_parameters`` name, ``modules``
    selects every trainable parameter of the named modules (and their submodules); both may be
    given (union). Per-example gradients differentiate only the chosen parameters.
    """

    kind = "subset"

    def __init__(
        self,
        model: nn.Module,
        names: list[str] | str | None = None,
        modules: list[str] | str | None = None,
    ) -> None:
        if names is None and modules is None:
            raise InvalidParameterError(
                "ParameterSubset needs names= or modules=; use Identity for all parameters."
            )
        names = [names] if isinstance(names, str) else list(names or [])
        modules = [modules] if isinstance(modules, str) else list(modules or [])
        chosen = set(names)
        self.modules: tuple[str, ...] = tuple(modules)
        for module_name in self.modules:
            chosen.update(_module_parameter_names(model, module_name))
        ordered = [n for n, _ in model.named_parameters() if n in chosen]
        ordered += sorted(chosen.difference(ordered))  # unknown names: reported by the base
        super().__init__(model, parameter_names=ordered)

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


def last_layer(model: nn.Module) -> ParameterSubset:
    """The parameters of the last Linear or Conv module in module order (``named_modules``)."""
    layers = [
        name
        for name, m in model.named_modules()
        if isinstance(m, _LAYER_TYPES) and any(p.requires_grad for p in m.parameters())
    ]
    if not layers:
        raise UnsupportedModelError(
            "the model has no trainable Linear or Conv module; choose parameters with "
            "ParameterSubset(names=...) instead."
        )
    return ParameterSubset(model, modules=[layers[-1]])


def biases(model: nn.Module) -> ParameterSubset:
    """All trainable parameters whose name ends with 'bias'."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    if not names:
        raise UnsupportedModelError("the model has no trainable parameters named '...bias'.")
    return ParameterSubset(model, names=names)
