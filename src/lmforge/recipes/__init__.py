"""Recipes: each wires the reusable modules for one job, as a short `run(cfg)` over the one `Trainer`.

`pretrain` (token files -> a model), `quickstart` (the whole pipeline on a time budget),
`classify` (a classification head: spam or ham) and `instruct` (prompt-masked instruction
tuning); `common` is their shared scaffold (run folder and `run.json`, the base model a
fine-tuning run starts from, which weights learn, adapter checkpoints), `config` the
fine-tuning run's settings. The mechanics (accumulation, clipping, evaluation,
checkpoints, logging) live once, in `lmforge.train.loop`.
"""
