"""The default recipe: the value of every keyword of ``qem.fine_tune`` that has one, in one
table that the library and the command line share (``qem finetune``, ``qem demo`` and
``qem preview`` read their defaults from it; a test checks it against fine_tune's signature).
Importing it loads nothing but the standard library, so that the command line answers
``--help`` and argument errors before importing torch.

Changing the recipe is a change to this table only. Notes on entries whose meaning is not the
value itself:

* ``k = None``: the subspace's own size for identity, last_layer and biases, and
  ``min(d, SUBSPACE_K)`` for dense, srht and kronecker, d the number of trainable parameters
  the subspace spans (the engine resolves it; a k larger than d cannot be drawn).
* ``clip_norm = None``: C is the ``clip_quantile`` quantile of per-example gradient norms on
  public data (qem.statistics.public_clip_norm), in the norm clipping uses.
* ``prior_weight = None``: in Gaussian-DP mode the step length is chosen by a line search on
  public validation data (docs/theory.md §9), i.e. lam = 1 and a free step; in pure mode
  lam = 1.
* ``schedule = None`` with ``rounds = 1``: one sequential round (docs/theory.md §13).
"""

from __future__ import annotations

from types import MappingProxyType

SUBSPACE_K = 512
"""The subspace dimension of dense, srht and kronecker when k is not given: min(d, SUBSPACE_K)."""

FINE_TUNE_DEFAULTS = MappingProxyType(
    {
        # privacy budget
        "delta": 1e-5,
        "mode": "gdp",
        "adjacency": "replace_one",
        "clipping": "dual",
        "N": None,
        # rounds
        "schedule": None,
        "rounds": 1,
        "resample_subspace": None,
        "partition_rounds": False,
        # subspace and curvature
        "subspace": "srht",
        "k": None,
        "subspace_seed": 0,
        "layers": None,
        "curvature": "ggn",
        "damping": 1e-2,
        "curvature_every": 1,
        "public_sample_size": None,
        # clipping and step length
        "clip_norm": None,
        "clip_quantile": 0.9,
        "prior_weight": None,
        "momentum": 0.0,
        "validation_data": None,
        "line_search_size": None,
        "step_significance": 1.0,
        "radius": None,
        # run
        "seed": None,
        "secure_noise": False,
        "invalid_records": "zero",
        "batch_size": 256,
        "progress": False,
        "on_release": None,
        "distributed": "auto",
        "device": None,
        "noise": True,
    }
)
"""Every keyword of ``fine_tune`` with a default, and that default (read-only)."""

COMMAND_LINE_DEFAULTS = MappingProxyType({**FINE_TUNE_DEFAULTS, "progress": True})
"""The command line's defaults: the library's, with progress bars on."""
