"""Models from elsewhere, in their own files' layouts, to and from our GPT.

- `hf.py`: Hugging Face folders (GPT2LMHeadModel, LlamaForCausalLM): config.json, the
  state-dict names and layouts, safetensors weights (sharded or not; never a pickle).
- `hf_tokenizer.py`: the tokenizer files beside them (tokenizer.json, vocab.json +
  merges.txt) <-> our byte-level BPE `Tokenizer`, read and written exactly or not at all.
- `openai_gpt2.py`: OpenAI's original GPT-2 release (TensorFlow variable names), renamed
  to Hugging Face's GPT-2 names and read through `hf.py`.
- `llama2c.py`: llama2.c's `.bin` checkpoints (read only).
- `gguf.py`: one GGUF file for llama.cpp (write only): its gpt2 and llama architectures,
  the tokenizer, the chat template as Jinja; f32, f16 or q8_0.
"""
