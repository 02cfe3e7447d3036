"""Simulated failures of folder swaps, shared by the io and checkpoint tests."""

from __future__ import annotations

import os

import pytest

import lmforge.io as lio


def break_dir_renames(monkeypatch: pytest.MonkeyPatch, *, from_call: int, crash: bool) -> None:
    """No atomic exchange (the two-rename fallback runs), and folder rename number
    `from_call` raises OSError: only that one (an error the code may undo), or with
    `crash` every one from then on (the machine is gone: no later rename happens).
    `monkeypatch.undo()` or restoring `os.replace` ends it."""
    monkeypatch.setattr(lio, "_exchange", lambda a, b: False)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        if os.path.isdir(src):
            calls.append(src)
            if len(calls) == from_call or (crash and len(calls) > from_call):
                raise OSError("simulated crash" if crash else "rename refused")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
