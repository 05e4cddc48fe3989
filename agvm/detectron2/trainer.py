"""The Trainer every project builds on (detectron2's DefaultTrainer + agvm's evaluator choice)."""

from __future__ import annotations

from detectron2.engine import DefaultTrainer

from .engine import build_evaluator

__all__ = ["Trainer"]


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with the evaluator picked from the dataset's metadata."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)
