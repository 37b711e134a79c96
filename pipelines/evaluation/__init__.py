"""Checkpoints to figures: top-1/top-5, few-shot linear evaluation, the confusion matrix."""
