"""The metrics of METHOD.md s4 as pure functions on tensors, and their streaming accumulators.

Codes are dense (N, n) tensors or sparse ``SparseCode`` / (values, indices) pairs with
``n_latents``; a latent fires on a sample when its activation is > 0. Each function's module
docstring gives its exact definition; each is tested against a naive reference
(tests/test_metrics.py). One-shot functions run their accumulator over one or more chunks, so a
notebook and the streamed evaluation stage compute the same numbers.
"""

from sae.metrics._sparse import CodesLike, as_sparse, firing_entries, truncate_top_m
from sae.metrics.dictionary import PlantedRecovery, max_cosines, planted_recovery, seed_stability
from sae.metrics.monosemanticity import (
    MonoAccumulator,
    MonoSummary,
    monosemanticity,
    monosemanticity_summary,
)
from sae.metrics.probe import (
    DEFAULT_M_VALUES,
    linear_probe,
    mean_average_precision,
    probe_metric,
    truncated_probe,
)
from sae.metrics.purity import (
    PurityAccumulator,
    PurityScores,
    TopActivations,
    class_purity,
    n_classes_of,
    purity_of_top,
)
from sae.metrics.reconstruction import (
    FiringCounter,
    R2Accumulator,
    ReconstructionScores,
    dead_latents,
    fvu,
    l0,
    nmse,
    r2_score,
    reconstruction_scores,
)
from sae.metrics.robustness import (
    DEFAULT_MULTIPLES,
    KRobustness,
    inference_ks,
    k_robustness,
    k_robustness_from,
)

__all__ = [
    "DEFAULT_MULTIPLES", "DEFAULT_M_VALUES", "CodesLike", "FiringCounter", "KRobustness",
    "MonoAccumulator", "MonoSummary", "PlantedRecovery", "PurityAccumulator", "PurityScores",
    "R2Accumulator", "ReconstructionScores", "TopActivations", "as_sparse", "class_purity",
    "dead_latents", "firing_entries", "fvu", "inference_ks", "k_robustness", "k_robustness_from",
    "l0", "linear_probe", "max_cosines", "mean_average_precision", "monosemanticity",
    "monosemanticity_summary", "n_classes_of", "nmse", "planted_recovery", "probe_metric",
    "purity_of_top", "r2_score", "reconstruction_scores", "seed_stability", "truncate_top_m",
    "truncated_probe",
]
