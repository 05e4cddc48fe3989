"""Evaluators that detectron2 0.6 lacks without optional dependencies (detectron2 imported)."""

from .panoptic import PanopticQualityEvaluator, pq_from_stats

__all__ = ["PanopticQualityEvaluator", "pq_from_stats"]
