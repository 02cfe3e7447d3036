"""lm-evaluation-harness's `local-completions` model against `lmforge serve` scores a task
exactly as `lmforge eval` does in process: every request's log-likelihood (from echo with
log-probabilities) and greedy flag, and so every accuracy.

lm-eval tokenizes with the model's exported Hugging Face tokenizer and sends token ids;
the server scores them with the model read back from the same folder. `max_length` is the
context minus one: lm-eval asks for one new token beside the echoed prompt, and the server
refuses a request that would not fit the context.
"""

from __future__ import annotations

import pytest
from lm_eval_data import lm_eval_task
from serve_fixtures import make_service, running
from test_eval_lm_eval import EVAL, hf_model, monkeypatch_module, offline, task_manager

from lmforge.eval.harness import Settings, evaluate_tasks
from lmforge.eval.tasks import get_task
from lmforge.loading import load

TASKS = ["lambada_openai", "hellaswag", "piqa", "winogrande"]  # last-word greedy, acc_norm, two choices, partial scoring
LIMIT = 8


def test_local_completions_scores_as_lmforge_eval(hf_model, offline, tmp_path):
    import lm_eval

    model = load(hf_model)
    ours = evaluate_tasks(model, [get_task(t) for t in TASKS], EVAL, Settings(limit=LIMIT, batch_size=4, log_samples=True))
    configs = [lm_eval_task(t, EVAL, tmp_path / t, task_manager(), rows=LIMIT) for t in TASKS]
    with running(make_service(load(hf_model), name="tiny")) as base:
        args = (f"model=tiny,base_url={base}/v1/completions,tokenizer_backend=huggingface,tokenizer={hf_model},"
                f"max_length={model.config.context_length - 1},num_concurrent=2,max_retries=1,tokenized_requests=True")
        theirs = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=configs, task_manager=task_manager(),
                                         limit=LIMIT, num_fewshot=0, log_samples=True, random_seed=0, fewshot_random_seed=1234,
                                         bootstrap_iters=0)
    for name in TASKS:
        samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == LIMIT == len(ours["samples"][name])
        for row, s in zip(ours["samples"][name], samples):
            lls = [r[0] for r in s["filtered_resps"]]
            greedy = [r[1] for r in s["filtered_resps"]]
            mine = row["loglikelihoods"] if "loglikelihoods" in row else [row["loglikelihood"]]
            mine_greedy = row["is_greedy"] if isinstance(row["is_greedy"], list) else [row["is_greedy"]]
            assert mine == pytest.approx(lls, abs=1e-4), f"{name} doc {row['doc_id']}"
            assert mine_greedy == greedy, f"{name} doc {row['doc_id']}"
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in theirs["results"][name]:
                assert ours["results"][name][metric] == theirs["results"][name][f"{metric},none"], f"{name} {metric}"
