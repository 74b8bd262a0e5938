"""FID-50K metrics comparable with ADM's TensorFlow evaluator: FID, sFID, Inception Score and
improved precision/recall on torch-fidelity's TF-compatible Inception-v3."""

from .errors import MetricsError
from .evaluation import evaluate, evaluate_file, write_report
from .inception import WEIGHTS_FILE, WEIGHTS_URL, InceptionFeatures
from .manifold import precision_recall
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
    "evaluate_file",
    "frechet_distance",
    "inception_score",
    "load_reference",
    "precision_recall",
    "write_reference",
    "write_report",
]
