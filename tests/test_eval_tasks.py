"""`lmforge eval` on hand-made items with hand-checked answers: a bigram model whose every
next-token log-probability is a number we chose, few-shot prompts written out by hand in
lm-eval's format, bits per byte by hand, the shared-context KV-cache path against scoring
each sequence whole, lm-eval's standard errors, and the errors a user can make."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from lmforge.cli import main
from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.eval import metrics
from lmforge.eval.harness import Settings, evaluate_tasks, evaluate_text
from lmforge.eval.loglikelihood import TextEncoder, rolling_loglikelihood, rolling_windows, score_pairs, score_pairs_uncached
from lmforge.eval.tasks import FewshotSampler, Item, capitalize_tail, fewshot_prefix, get_task, parse_tasks, requests
from lmforge.model import GPT
from lmforge.weights import save_pretrained

V = 128  # the character "tokenizer": one id per ASCII character


class Chars:
    """A tokenizer with one token per ASCII character, so every count below is a character count."""

    eot_id = 0
    vocab_size = V

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(map(chr, ids))

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode()


def bigram_model(table: torch.Tensor) -> GPT:
    """A transformer whose logits for the next token are table[:, current token]: every block
    adds nothing (zero output projections), the embedding is a scaled one-hot, RMSNorm makes
    it sqrt(V) one-hot and the head reads the table."""
    config = Config.from_name("nano", vocab_size=V, context_length=16, n_layer=1, n_head=1, n_kv_head=1, n_embd=V, mlp_hidden=4,
                              positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
    model = GPT(config)
    with torch.no_grad():
        model.blocks[0].attn.o.weight.zero_()
        model.blocks[0].mlp.down.weight.zero_()
        model.tok_emb.weight.copy_(torch.eye(V) * 1000.0)
        model.lm_head.weight.copy_(table / math.sqrt(V))
    model.tokenizer = Chars()
    return model.eval()


def lp(table: torch.Tensor, prev: str | int, nxt: str) -> float:
    prev = ord(prev) if isinstance(prev, str) else prev
    return float(torch.log_softmax(table[:, prev].double(), 0)[ord(nxt)])


@pytest.fixture
def table() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(V, V)


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# --- scores by hand ------------------------------------------------------------------------------


def test_uniform_model_acc_prefers_the_short_choice_and_acc_norm_the_long_one(tmp_path):
    """With every token equally likely, a choice's log-likelihood is -(1 + len) log V: acc picks
    the shortest choice; per character, -(1 + len)/len log V is highest for the longest."""
    write_jsonl(tmp_path / "piqa" / "valid.jsonl", [{"goal": "g?", "sol1": "ab", "sol2": "abcd"},
                                                     {"goal": "h?", "sol1": "abcdef", "sol2": "xyz"}])
    (tmp_path / "piqa" / "valid-labels.lst").write_text("1\n1\n")
    model = bigram_model(torch.zeros(V, V))
    out = evaluate_tasks(model, [get_task("piqa")], tmp_path, Settings(log_samples=True, bootstrap_iters=0))
    r = out["results"]["piqa"]
    assert (r["acc"], r["acc_norm"]) == (0.5, 0.5)  # item 0: acc wrong (ab), norm right (abcd); item 1: acc right (xyz), norm wrong
    assert [s["acc"] for s in out["samples"]["piqa"]] == [0.0, 1.0]
    assert [s["acc_norm"] for s in out["samples"]["piqa"]] == [1.0, 0.0]
    assert out["samples"]["piqa"][0]["loglikelihoods"] == pytest.approx([-3 * math.log(V), -5 * math.log(V)], abs=1e-5)
    assert r["acc_stderr"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))  # sample sd of [0, 1] over sqrt(2)
    assert r["chance"] == 0.5


def test_bigram_loglikelihoods_and_lambada_greedy(tmp_path, table):
    table[ord(" "), ord("o")] = 50.0  # after "o" a space is certain, after the space an "x"
    table[ord("x"), ord(" ")] = 50.0
    write_jsonl(tmp_path / "lambada" / "lambada_test.jsonl", [{"text": "foo x"}, {"text": "foo y"}])
    out = evaluate_tasks(bigram_model(table), [get_task("lambada_openai")], tmp_path, Settings(log_samples=True, bootstrap_iters=0))
    rows = out["samples"]["lambada_openai"]
    assert [r["is_greedy"] for r in rows] == [True, False]
    want = [lp(table, "o", " ") + lp(table, " ", "x"), lp(table, "o", " ") + lp(table, " ", "y")]
    assert [r["loglikelihood"] for r in rows] == pytest.approx(want, abs=1e-4)
    r = out["results"]["lambada_openai"]
    assert r["acc"] == 0.5
    assert r["perplexity"] == pytest.approx(math.exp(-sum(want) / 2), rel=1e-4)
    assert r["perplexity_stderr"] is None  # no bootstrap asked for


def test_winogrande_scores_the_shared_continuation_after_each_option(tmp_path, table):
    write_jsonl(tmp_path / "winogrande" / "dev.jsonl", [{"qID": "1", "sentence": "ab _ cd", "option1": "x", "option2": "y",
                                                         "answer": "2"}])
    out = evaluate_tasks(bigram_model(table), [get_task("winogrande")], tmp_path, Settings(log_samples=True))
    row = out["samples"]["winogrande"][0]
    assert row["arguments"] == [["ab x", " cd"], ["ab y", " cd"]]
    # a bigram model: only the option's last letter conditions the continuation
    want = [lp(table, opt, " ") + lp(table, " ", "c") + lp(table, "c", "d") for opt in "xy"]
    assert row["loglikelihoods"] == pytest.approx(want, abs=1e-4)
    assert row["acc"] == float(want[1] > want[0])


# --- prompts exactly as lm-eval renders them -------------------------------------------------------


def test_few_shot_prompts_golden():
    piqa = get_task("piqa")
    a = Item({"i": 0}, "Question: How do I dry a shirt?\nAnswer:", ["Hang it up.", "Eat it."], 0)
    b = Item({"i": 1}, "Question: How do I open a jar?\nAnswer:", ["Twist the lid.", "Sing to it."], 0)
    shots = FewshotSampler([a, b], seed=1234).sample(1, a)  # two in the pool: the other one, whatever the draw
    assert requests(piqa, a, fewshot_prefix(shots)) == [
        ("Question: How do I open a jar?\nAnswer: Twist the lid.\n\nQuestion: How do I dry a shirt?\nAnswer:", " Hang it up."),
        ("Question: How do I open a jar?\nAnswer: Twist the lid.\n\nQuestion: How do I dry a shirt?\nAnswer:", " Eat it."),
    ]
    wino = get_task("winogrande")
    w1 = Item({"i": 0}, ["The cup fell off the table", "The cup fell off the shelf"],
              ["The cup fell off the table", "The cup fell off the shelf"], 1, "because it was tilted.")
    w2 = Item({"i": 1}, ["Ann paid Bea because Ann", "Ann paid Bea because Bea"], ["Ann paid Bea because Ann", "Ann paid Bea because Bea"],
              0, "owed money.")
    assert requests(wino, w1, fewshot_prefix([w2])) == [
        ("Ann paid Bea because Ann owed money.\n\nThe cup fell off the table", " because it was tilted."),
        ("Ann paid Bea because Ann owed money.\n\nThe cup fell off the shelf", " because it was tilted."),
    ]
    lambada = get_task("lambada_openai")
    l1, l2 = Item({"i": 0}, "He opened the", target=" door"), Item({"i": 1}, "She read the", target=" book")
    # lm-eval's target already starts with its space and the target delimiter adds one more
    assert requests(lambada, l1, fewshot_prefix([l2])) == [("She read the  book\n\nHe opened the", " door")]


def test_few_shot_draw_is_seeded_sequential_and_never_the_item():
    pool = [Item({"i": i}, f"q{i}", ["a", "b"], 0) for i in range(6)]
    sampler = FewshotSampler(pool, seed=7)
    draws = [sampler.sample(3, item) for item in pool]
    assert all(item not in shots and len(shots) == 3 for item, shots in zip(pool, draws))
    rng = random.Random(7)  # lm-eval's draw: k + 1 from the pool, the item removed, the first k kept
    assert draws == [[x for x in rng.sample(pool, 4) if x is not item][:3] for item in pool]
    assert FewshotSampler(pool, seed=7).sample(3, pool[0]) == draws[0]
    other = FewshotSampler(pool, seed=7, same_split=False).sample(2, Item({"i": 99}, "q", ["a"], 0))
    assert other == random.Random(7).sample(pool, 2)


def test_hellaswag_query_capitalizes_ctx_b_as_lm_eval():
    assert capitalize_tail("Roof shingle removal: A man is sitting on a roof. he") == "Roof shingle removal: A man is sitting on a roof. He"
    assert capitalize_tail("Sharpening knives: He sits. then John") == "Sharpening knives: He sits. Then john"  # str.capitalize
    wikihow = "Health: How to rest. Lie down. Close your eyes."
    assert capitalize_tail(wikihow) == wikihow


def test_real_files_read_as_lm_eval_formats_them():
    """The first item of each real file, as lm-eval's stock task renders it."""
    from conftest import SHARED

    data = SHARED / "eval"
    first = {name: requests(get_task(name), get_task(name).read(*get_task(name).paths(data))[0]) for name in
             ("arc_easy", "boolq", "sciq", "openbookqa", "hellaswag", "winogrande")}
    question = "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    assert first["arc_easy"][0] == (question, " Sunlight is the source of energy for nearly all ecosystems.")
    assert first["boolq"][0][0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c for _, c in first["boolq"]] == [" no", " yes"]
    assert first["sciq"][0][0].startswith("Oxidants and Reductants Compounds")
    assert first["sciq"][0][0].endswith("\nQuestion: Compounds that are capable of accepting electrons, such as o 2 or f2, are called what?"
                                        "\nAnswer:")
    assert [c for _, c in first["sciq"]] == [" antioxidants", " Oxygen", " residues", " oxidants"]
    stem = ("A person wants to start saving money so that they can afford a nice vacation at the end of the year. After looking over "
            "their budget and expenses, they decide the best way to save money is to")
    assert first["openbookqa"][1] == (stem, " quit eating lunch out")
    assert first["hellaswag"][0] == ("Roof shingle removal: A man is sitting on a roof. He", " is using wrap to wrap a pair of skis.")
    assert first["winogrande"] == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                                   ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]


def test_context_trailing_space_moves_to_the_continuation(gpt2_tok):
    enc = TextEncoder(gpt2_tok)
    assert enc.pair("The cat ", "sat") == (gpt2_tok.encode("The cat"), gpt2_tok.encode(" sat"))
    assert enc.pair("", "Hi") == ([gpt2_tok.eot_id], gpt2_tok.encode("Hi"))


# --- the fast path equals the plain one -------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shared_context_cache_equals_each_sequence_scored_whole(family):
    torch.manual_seed(1)
    rng = random.Random(1)
    config = Config.from_name("nano", vocab_size=61, context_length=20, n_layer=2, n_head=4, n_kv_head=2 if family == "llama" else 4,
                              n_embd=32, mlp_hidden=48)
    if family == "llama":
        config = config.replace(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    model = GPT(config).eval()
    pairs = []
    for _ in range(12):  # contexts of 1..28 tokens (some truncated), 1..5 continuations of 1..7 tokens
        ctx = [rng.randrange(61) for _ in range(rng.randint(1, 28))]
        pairs += [(ctx, [rng.randrange(61) for _ in range(rng.randint(1, 7))]) for _ in range(rng.randint(1, 5))]
    want = score_pairs_uncached(model, pairs)
    for batch_size in (1, 3, 64):
        got = score_pairs(model, pairs, batch_size)
        assert [g.loglikelihood for g in got] == pytest.approx([w.loglikelihood for w in want], abs=1e-5)
        assert [g.is_greedy for g in got] == [w.is_greedy for w in want]


# --- texts: bits per byte ------------------------------------------------------------------------------


def test_rolling_windows_score_every_token_once():
    for n, L, stride in [(10, 4, 4), (10, 4, 1), (10, 4, 3), (3, 8, 2), (8, 8, 5)]:
        windows = rolling_windows(n, L, stride)
        scored = [i for end, k in windows for i in range(end - k, end)]
        assert scored == list(range(1, n + 1))  # ids[1:] = the text's tokens, ids[0] the prefix
        assert all(k <= min(L, end - 1) for end, k in windows)  # the input (at most L tokens) covers what it scores
    assert rolling_windows(10, 4, 4) == [(5, 4), (9, 4), (11, 2)]  # lm-eval's disjoint windows


@pytest.mark.parametrize("stride", [16, 5, 1])
def test_bits_per_byte_of_a_bigram_model_by_hand(tmp_path, table, stride):
    text = "the quick brown fox jumps over the lazy dog. " * 2  # 90 characters, more than the 16-token context
    (tmp_path / "t.txt").write_text(text)
    out = evaluate_text(bigram_model(table), tmp_path / "t.txt", stride=stride, batch_size=4)
    ll = lp(table, 0, text[0]) + sum(lp(table, a, b) for a, b in itertools.pairwise(text))  # <|endoftext|> (id 0) first
    assert out["tokens"] == out["bytes"] == len(text)
    assert out["loglikelihood"] == pytest.approx(ll, abs=1e-3)
    assert out["bits_per_byte"] == pytest.approx(-ll / math.log(2) / len(text), rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(-ll / len(text)), rel=1e-5)


def test_rolling_with_one_window_equals_the_whole_sequence():
    torch.manual_seed(2)
    model = GPT(Config.from_name("nano", vocab_size=40, context_length=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=16,
                                 mlp_hidden=32)).eval()
    ids = [random.Random(3).randrange(40) for _ in range(31)]
    seq = torch.tensor([[0, *ids]])
    with torch.no_grad():
        want = float(torch.log_softmax(model(seq[:, :-1])[0], -1).gather(1, seq[0, 1:, None]).sum())
    assert rolling_loglikelihood(model, ids, 0, stride=32) == pytest.approx(want, abs=1e-4)
    assert rolling_loglikelihood(model, ids, 0, stride=7, batch_size=2) == pytest.approx(want, abs=1e-4)  # fits: same context


# --- standard errors as lm-eval computes them ------------------------------------------------------


def test_perplexity_stderr_is_lm_evals_bootstrap():
    xs = [-1.0, -2.5, -0.3, -4.0, -0.01, -7.0, -3.3]
    reps = []
    for i in range(3):  # lm-eval: chunks of 1,000 resamples, chunk i from random.Random(i).choices
        rnd = random.Random(i)
        reps += [math.exp(-sum(s) / len(s)) for s in (rnd.choices(xs, k=len(xs)) for _ in range(1000))]
    mu = sum(reps) / len(reps)
    want = math.sqrt(sum((r - mu) ** 2 for r in reps) / (len(reps) - 1))
    assert metrics.perplexity_stderr(xs, iters=3000) == pytest.approx(want, rel=1e-9)
    assert metrics.mean_stderr([1.0, 0.0, 0.0, 1.0]) == pytest.approx(math.sqrt(1 / 3) / 2)
    assert metrics.mean_stderr([1.0]) is None


# --- errors a user can make --------------------------------------------------------------------------


def test_bad_input_says_what_and_how(tmp_path):
    with pytest.raises(LmforgeError, match="unknown task 'arc'.*arc_easy, arc_challenge"):
        parse_tasks("arc_easy,arc")
    with pytest.raises(LmforgeError, match=r"piqa needs .*piqa/valid\.jsonl"):
        evaluate_tasks(bigram_model(torch.zeros(V, V)), [get_task("piqa")], tmp_path)
    with pytest.raises(LmforgeError, match="--limit must be at least 1"):
        evaluate_tasks(bigram_model(torch.zeros(V, V)), [get_task("piqa")], tmp_path, Settings(limit=0))
    write_jsonl(tmp_path / "winogrande" / "dev.jsonl", [{"sentence": "a _ b", "option1": "x", "option2": "y", "answer": "1"}] * 2)
    with pytest.raises(LmforgeError, match="--num-fewshot 2 needs at least 3"):
        evaluate_tasks(bigram_model(torch.zeros(V, V)), [get_task("winogrande")], tmp_path, Settings(num_fewshot=2))
    write_jsonl(tmp_path / "boolq" / "dev.jsonl", [{"question": "q", "passage": "p"}])
    with pytest.raises(LmforgeError, match=r"dev\.jsonl:1 has no bool field 'answer'"):
        evaluate_tasks(bigram_model(torch.zeros(V, V)), [get_task("boolq")], tmp_path)


def test_an_answer_longer_than_the_context_leaves_its_item_out_and_says_so(tmp_path, table):
    """Regression: one PIQA solution of 297 tokens stopped a 48-minute run of every task on a
    256-token model. Now every task is encoded before any scoring, and such an item is left
    out, counted, and named in the notes; the rest score as before."""
    model = bigram_model(table)  # context 16: a 20-character answer cannot be scored whole
    rows = [{"goal": "go", "sol1": "ab", "sol2": "cd"}, {"goal": "go", "sol1": "x" * 20, "sol2": "y"}, {"goal": "up", "sol1": "e", "sol2": "fg"}]
    write_jsonl(tmp_path / "piqa" / "valid.jsonl", rows)
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n1\n")
    out = evaluate_tasks(model, [get_task("piqa")], tmp_path, Settings(bootstrap_iters=0))
    assert out["results"]["piqa"]["n"] == 2 and out["results"]["piqa"]["left_out"] == 1
    assert any("piqa: left out 1 of 3 items" in note for note in out["notes"])
    kept = [{"goal": "go", "sol1": "ab", "sol2": "cd"}, {"goal": "up", "sol1": "e", "sol2": "fg"}]
    write_jsonl(tmp_path / "kept" / "piqa" / "valid.jsonl", kept)
    (tmp_path / "kept" / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    alone = evaluate_tasks(model, [get_task("piqa")], tmp_path / "kept", Settings(bootstrap_iters=0))
    assert alone["results"]["piqa"]["acc"] == out["results"]["piqa"]["acc"] and "left_out" not in alone["results"]["piqa"]
    write_jsonl(tmp_path / "none" / "piqa" / "valid.jsonl", [rows[1]])
    (tmp_path / "none" / "piqa" / "valid-labels.lst").write_text("1\n")
    with pytest.raises(LmforgeError, match="every answer is longer than the model's context of 16 tokens"):
        evaluate_tasks(model, [get_task("piqa")], tmp_path / "none", Settings(bootstrap_iters=0))


def test_cli_writes_json_and_table(tmp_path, capsys, small_tok):
    torch.manual_seed(0)
    config = Config.from_name("nano", vocab_size=small_tok.vocab_size, context_length=64, n_layer=1, n_head=2, n_kv_head=1,
                              n_embd=16, mlp_hidden=32)
    save_pretrained(GPT(config), tmp_path / "model", small_tok)
    write_jsonl(tmp_path / "data" / "winogrande" / "dev.jsonl",
                [{"qID": str(i), "sentence": f"Tom told Ann {i} that _ was late.", "option1": "Tom", "option2": "Ann", "answer": "1"}
                 for i in range(4)])
    (tmp_path / "t.txt").write_text("To be, or not to be, that is the question.")
    out = tmp_path / "res" / "eval.json"
    argv = ["eval", "--model", str(tmp_path / "model"), "--tasks", "winogrande", "--data-dir", str(tmp_path / "data"), "--limit", "3",
            "--num-fewshot", "1", "--text", str(tmp_path / "t.txt"), "--stride", "32", "--out", str(out), "--log-samples", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "winogrande" in printed and "bits per byte" in printed
    doc = json.loads(out.read_text())
    assert doc["format"] == "lmforge-eval" and doc["settings"]["num_fewshot"] == 1 and doc["settings"]["limit"] == 3
    assert set(doc["results"]["winogrande"]) >= {"acc", "acc_stderr", "n", "split"} and doc["results"]["winogrande"]["n"] == 3
    assert len(doc["samples"]["winogrande"]) == 3 and doc["text"]["stride"] == 32
    assert doc["model"]["weights_sha256"] and doc["model"]["config"]["n_layer"] == 1
    assert main(argv) == 0  # an earlier results file is replaced
    (tmp_path / "mine.json").write_text("{}")
    assert main([*argv, "--out", str(tmp_path / "mine.json")]) == 2  # anything else is not
    assert (tmp_path / "mine.json").read_text() == "{}"
    assert "not an `lmforge eval` results file" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "model")]) == 2
    assert main(["eval", "--model", str(tmp_path / "model"), "--tasks", "winogrande", "--data-dir", str(tmp_path / "data"),
                 "--stride", "8"]) == 2
    assert "--stride is the window step of --text" in capsys.readouterr().err
