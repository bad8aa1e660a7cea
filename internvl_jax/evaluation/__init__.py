"""Evaluation of InternVL models: zero-shot classification, image-text retrieval, captioning
(CIDEr, BLEU-4) and chat exact match, on the demo data or local TFDS datasets."""

from internvl_jax.evaluation.runner import MODES, TASKS, check_task, evaluate, format_table

__all__ = ["MODES", "TASKS", "check_task", "evaluate", "format_table"]
