"""Evaluation: confusion-matrix metrics with Hungarian matching (``metrics``), the published
protocol (``protocol``: resize, flip, CRF, parity and strict counting), the dense CRF (``crf``)."""
from stegoseg.evaluation.crf import CRFParams, dense_crf
from stegoseg.evaluation.metrics import ConfusionAccumulator
from stegoseg.evaluation.protocol import EvalConfig, evaluate_model, summary_rows

__all__ = ["CRFParams", "ConfusionAccumulator", "EvalConfig", "dense_crf", "evaluate_model", "summary_rows"]
