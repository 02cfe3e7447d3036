"""Talking to a model: terminal chat (`chat.py`); the HTTP API comes later."""
