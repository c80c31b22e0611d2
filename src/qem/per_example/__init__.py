"""The per-example gradient engine shared by the Kronecker subspace and K-FAC.

- ``capture``: forward hooks recording each chosen layer's inputs, and one backward pass to
  its outputs' backprops (``record_calls``, ``backpropagate``);
- ``layers``: one file per layer type (Linear, Conv2d) turning a call's (input, backprop) into
  per-position (a, delta), registered with ``register_layer``;
- ``generic``: the torch.func vmap path for any model, one example at a time when vmap
  cannot batch it;
- ``independence``: the checks that examples do not interact (batch statistics, the
  data-independent mixing probe of the hooked path);
- ``threads``: how many intra-op threads the per-example passes use on a shared machine.
"""

from qem.per_example.capture import (
    LayerCall,
    Recording,
    backpropagate,
    check_recording,
    record_calls,
)
from qem.per_example.generic import per_example_losses, vmapped_gradients
from qem.per_example.independence import (
    HookedGradients,
    LossesOf,
    MixingCheck,
    check_examples_independent,
)
from qem.per_example.threads import free_cores, shared_machine_threads

__all__ = [
    "HookedGradients",
    "LayerCall",
    "LossesOf",
    "MixingCheck",
    "Recording",
    "backpropagate",
    "check_examples_independent",
    "check_recording",
    "free_cores",
    "per_example_losses",
    "record_calls",
    "shared_machine_threads",
    "vmapped_gradients",
]
