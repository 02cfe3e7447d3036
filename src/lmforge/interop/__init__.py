"""Weights from elsewhere: Hugging Face folders (`hf.py`), OpenAI's GPT-2 layout, llama2.c."""
