"""`lmforge compare` (issue 15): two tiny pretraining runs that differ in two settings give a
PNG and a table naming those settings and each run's final figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared
from data_fixtures import small_tokenizer

from lmforge.cli import main
from lmforge.data.prepare import prepare
from lmforge.train.compare import differing_settings, final_metrics, read_runs, table

VERDICT = shared("llms-from-scratch/the-verdict.txt")
TINY = ["--preset", "nano", "--context-length", "16", "--batch-size", "2", "--eval-batches", "1", "--log-every", "1",
        "--eval-every", "2", "--sample-tokens", "1", "--sample-prompts", "I", "--device", "cpu", "--warmup-steps", "0",
        "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "n_kv_head=1", "--set", "mlp_hidden=64"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    prepare([VERDICT], small_tokenizer(), root / "data", val_fraction=0.1)
    for name, lr, steps in (("lr-high", "3e-3", "4"), ("lr-low", "1e-4", "6")):
        assert main(["pretrain", "--data", str(root / "data"), "--out", str(root / name), "--lr", lr, "--max-steps", steps, *TINY]) == 0
    return root / "lr-high", root / "lr-low"


def test_compare_draws_the_runs_and_tables_what_differs(runs, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "compare.png"
    assert main(["compare", *map(str, runs), "--x", "tokens", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert out.read_bytes().startswith(PNG)
    lines = stdout.splitlines()
    assert lines[0].split() == ["lr-high", "lr-low"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if line.startswith("  ")}
    assert rows["lr"] == ["0.003", "0.0001"] and rows["max_steps"] == ["4", "6"]
    assert "out" not in rows and "seed" not in rows  # the output folder is the run's name; the seed is the same
    finals = {" ".join(line.split()[:-2]): line.split()[-2:] for line in lines if line.startswith("  ") and "loss" in line}
    high, low = ([rec for rec in map(json.loads, (r / "metrics.jsonl").read_text().splitlines()) if rec["split"] == "val"][-1]
                 for r in runs)
    assert finals["final val loss"] == [f"{high['loss']:.4g}", f"{low['loss']:.4g}"]
    assert "final train loss" in finals and "best val loss" in finals
    assert stdout.rstrip().endswith(f"picture: {out}")
    assert main(["compare", *map(str, runs), "--out", str(out), "--metric", "bpb"]) == 0  # our own picture is replaced
    assert "final val bpb" in capsys.readouterr().out


def test_compare_library(runs):
    a, b = read_runs(runs)
    assert differing_settings([a, b]) == ["max_steps", "lr"]
    figures = final_metrics(b, "loss")
    assert figures["final step"] == 6 and figures["best val loss"] <= figures["final val loss"] + 1e-12
    assert table([a, b], "loss")[0] == ["", "lr-high", "lr-low"]


def test_compare_refuses_what_it_cannot_read_or_must_not_replace(runs, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    cases = [
        (["compare", str(runs[0]), str(tmp_path), "--out", str(tmp_path / "c.png")], "no metrics.jsonl"),
        (["compare", str(runs[0]), str(runs[0]), "--out", str(tmp_path / "c.png")], "the same run is given twice"),
        (["compare", *map(str, runs), "--metric", "nothing", "--out", str(tmp_path / "c.png")], "no run logs 'nothing'"),
        (["compare", *map(str, runs), "--out", str(notes)], "not a PNG"),
        (["compare", *map(str, runs), "--out", str(tmp_path)], "is a folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert notes.read_text() == "mine" and not (tmp_path / "c.png").exists()
