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
* ``subspace = "auto"``: a Kronecker subspace when it spans every trainable parameter (each in
  an untied nn.Linear or nn.Conv2d), SRHT otherwise (qem.public.config.PublicSide.for_model).
* ``curvature = None``: K-FAC in a Kronecker subspace (its factors are kept and projected into
  every round's subspace), the exact GGN in any other.
* ``schedule = None`` and ``rounds = None``: the schedule follows from N, the number of private
  records, a public fact under replace-one, and the declared N under add/remove
  (``default_schedule``); ``rounds = T`` alone gives T sequential rounds (or
  partitioned ones with ``partition_rounds``), as before (docs/theory.md §13).
"""

from __future__ import annotations

from types import MappingProxyType

SUBSPACE_K = 1024
"""The subspace dimension of dense, srht and kronecker when k is not given: min(d, SUBSPACE_K)."""

ROUND_RECORDS = 1024
"""The expected number of records a round of the default schedule reads."""

MAX_DEFAULT_ROUNDS = 100
"""The most rounds the default schedule runs (one expected epoch up to this)."""


def default_schedule(N: int, mode: str = "gdp") -> dict:
    """The default schedule for a public dataset size N, in its JSON form (qem.schedules).

    N is public (the record count under replace-one, the declared N under add/remove), so the
    choice releases nothing. In pure mode, or up to 2 ROUND_RECORDS records: one sequential
    round over all of them (a small dataset buys one good direction; more rounds split a budget
    that is already tight). Beyond: Poisson rounds reading ROUND_RECORDS records in
    expectation, one expected epoch (T = round(N / ROUND_RECORDS)) up to MAX_DEFAULT_ROUNDS,
    accounted by the PLD of the subsampled Gaussian (docs/theory.md §13).
    """
    if mode == "pure" or N <= 2 * ROUND_RECORDS:
        return {"kind": "sequential", "rounds": 1}
    rounds = min(MAX_DEFAULT_ROUNDS, round(N / ROUND_RECORDS))
    return {"kind": "poisson", "expected_batch": ROUND_RECORDS, "rounds": rounds}


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
        "rounds": None,
        "resample_subspace": None,
        "partition_rounds": False,
        # subspace and curvature
        "subspace": "auto",
        "k": None,
        "subspace_seed": 0,
        "layers": None,
        "curvature": None,
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
        "confirmation_size": None,
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
