"""entrodrop_fast: entropy-based block pruning of LLMs (EntroDrop) with compiled estimators.

The estimators (``bucket_entropy``, ``gaussian_diag_entropy``, ``gaussian_full_entropy``,
``knn_entropy``, ``renyi_entropy``, ``cosine_importance``, ``angular_distance``,
``bucket_entropy_and_cosine`` (both from one read), and the
opt-in robust bucket variants ``bucket_q_entropy``, ``bucket_nosink_entropy``,
``bucket_tokennorm_entropy``) take
``[N, D]`` or ``[B, T, D]`` tensors; ``backends()`` says which compiled backends exist.
"""

from entrodrop_fast import _fork  # noqa: F401  (first: a fork after import is noticed)
from entrodrop_fast.ops.api import (
    BACKENDS,
    METHODS,
    angular_distance,
    backends,
    bucket_entropy,
    bucket_entropy_and_cosine,
    cosine_importance,
    delta_entropy,
    entropy,
    gaussian_diag_entropy,
    gaussian_full_entropy,
    knn_entropy,
    renyi_entropy,
    resolve_backend,
)
from entrodrop_fast.ops.reference import bucket_onehot_reference
from entrodrop_fast.ops.robust import (
    ROBUST_METHODS,
    bucket_nosink_entropy,
    bucket_q_entropy,
    bucket_tokennorm_entropy,
)
from entrodrop_fast.ops.states import CovState, EntropyMeter, MomentState, SampleStats, all_reduce_
from entrodrop_fast.prune.export import export_pruned, load_pruned
from entrodrop_fast.prune.ranking import make_plan
from entrodrop_fast.prune.surgery import drop_blocks_

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "METHODS",
    "ROBUST_METHODS",
    "CovState",
    "EntropyMeter",
    "MomentState",
    "SampleStats",
    "__version__",
    "all_reduce_",
    "angular_distance",
    "backends",
    "bucket_entropy",
    "bucket_entropy_and_cosine",
    "bucket_nosink_entropy",
    "bucket_onehot_reference",
    "bucket_q_entropy",
    "bucket_tokennorm_entropy",
    "cosine_importance",
    "delta_entropy",
    "drop_blocks_",
    "export_pruned",
    "entropy",
    "gaussian_diag_entropy",
    "gaussian_full_entropy",
    "knn_entropy",
    "load_pruned",
    "make_plan",
    "renyi_entropy",
    "resolve_backend",
]
