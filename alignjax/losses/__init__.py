"""Pure-function preference-alignment losses.

Every loss returns ``(losses [B], diagnostics NamedTuple)``; reduce the
per-example losses yourself (e.g. ``losses.mean()``).
"""

from alignjax.losses.aligndistil import (
    AlignDistilOutput,
    AlignDistilTeacher,
    aligndistil_loss,
    aligndistil_teacher,
)
from alignjax.losses.critical_tokens import (
    CriticalTokenOutput,
    cdpo_loss,
    critical_token_scores,
)
from alignjax.losses.displacement import (
    EntanglementOutput,
    ches_scores,
    gradient_entanglement,
)
from alignjax.losses.kto import (
    KTOOutput,
    kto_kl_estimate,
    kto_loss,
    kto_mismatched_pairs,
)
from alignjax.losses.logprobs import (
    TokenStats,
    chunked_map,
    chunked_scan,
    chunked_token_logprobs,
    chunked_token_stats,
    masked_mean,
    masked_sum,
    sequence_kl,
    sequence_logprobs,
    shift_for_next_token,
    token_entropy,
    token_kl,
    token_logprobs,
)
from alignjax.losses.preference import (
    GPO_ALIASES,
    GPO_FUNCTIONS,
    PreferenceOutput,
    dpo_loss,
    exponential,
    gpo_function,
    gpo_loss,
    hinge,
    logistic,
    savage,
    squared,
    truncated_quadratic,
)
from alignjax.losses.reference_free import (
    ORPOOutput,
    genarm_loss,
    log1mexp,
    orpo_loss,
    simpo_loss,
)
from alignjax.losses.reward import RewardOutput, bradley_terry_loss
from alignjax.losses.sparsepo import (
    SparsePOOutput,
    sparsepo_loss,
)
from alignjax.losses.tdpo import (
    TDPOOutput,
    TDPOStats,
    tdpo_loss,
    tdpo_loss_from_stats,
    tdpo_sequence_stats,
)

__all__ = [
    "AlignDistilOutput",
    "AlignDistilTeacher",
    "CriticalTokenOutput",
    "EntanglementOutput",
    "GPO_ALIASES",
    "GPO_FUNCTIONS",
    "KTOOutput",
    "ORPOOutput",
    "PreferenceOutput",
    "RewardOutput",
    "SparsePOOutput",
    "TDPOOutput",
    "TDPOStats",
    "aligndistil_loss",
    "aligndistil_teacher",
    "bradley_terry_loss",
    "TokenStats",
    "cdpo_loss",
    "ches_scores",
    "chunked_map",
    "chunked_scan",
    "chunked_token_logprobs",
    "chunked_token_stats",
    "critical_token_scores",
    "dpo_loss",
    "exponential",
    "genarm_loss",
    "gpo_function",
    "gpo_loss",
    "gradient_entanglement",
    "hinge",
    "kto_kl_estimate",
    "kto_loss",
    "kto_mismatched_pairs",
    "log1mexp",
    "logistic",
    "masked_mean",
    "masked_sum",
    "orpo_loss",
    "savage",
    "sequence_kl",
    "sequence_logprobs",
    "shift_for_next_token",
    "simpo_loss",
    "sparsepo_loss",
    "squared",
    "tdpo_loss",
    "tdpo_loss_from_stats",
    "tdpo_sequence_stats",
    "token_entropy",
    "token_kl",
    "token_logprobs",
    "truncated_quadratic",
]
