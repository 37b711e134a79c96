"""Checkpoints to figures: top-1/top-5, few-shot linear evaluation, the confusion matrix (evaluate), and whether a
challenger is better than the champion by more than noise (compare: a paired bootstrap)."""
