"""The quickstart recipe: the whole pipeline in one call, text -> tokenizer -> token files -> a trained model.

It wires the tokenizer trainer, the data preparation and the pretraining recipe, and
sizes the run by time: the pretraining is given a time limit alone, so the trainer
re-estimates its step count from its measured pace as it goes and the cosine schedule
ends on time on a fast machine or a loaded one.

It writes tokenizer/, data/ and model/ into its folder and nothing else: an existing one
is replaced only with `overwrite`, only when it is recognisably a quickstart's own (a
tokenizer folder, a prepared data folder, a run folder) and never when it holds an input.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import Config
from lmforge.corpus import ReadStats, corpus_paths, iter_documents
from lmforge.data.prepare import prepare
from lmforge.data.tokens import FORMAT as TOKENS_FORMAT
from lmforge.data.tokens import META_FILE
from lmforge.errors import LmforgeError
from lmforge.io import lock_folder
from lmforge.recipes.common import RUN_FOLDER_IN_USE, folder_entries, inside
from lmforge.recipes.pretrain import run as pretrain
from lmforge.tokenizer.tokenizer import FORMAT as TOKENIZER_FORMAT
from lmforge.tokenizer.tokenizer import TOKENIZER_FILE
from lmforge.tokenizer.train import train_bpe
from lmforge.train.checkpoint import is_run_folder
from lmforge.train.config import TrainConfig
from lmforge.train.loop import TrainResult

SAMPLE = "The quick brown fox jumps over the lazy dog."
PYTHON_PROMPTS = ["def ", "class Parser(", "import ", "    if "]


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"  # folder for everything it makes
    minutes: float = 6.0  # training time budget
    # chosen by measurement (benchmarks/bench_quickstart.py): the lowest validation bits per
    # byte on the built-in corpus in 6 minutes on 2 CPU cores
    vocab_size: int = 2048  # BPE vocabulary size
    preset: str = "tiny"  # model preset, Llama family by default
    inputs: Sequence[str] = ()  # text files or folders; empty: the built-in corpus
    text_field: str = "text"  # the text's field in .jsonl inputs
    workers: int | None = None  # processes / threads for the tokenizer and the data; None: all cores
    overwrite: bool = False  # replace the tokenizer/, data/ and model/ of an earlier quickstart in `out`


    def validate(self) -> None:
        if not str(self.out).strip():
            raise LmforgeError("--out must name a folder for the tokenizer, the data and the model, got ''")
        if not 0 < self.minutes < math.inf:  # NaN fails too
            raise LmforgeError(f"--minutes must be a positive number of minutes (e.g. 6), got {self.minutes}")


def run(cfg: QuickstartConfig, say: Callable[[str], None] = print, progress: bool = True) -> TrainResult:
    """Tokenizer, data and pretraining into `cfg.out`, narrated through `say`."""
    cfg.validate()
    out = Path(cfg.out)
    notes: list[str] = []
    paths = corpus_paths(list(cfg.inputs) or None, say=notes.append)
    replaced = claim_folders(out, [*cfg.inputs, *paths], cfg.overwrite)
    with lock_folder(out / "model", what="run folder", fix=RUN_FOLDER_IN_USE):  # held until the model is trained
        return _run(cfg, out, paths, notes, replaced, say, progress)


PRODUCTS = ("tokenizer", "data", "model")


def train_config(cfg: QuickstartConfig, data: str | os.PathLike, out: str | os.PathLike, replace: bool) -> TrainConfig:
    """The pretraining run of a quickstart: its time limit alone sets its length (the
    trainer fits the step count to it), evaluating and sampling every 100 steps. Context,
    batch and learning rate are the measured best with the default model
    (benchmarks/bench_quickstart.py)."""
    return TrainConfig(
        data=str(data), out=str(out), preset=cfg.preset, context_length=128, batch_size=32,
        lr=4e-3, min_lr=4e-4, eval_every=100, eval_batches=20, save_every=100, log_every=10,
        sample_prompts=["The ", "I had"] if cfg.inputs else PYTHON_PROMPTS, sample_tokens=64,
        time_limit=cfg.minutes * 60, overwrite=replace,
    )


def claim_folders(out: Path, inputs: Sequence[str | Path], overwrite: bool) -> list[Path]:
    """The folders of `out` this quickstart will replace, or an error before anything is
    written: any existing one without `overwrite`; with it, one that is not recognisably
    a quickstart's (`_not_ours`) or that holds an input."""
    existing = [out / name for name in PRODUCTS if _exists(out / name)]
    if existing and not overwrite:
        raise LmforgeError(f"quickstart writes tokenizer/, data/ and model/ into {out}, which already holds {_listed(existing)}: "
                           "pass --overwrite to replace an earlier quickstart's, or choose another --out")
    for folder in existing:
        for path in inputs:
            if inside(folder, path):
                raise LmforgeError(f"{folder} holds the input {path}; quickstart never replaces its input: choose another --out")
        why = _not_ours(folder)
        if why:
            raise LmforgeError(f"--overwrite replaces only an earlier quickstart's folders, and {folder} {why}; "
                               "move it away or choose another --out")
    return existing


def _exists(folder: Path) -> bool:
    """Whether `folder` holds something (a model/ folder holding only its lock file is
    what an interrupted quickstart leaves before training: nothing)."""
    if folder.name == "model" and folder.is_dir() and not folder.is_symlink():
        return bool(folder_entries(folder))
    return os.path.lexists(folder)


def _not_ours(folder: Path) -> str | None:
    """Why `folder` is not a product of an earlier quickstart (None when it is)."""
    if folder.is_symlink() or not folder.is_dir():
        return "is not a folder" if not folder.is_symlink() else "is a symbolic link"
    if folder.name == "model":
        return None if is_run_folder(folder) else "is not a training run (no run.json or checkpoints/)"
    file, fmt = (folder / TOKENIZER_FILE, TOKENIZER_FORMAT) if folder.name == "tokenizer" else (folder / META_FILE, TOKENS_FORMAT)
    try:
        ours = json.loads(file.read_text(encoding="utf-8")).get("format") == fmt
    except (OSError, ValueError, AttributeError):
        ours = False
    what = "a tokenizer folder (tokenizer.json)" if folder.name == "tokenizer" else f"a prepared data folder ({META_FILE})"
    return None if ours else f"is not {what} lmforge made"


def _listed(paths: list[Path]) -> str:
    names = [f"{p.name}/" for p in paths]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _run(cfg: QuickstartConfig, out: Path, paths: list[Path], notes: list[str], replaced: list[Path],
         say: Callable[[str], None], progress: bool) -> TrainResult:
    started = time.monotonic()
    source = "your text" if cfg.inputs else "the built-in corpus"
    say("lmforge quickstart: build a small language model from scratch, in three steps.")
    if not cfg.inputs:
        say("The text is the built-in corpus (Python's own standard library), so the model learns to write Python.")
    if replaced:
        say(f"--overwrite: replacing the earlier quickstart's {_listed(replaced)} in {out}")
    say("")
    say(f"[1/3] Tokenizer: learn a byte-level BPE vocabulary of {cfg.vocab_size:,} ids from {source}")
    for note in notes:
        say("      " + note)
    stats = ReadStats()
    tokenizer = train_bpe((c for doc in iter_documents(paths, stats, cfg.text_field) for c in doc), cfg.vocab_size,
                          workers=cfg.workers, progress=progress)
    tokenizer.save(out / "tokenizer")
    say(f"      {stats.summary()}; '{SAMPLE}' -> {len(tokenizer.encode(SAMPLE))} tokens "
        f"({time.monotonic() - started:.0f} s)\n")

    say("[2/3] Data: turn the corpus into token ids on disk (train.bin, val.bin)")
    data = prepare(paths, tokenizer, out / "data", text_field=cfg.text_field, overwrite=True, num_threads=cfg.workers,
                   progress=progress)
    say(f"      {data.num_tokens('train'):,} training and {data.num_tokens('val'):,} validation tokens in {out / 'data'} "
        f"({time.monotonic() - started:.0f} s)\n")

    family = ("Llama family: RMSNorm, SwiGLU, RoPE, grouped-query attention" if Config.from_name(cfg.preset).positions == "rope"
              else "GPT-2 family: LayerNorm, GELU, learned positions")
    say(f"[3/3] Pretraining: a {cfg.preset} model ({family})")
    say(f"      learns to predict the next token for {cfg.minutes:g} minutes; the loss is cross-entropy in nats per token")
    say(f"      (lower is better; ln(vocabulary) = {math.log(tokenizer.vocab_size):.1f} is chance), and bits per byte is the same")
    say("      loss per byte of text (nats / ln 2 / bytes per token), which compares models whatever their vocabulary")
    train = train_config(cfg, out / "data", out / "model", replace=any(p.name == "model" for p in replaced))
    return pretrain(train, say=lambda m: say("      " + m), progress=progress)


@dataclass
class PythonShape:
    """How much of Python's shape samples show, line by line (a sample's last line is cut
    by the token limit, so only complete lines count)."""

    lines: int  # complete lines
    balanced: int  # lines whose (), [] and {} balance
    indented: int  # indented lines
    indented_by_4: int  # ... whose indentation is a multiple of 4 spaces
    def_class: int  # lines that start a def or a class

    def summary(self) -> str:
        if not self.lines:
            return "no complete line to judge yet"
        by_4 = f"{self.indented_by_4} of {self.indented} indented lines indent by multiples of 4 spaces, " if self.indented else ""
        return (f"{self.balanced} of {self.lines} lines balance their brackets, {by_4}"
                f"{self.def_class} line{'s' if self.def_class != 1 else ''} start a def or a class")


def python_shape(samples: Sequence[str]) -> PythonShape:
    """Count the signs that a model writes Python, for the quickstart's last word."""
    lines = [line for text in samples for line in text.split("\n")[:-1] if line.strip()]
    indented = [line for line in lines if line[0] == " "]
    return PythonShape(
        lines=len(lines),
        balanced=sum(_balanced(line) for line in lines),
        indented=len(indented),
        indented_by_4=sum((len(line) - len(line.lstrip(" "))) % 4 == 0 for line in indented),
        def_class=sum(line.lstrip().startswith(("def ", "class ", "async def ")) for line in lines),
    )


def _balanced(line: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in line:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack
