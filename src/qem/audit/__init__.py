"""Empirical privacy audits of qem's releases (docs/theory.md §17).

* pair audits (qem.audit.run): many releases on a worst-case neighbouring pair
  (qem.audit.pairs) for every release path, verdict against the claim;
* one-run audits (qem.audit.one_run): canaries in one real fine-tuning (Steinke, Nasr &
  Jagielski 2023);
* the statistics both use (qem.audit.statistics); everything they take from the engine comes
  through qem.audit.release_paths.
"""

from qem.audit.pairs import FEATURES, REACH, RECORDS, WorstCasePair, statistic, worst_case_pair
from qem.audit.release_paths import SEEDED_BUGS
from qem.audit.run import (
    AUDIT_DEFAULTS,
    DEFAULT_CONFIDENCE,
    DEFAULT_N,
    END_TO_END_DEFAULTS,
    END_TO_END_PATHS,
    PATHS,
    AuditResult,
    gdp_mu,
    run_all,
    run_audit,
)
from qem.audit.statistics import (
    EpsilonBound,
    OneRunBound,
    clopper_pearson_upper,
    epsilon_lower_bound,
    gaussian_tradeoff,
    one_run_bound,
    one_run_epsilon,
    one_run_p_value,
    profile_tradeoff,
    standardized_shift,
    tradeoff_excess,
)

__all__ = [
    "AUDIT_DEFAULTS",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_N",
    "END_TO_END_DEFAULTS",
    "END_TO_END_PATHS",
    "FEATURES",
    "PATHS",
    "REACH",
    "RECORDS",
    "SEEDED_BUGS",
    "AuditResult",
    "EpsilonBound",
    "OneRunBound",
    "WorstCasePair",
    "clopper_pearson_upper",
    "epsilon_lower_bound",
    "gaussian_tradeoff",
    "gdp_mu",
    "one_run_bound",
    "one_run_epsilon",
    "one_run_p_value",
    "profile_tradeoff",
    "run_all",
    "run_audit",
    "standardized_shift",
    "statistic",
    "tradeoff_excess",
    "worst_case_pair",
]
