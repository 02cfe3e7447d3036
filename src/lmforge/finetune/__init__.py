"""Fine-tuning building blocks: what makes a pretrained model cheap to adapt.

`lora.py` is the LoRA layer (a subclass of `nn.Linear`) and the model surgery that
applies, disables and merges adapters; `adapter.py` the adapter folder (save, load,
checked against its base); `nf4.py` our NF4 4-bit weights with double quantization
(QLoRA's frozen base). The recipes that use them (`classify`, `instruct`) are in
`lmforge.recipes`.
"""
