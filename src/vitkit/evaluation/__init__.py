"""Measuring representations: frozen features, few-shot linear regression, full linear probes."""

from vitkit.evaluation.features import ExtractionProgress, FeatureCache, extract_features
from vitkit.evaluation.fewshot import (
    DEFAULT_L2,
    L2_GRID,
    FewShotResult,
    RidgeClassifier,
    RidgeSolver,
    fewshot_evaluate,
    fit_ridge,
)
from vitkit.evaluation.linear_eval import LinearEvalReport, check_shots, linear_evaluation
from vitkit.evaluation.linear_probe import ProbeResult, fit_logistic, linear_probe

__all__ = [
    "DEFAULT_L2", "ExtractionProgress", "FeatureCache", "FewShotResult", "L2_GRID", "LinearEvalReport",
    "ProbeResult", "RidgeClassifier", "RidgeSolver", "check_shots", "extract_features", "fewshot_evaluate",
    "fit_logistic", "fit_ridge", "linear_evaluation", "linear_probe",
]
