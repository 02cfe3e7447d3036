"""Model-level numerics below the model: what `GPT` computes with, and nothing it imports back.

`loss.py` holds the next-token cross-entropy's fast route (`linear_cross_entropy`, never
holding the (N, vocab) logits) and `IGNORE_INDEX`, the label the loss skips, which the
data formats write into their labels.
"""

from lmforge.ops.loss import IGNORE_INDEX, head_loss, linear_cross_entropy

__all__ = ["IGNORE_INDEX", "head_loss", "linear_cross_entropy"]
