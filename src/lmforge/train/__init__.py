"""Training: the one step loop (`loop.py`) and what it is made of; `pretrain.py` is the recipe.

Fine-tuning and alignment recipes reuse the same loop, checkpoints and metrics.
"""
