"""FID-50K metrics comparable with ADM's TensorFlow evaluator: FID, sFID, Inception Score and
improved precision/recall on torch-fidelity's TF-compatible Inception-v3."""

from .errors import MetricsError
from .evaluation import evaluate
from .inception import WEIGHTS_FILE, WEIGHTS_URL, InceptionFeatures
from .manifold import precision_recall
from .npz import iter_npz_array, npz_array_info
from .reference import Reference, load_reference, write_reference
from .stats import FeatureAccumulator, frechet_distance, inception_score

__all__ = [
    "WEIGHTS_FILE",
    "WEIGHTS_URL",
    "FeatureAccumulator",
    "InceptionFeatures",
    "MetricsError",
    "Reference",
    "evaluate",
    "frechet_distance",
    "inception_score",
    "iter_npz_array",
    "load_reference",
    "npz_array_info",
    "precision_recall",
    "write_reference",
]
