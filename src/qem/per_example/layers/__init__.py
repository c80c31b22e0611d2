"""Layer types of the per-example engine, one file each; importing this package registers them.

A new layer type is one file with a ``LayerType`` subclass decorated ``@register_layer(cls)``
and one import line here; the Kronecker subspace and K-FAC need no change.
"""

from qem.per_example.layers import conv2d, linear  # noqa: F401  (registers the layer types)
from qem.per_example.layers.registry import (
    LayerType,
    check_layer,
    layer_type,
    register_layer,
    supported_names,
)

__all__ = ["LayerType", "check_layer", "layer_type", "register_layer", "supported_names"]
