"""Judges (issue 15): the counting of pairwise verdicts, the order swap that cancels a judge's
position bias, the Wilson interval against a hand computation, and the OpenAI-compatible
endpoint client against a local fake server (no test reaches the network)."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from data_fixtures import small_tokenizer

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval.endpoint import ChatEndpoint, endpoint_pair_judge, endpoint_scorer, parse_choice, parse_score, score_prompt
from lmforge.eval.judge import Pair, Row, judge_pairs, read_responses, reward_judge, score_rows, wilson_interval

ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def rows(answers: Sequence[str | None], prompts: Sequence[str] | None = None, reference: str | None = "ref") -> list[Row]:
    prompts = prompts or [f"prompt {i}" for i in range(len(answers))]
    return [Row(i + 1, p, a, reference) for i, (p, a) in enumerate(zip(prompts, answers))]


def by_length(pairs: Sequence[Pair]) -> list[str]:
    """A fair judge: the longer answer wins, equal lengths tie."""
    return ["first" if len(p.first) > len(p.second) else "second" if len(p.second) > len(p.first) else "tie" for p in pairs]


# --- counting, order, interval ------------------------------------------------------------------------


def test_counting_a_fair_judge():
    a = rows(["long answer", "x", "same", "longer still"])
    b = rows(["short", "a longer one", "four", "tiny"])
    result = judge_pairs(a, b, by_length)
    assert (result.wins, result.ties, result.losses) == (2, 1, 1)
    assert result.inconsistent == 0 and result.skipped == 0
    assert result.win_rate == pytest.approx((2 + 0.5) / 4)
    assert [r["outcome"] for r in result.rows] == ["win", "loss", "tie", "win"]


def test_the_order_swap_cancels_a_judge_that_always_picks_the_first_answer():
    a, b = rows(["a1", "a2", "a3"]), rows(["b1", "b2", "b3"])
    result = judge_pairs(a, b, lambda pairs: ["first"] * len(pairs))
    assert (result.wins, result.ties, result.losses) == (0, 3, 0)
    assert result.inconsistent == 3 and result.first_shown_preferred == 6
    assert result.win_rate == 0.5


def test_a_position_bias_on_some_rows_only_ties_those_rows():
    """The judge prefers the longer answer, except that on row 2 it takes whichever it reads
    first: rows 1 and 3 count, row 2 is a tie; one verdict for A plus a tie is a tie too."""
    a, b = rows(["long one", "aa", "longest of all", "win or tie"]), rows(["s", "bbbb", "x", "w"])

    def judge(pairs: Sequence[Pair]) -> list[str]:
        out = by_length(pairs)
        out[1] = "first"
        out[3] = "tie" if pairs[3].first == "w" else out[3]  # with B shown first it calls row 4 a tie
        return out

    result = judge_pairs(a, b, judge)
    assert [r["outcome"] for r in result.rows] == ["win", "tie", "win", "tie"]
    assert result.inconsistent == 2


def test_wilson_interval_by_hand():
    # 7 wins, 2 ties, 1 loss: 8 successes of 10, z = 1.959964
    z = 1.959963984540054
    p, n = 0.8, 10
    centre = (p + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(p * (1 - p) / 10 + z * z / 400) / (1 + z * z / 10)
    low, high = wilson_interval(8, n)
    assert (low, high) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook values for 8/10
    a = rows(["long"] * 7 + ["ab", "ab", "a"])
    b = rows(["s"] * 7 + ["cd", "ef", "bb"])
    result = judge_pairs(a, b, by_length)
    assert (result.wins, result.ties, result.losses) == (7, 2, 1)
    assert result.interval == pytest.approx((low, high))
    assert wilson_interval(0, 5)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(5, 5)[1] == pytest.approx(1.0)


def test_reward_judge_scores_each_answer_once():
    calls: list[int] = []

    def score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        calls.append(len(responses))
        return [float(len(r)) for r in responses]

    result = judge_pairs(rows(["abc", "a", "ab"]), rows(["a", "abc", "ab"]), reward_judge(score))
    assert (result.wins, result.ties, result.losses) == (1, 1, 1) and result.inconsistent == 0
    assert calls == [5]  # "abc" and "a" for prompts 0 and 1, "ab" once for prompt 2; the swapped order from the cache


def test_rows_without_an_answer_are_left_out_and_counted():
    result = judge_pairs(rows(["long", None, "long"]), rows(["s", "s", None]), by_length)
    assert result.n == 1 and result.skipped == 2


# --- reading and matching files -----------------------------------------------------------------------


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_an_instruct_file_pairs_with_a_preference_file(tmp_path):
    """`finetune instruct` writes Alpaca items with "response"; `align dpo` the rendered prompt with before/after."""
    item = {"instruction": "Name a color.", "input": "", "output": "Red."}
    sft = write_jsonl(tmp_path / "sft.jsonl", [{**item, "response": "Blue."}])
    prompt = f"{ALPACA}\n\n### Instruction:\nName a color.\n\n### Response:\n"
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": prompt, "chosen": "Red.", "rejected": "No.", "before": "Blue.", "after": "Red!"}])
    a, b = read_responses(dpo, "after"), read_responses(sft, "response")
    assert a[0].prompt == b[0].prompt == prompt
    assert a[0].reference == "Red." and b[0].reference == "Red."  # "chosen" for DPO rows, "output" for Alpaca rows
    assert a[0].judge_input == f"{ALPACA}\n\n### Instruction:\nName a color."  # the book's format_input
    assert judge_pairs(a, b, by_length).wins == 0


def test_mismatched_prompts_name_the_row(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p1", "after": "x"}, {"prompt": "p2", "after": "y"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p1", "after": "x"}, {"prompt": "other", "after": "y"}])
    with pytest.raises(LmforgeError, match=r"row 2 .*line 2 'p2' vs B line 2 'other'"):
        judge_pairs(read_responses(a, "after"), read_responses(b, "after"), by_length)
    c = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p1", "after": "x"}])
    with pytest.raises(LmforgeError, match=r"A has 2 rows and B 1 row"):
        judge_pairs(read_responses(a, "after"), read_responses(c, "after"), by_length)


def test_bad_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "after": "x"}\nnot json\n')
    with pytest.raises(LmforgeError, match=r"line 2 is not JSON"):
        read_responses(bad, "after")
    no_field = write_jsonl(tmp_path / "nofield.jsonl", [{"prompt": "p", "response": "x"}])
    with pytest.raises(LmforgeError, match=r"line 1 has no field 'after'.*prompt, response.*--field"):
        read_responses(no_field, "after")
    with pytest.raises(LmforgeError, match=r"is a folder"):
        read_responses(tmp_path, "after")


# --- the endpoint client, against a fake server --------------------------------------------------------


class FakeServer:
    """An OpenAI-compatible /v1/chat/completions that answers from a script: each entry is a
    (status, reply text) or a callable of the request body; it records every request."""

    def __init__(self, script: list) -> None:
        self.script, self.requests = list(script), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                entry = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                status, text = entry(body) if callable(entry) else entry
                payload = (json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
                           if status == 200 else text).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server() -> Iterator[type[FakeServer]]:
    yield FakeServer


def client(url: str, **kw) -> ChatEndpoint:
    return ChatEndpoint(url, "judge-8b", sleep=lambda s: None, **kw)


def test_the_client_sends_the_books_prompt_and_reads_the_score():
    row = Row(1, f"{ALPACA}\n\n### Instruction:\nName a color.\n\n### Response:\n", "Blue.", "Red.")
    with FakeServer([(200, "85")]) as server:
        scores = score_rows([row], endpoint_scorer(client(server.url, api_key="sk-test")))
    assert scores.scores == [85.0]
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    assert request["body"] == {"model": "judge-8b", "temperature": 0, "seed": 123, "messages": [{"role": "user", "content": (
        f"Given the input `{ALPACA}\n\n### Instruction:\nName a color.` and correct output `Red.`, score the model response "
        "`Blue.` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only.")}]}
    assert request["body"]["messages"][0]["content"] == score_prompt(row, "Blue.")


def test_scores_and_choices_are_parsed():
    assert [parse_score(s, "line 1") for s in ("85", " 7\n", "Score: 60", "90/100", "**42**", "100.")] == [85, 7, 60, 90, 42, 100]
    assert [parse_choice(s, "line 1") for s in ("A", "b", "Tie", "Response B", "**A**", "tie.")] == \
        ["first", "second", "tie", "second", "first", "tie"]
    for bad in ("101", "eighty", "85 or 90", ""):
        with pytest.raises(LmforgeError, match="line 1: the judge answered .*not an integer from 0 to 100"):
            parse_score(bad, "line 1")


def test_a_server_error_is_retried():
    with FakeServer([(500, "busy"), (503, "still busy"), (200, "70")]) as server:
        assert client(server.url, retries=3).ask("score this", "line 4") == "70"
    assert len(server.requests) == 3


def test_retries_run_out_with_a_clear_error():
    with FakeServer([(500, "down")]) as server, \
            pytest.raises(LmforgeError, match=r"line 4: the judge at .* failed 3 times \(last: HTTP 500 down\)"):
        client(server.url, retries=2).ask("score this", "line 4")
    assert len(server.requests) == 3


def test_a_client_error_is_not_retried():
    with FakeServer([(401, '{"error": "bad key"}')]) as server, \
            pytest.raises(LmforgeError, match=r"line 2: .* HTTP 401 .*bad key.*--api-key-env"):
        client(server.url).ask("score this", "line 2")
    assert len(server.requests) == 1


def test_a_garbage_answer_names_the_row():
    a = rows(["x", "y"], reference="ref")
    with FakeServer([(200, "70"), (200, "I would say it is quite good")]) as server, \
            pytest.raises(LmforgeError, match=r"line 2: the judge answered 'I would say it is quite good', not an integer"):
        score_rows(a, endpoint_scorer(client(server.url)))
    with FakeServer([(200, "not a completion")]) as server:
        server.script = [(201, "{}")]  # a status 2xx without choices
        with pytest.raises(LmforgeError, match=r"line 1: the judge at .* sent no chat completion"):
            client(server.url).ask("x", "line 1")


def test_unreachable_endpoint_is_an_error_not_a_traceback():
    with FakeServer([(200, "1")]) as server:
        url = server.url
    with pytest.raises(LmforgeError, match=r"line 1: the judge at .* failed 2 times"):
        client(url, retries=1, timeout=5).ask("x", "line 1")


def test_pairwise_at_an_endpoint_asks_both_orders():
    """A fake judge that always answers A: both orders disagree, so every row is a tie."""
    a, b = rows(["a-answer", "a2"]), rows(["b-answer", "b2"])
    with FakeServer([(200, "A")]) as server:
        result = judge_pairs(a, b, endpoint_pair_judge(client(server.url)))
    assert (result.wins, result.ties, result.losses) == (0, 2, 0) and result.inconsistent == 2
    prompts = [r["body"]["messages"][0]["content"] for r in server.requests]
    assert len(prompts) == 4
    assert "Response A: `a-answer`\nResponse B: `b-answer`" in prompts[0]
    assert "Response A: `b-answer`\nResponse B: `a-answer`" in prompts[2]
    assert prompts[0].endswith("Respond with A, B or tie only.") and "correct output `ref`" in prompts[0]


def test_a_bad_url_is_refused():
    for url in ("", "localhost:8000/v1", "ftp://host/v1", "/tmp/x"):
        with pytest.raises(LmforgeError, match="not an http"):
            ChatEndpoint(url, "m")


# --- the command --------------------------------------------------------------------------------------


def judge_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`lmforge eval judge ARGV`, in this process."""
    code = main(["eval", "judge", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_command_judges_pairwise_at_an_endpoint_and_writes_the_verdicts(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret")
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "after": "long answer " * (i + 1), "before": "x"} for i in range(3)])
    sft = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"p{i}", "response": "short"} for i in range(3)])

    def longer(body: dict) -> tuple[int, str]:
        text = body["messages"][0]["content"]
        first = text.split("Response A: `")[1].split("`")[0]
        second = text.split("Response B: `")[1].split("`")[0]
        return 200, "A" if len(first) > len(second) else "B"

    out = tmp_path / "verdicts.json"
    with FakeServer([longer]) as server:
        code, stdout, err = judge_cli(capsys, str(a), str(sft), "--field-b", "response", "--judge-url", server.url,
                                      "--judge-model", "m", "--api-key-env", "JUDGE_KEY", "--out", str(out))
    assert code == 0, err
    assert "A wins 3, ties 0, loses 0" in stdout and "Wilson interval 0.439-1.000" in stdout
    assert all(r["headers"]["Authorization"] == "Bearer secret" for r in server.requests)
    report = json.loads(out.read_text())
    assert report["mode"] == "pairwise" and report["result"]["wins"] == 3 and report["b"]["field"] == "response"
    assert report["judge"] == {"kind": "endpoint", "url": server.url, "model": "m"}
    with FakeServer([(200, "50")]) as server:  # the same --out again: our own file is replaced
        code, stdout, err = judge_cli(capsys, str(a), "--field", "before", "--reference-field", "after",
                                      "--judge-url", server.url, "--judge-model", "m", "--out", str(out))
    assert code == 0, err
    assert "mean score 50.00 / 100 over 3 answers" in stdout
    assert json.loads(out.read_text())["result"]["mean"] == 50


def test_the_command_refuses_to_replace_a_file_it_did_not_write(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "after": "x"}])
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    code, _, err = judge_cli(capsys, str(a), str(a), "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m",
                             "--out", str(keep))
    assert code == 2 and "not an earlier `eval judge` result" in err and keep.read_text() == "mine"


def test_the_command_judges_with_a_reward_model(tmp_path, capsys):
    """The CLI wires our reward model's `score_rendered`: a random reward model never ties and
    never contradicts itself across orders, and A and B swapped give the mirror image."""
    import torch

    from lmforge.config import Config
    from lmforge.model import GPT
    from lmforge.weights import save_pretrained

    tok = small_tokenizer()
    torch.manual_seed(0)
    config = Config.from_name("nano", vocab_size=tok.vocab_size, context_length=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                              mlp_hidden=64, labels=["reward"])
    rm = save_pretrained(GPT(config), tmp_path / "rm", tokenizer=tok)
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"Say {w}.", "after": w, "before": w[::-1] + " no"}
                                           for w in ("yes", "hello there", "I had", "a picture")])
    code, _, err = judge_cli(capsys, str(a), str(a), "--field-b", "before", "--reward-model", str(rm), "--device", "cpu",
                             "--out", str(tmp_path / "j.json"))
    assert code == 0, err
    first = json.loads((tmp_path / "j.json").read_text())["result"]
    assert first["wins"] + first["losses"] == 4 and first["inconsistent"] == 0  # random scores: no exact ties
    code, _, err = judge_cli(capsys, str(a), str(a), "--field-a", "before", "--reward-model", str(rm), "--device", "cpu",
                             "--out", str(tmp_path / "j.json"))
    assert code == 0, err
    swapped = json.loads((tmp_path / "j.json").read_text())["result"]
    assert (swapped["wins"], swapped["losses"]) == (first["losses"], first["wins"])
    code, _, err = judge_cli(capsys, str(a), "--reward-model", str(rm), "--out", str(tmp_path / "j.json"))
    assert code == 2 and "give two files" in err
