"""`lmforge eval` against lm-evaluation-harness itself (a test-only dependency), offline.

A tiny random GPT-2-shaped model with GPT-2's tokenizer is exported to Hugging Face format;
lm-eval's `hf` model scores it with its stock task configs pointed at the same local files
(tests/lm_eval_tasks/, converted once per session by lm_eval_data.py), and `lmforge eval`'s
harness scores the model read back from that folder. Every request's log-likelihood must
agree within 1e-4, and so must every accuracy, acc_norm, perplexity and standard error.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import SHARED
from lm_eval_data import lm_eval_task

from lmforge.config import Config
from lmforge.eval.harness import Settings, evaluate_tasks
from lmforge.eval.tasks import get_task
from lmforge.interop.hf import export_hf
from lmforge.loading import load
from lmforge.model import GPT

EVAL = SHARED / "eval"
LIMIT = 12
ZERO_SHOT = ["lambada_openai", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "openbookqa", "sciq"]
FEW_SHOT = ["hellaswag", "piqa", "winogrande"]  # scored on a validation split: lm-eval's few-shot pool is ours
ITERS = 2000  # perplexity's bootstrap: lm-eval's algorithm, fewer resamples


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, gpt2_tok):
    torch.manual_seed(0)
    config = Config.from_name("nano", vocab_size=gpt2_tok.vocab_size, context_length=1024, n_layer=2, n_head=2, n_kv_head=2,
                              n_embd=32, mlp_hidden=64)
    model = GPT(config)
    with torch.no_grad():  # a sharper random model, so that accuracies differ between choices
        model.tok_emb.weight.mul_(8)
    model.tokenizer = gpt2_tok
    out = tmp_path_factory.mktemp("hf") / "model"
    export_hf(model, out)
    return out


@pytest.fixture(scope="module")
def offline(monkeypatch_module):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DISABLE_MULTIPROC"):
        monkeypatch_module.setenv(var, "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch_module.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch_module.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    import lm_eval.evaluator

    # the environment report (pip, compilers, GPUs) is slow and beside the point here
    monkeypatch_module.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def run_lm_eval(model_dir, tasks, out, num_fewshot, limit):
    import lm_eval

    configs = [lm_eval_task(t, EVAL, out / t, task_manager(), rows=None if num_fewshot else limit) for t in tasks]
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=configs, device="cpu",
                                   task_manager=task_manager(),
                                   batch_size=8, limit=limit, num_fewshot=num_fewshot, bootstrap_iters=ITERS, log_samples=True,
                                   random_seed=0, fewshot_random_seed=1234)


@functools.cache
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def compare(ours, theirs, tasks):
    for name in tasks:
        mine, ref = ours["results"][name], theirs["results"][name]
        samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == mine["n"] == LIMIT
        for row, s in zip(ours["samples"][name], samples):
            lls = [r[0] for r in s["filtered_resps"]]
            greedy = [r[1] for r in s["filtered_resps"]]
            assert [a for a, _ in s["arguments"]] == [a for a, _ in row["arguments"]], f"{name} doc {row['doc_id']}: contexts differ"
            assert [b for _, b in s["arguments"]] == [b for _, b in row["arguments"]], f"{name} doc {row['doc_id']}: continuations differ"
            mine_lls = row["loglikelihoods"] if "loglikelihoods" in row else [row["loglikelihood"]]
            mine_greedy = row["is_greedy"] if isinstance(row["is_greedy"], list) else [row["is_greedy"]]
            assert mine_lls == pytest.approx(lls, abs=1e-4), f"{name} doc {row['doc_id']}"
            assert mine_greedy == greedy, f"{name} doc {row['doc_id']}"
            assert row["acc"] == s["acc"]
            if "acc_norm" in s:
                assert row["acc_norm"] == s["acc_norm"]
        for metric in ("acc", "acc_norm", "perplexity"):
            if f"{metric},none" in ref:
                assert mine[metric] == pytest.approx(ref[f"{metric},none"], rel=1e-5, abs=1e-9), f"{name} {metric}"
                assert mine[f"{metric}_stderr"] == pytest.approx(ref[f"{metric}_stderr,none"], rel=1e-4), f"{name} {metric}_stderr"
        assert set(mine) >= {m.split(",")[0] for m in ref if m.endswith(",none") and "stderr" not in m}


def ours(model_dir, tasks, num_fewshot):
    model = load(model_dir)
    settings = Settings(num_fewshot=num_fewshot, limit=LIMIT, batch_size=8, bootstrap_iters=ITERS, log_samples=True)
    return evaluate_tasks(model, [get_task(t) for t in tasks], EVAL, settings)


def test_zero_shot_matches_lm_eval(hf_model, offline, tmp_path):
    theirs = run_lm_eval(hf_model, ZERO_SHOT, tmp_path, 0, LIMIT)
    compare(ours(hf_model, ZERO_SHOT, 0), theirs, ZERO_SHOT)


def test_few_shot_matches_lm_eval(hf_model, offline, tmp_path):
    """Same examples drawn (seed 1234, the item never its own example) and rendered alike."""
    theirs = run_lm_eval(hf_model, FEW_SHOT, tmp_path, 2, LIMIT)
    compare(ours(hf_model, FEW_SHOT, 2), theirs, FEW_SHOT)

