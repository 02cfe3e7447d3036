"""Fine-tuning: a pretrained model learns a task.

Reusable parts live here (`lora` adapters, `nf4` 4-bit weights, the classifier head);
the recipes (`classify`, `instruct`) wire them to the data formats in `lmforge.data`
and to the one training loop in `lmforge.train.loop`.
"""
