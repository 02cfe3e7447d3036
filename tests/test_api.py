"""The public API: the names the README documents resolve from the top-level package."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lmforge
from lmforge.engine import Engine, SamplingParams
from lmforge.finetune.lora import LoRAConfig, apply_lora, merge_lora
from lmforge.finetune.nf4 import dequantize_nf4, quantize_nf4
from lmforge.loading import load


def test_every_public_name_resolves_to_its_definition():
    assert set(lmforge.__all__) == {"LmforgeError", "Tokenizer", "__version__", *lmforge._LAZY}
    for name in lmforge.__all__:
        assert getattr(lmforge, name) is not None, name
    assert (lmforge.load, lmforge.Engine, lmforge.SamplingParams) == (load, Engine, SamplingParams)
    assert (lmforge.LoRAConfig, lmforge.apply_lora, lmforge.merge_lora) == (LoRAConfig, apply_lora, merge_lora)
    assert (lmforge.quantize_nf4, lmforge.dequantize_nf4) == (quantize_nf4, dequantize_nf4)


def test_importing_the_package_does_not_import_torch():
    """`lmforge tokenizer ...` starts without torch's ~2 s import."""
    code = "import sys, lmforge; lmforge.Tokenizer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_the_machine_s_errors_are_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """A full disk or a read-only folder is the machine's, not a bug: one line, exit 2."""
    import errno

    from lmforge import cli

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "train.bin"))

    monkeypatch.setattr(cli.tokenizer, "_train", full_disk)
    assert cli.main(["tokenizer", "train", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: No space left on device: ") and "train.bin" in err and err.count("\n") == 1
    monkeypatch.setenv("LMFORGE_TRACEBACK", "1")
    with pytest.raises(OSError):
        cli.main(["tokenizer", "train", "--out", str(tmp_path / "out")])
