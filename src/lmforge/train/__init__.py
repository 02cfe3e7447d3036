"""Training building blocks: the one `Trainer` loop (`loop.py`) and what it is made of.

`optim.py` AdamW and the learning-rate schedule, `checkpoint.py` step folders that
resume exactly, `distributed.py` torchrun (DDP/FSDP), `metrics.py` logs and the loss
curve, `loss.py` the next-token loss of a wrapped model, `config.py` the run's
settings. Recipes (`lmforge.recipes`: pretrain, classify, instruct) wire them.
"""
