"""Preference pairs: the three real files read and split, prompts as instruction tuning renders them, batches by hand."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from conftest import shared
from hypothesis import given
from hypothesis import strategies as st

from lmforge.data.instruct import IGNORE_INDEX, book_split
from lmforge.data.preference import PREFERENCE_KINDS, PreferenceBatches, preference_split, read_preferences, render_pair
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.templates import AlpacaTemplate, ChatTemplate

BOOK_PREFS = "llms-from-scratch/instruction-data-with-preference.json"
DPO_DEMO = "llama-factory/dpo_en_demo.json"
HH = "hh-rlhf/harmless-base_test.jsonl.gz"
BOOK_EQUAL_ROWS = [122, 226, 400, 566, 628, 676]  # the rows whose chosen and rejected are the same text
EOT = 256  # bytes_tok's <|endoftext|>
M = IGNORE_INDEX


@pytest.fixture(scope="module")
def bytes_tok():
    """Byte-level, no merges: token id = byte value, so expected ids can be written by hand."""
    return Tokenizer([], {"<|endoftext|>": EOT})


@pytest.fixture(scope="module")
def book():
    return read_preferences(shared(BOOK_PREFS))


@pytest.fixture(scope="module")
def demo():
    return read_preferences(shared(DPO_DEMO))


@pytest.fixture(scope="module")
def hh():
    return read_preferences(shared(HH))


@pytest.fixture(scope="module")
def hh_raw():
    with gzip.open(shared(HH), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# --- the real files ---------------------------------------------------------------------------


def test_book_preferences_drop_exactly_the_six_equal_pairs(book):
    raw = json.loads(shared(BOOK_PREFS).read_text(encoding="utf-8"))
    assert len(raw) == 1100 and book.kind == "alpaca" and book.source == str(shared(BOOK_PREFS))
    assert book.dropped == [(i, "chosen equals rejected") for i in BOOK_EQUAL_ROWS]
    assert all(raw[i]["chosen"] == raw[i]["rejected"] for i in BOOK_EQUAL_ROWS)
    assert len(book.items) == 1094 and [it["row"] for it in book.items] == [i for i in range(1100) if i not in BOOK_EQUAL_ROWS]
    for item in book.items[:50] + book.items[-50:]:
        assert item == {**raw[item["row"]], "row": item["row"]}  # nothing changed: every row has a string input and output


def test_dpo_demo_is_chat_with_histories_ending_in_a_user_turn(demo):
    raw = json.loads(shared(DPO_DEMO).read_text(encoding="utf-8"))
    assert demo.kind == "chat" and len(demo.items) == 300 and demo.dropped == []
    for item, row in zip(demo.items, raw):
        assert set(item) == {"messages", "chosen", "rejected", "row"}
        assert item["chosen"] == row["chosen"]["value"] and item["rejected"] == row["rejected"]["value"]
        assert item["messages"][-1]["role"] == "user"
        roles = {"system": "system", "human": "user", "gpt": "assistant"}
        assert item["messages"] == [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]
    assert sum(it["messages"][0]["role"] == "system" for it in demo.items) == 80
    assert max(len(it["messages"]) for it in demo.items) == 13


def test_hh_dialogues_split_at_the_last_assistant_turn(hh, hh_raw):
    assert len(hh_raw) == 2312 and hh.kind == "dialogue"
    differ = "the two dialogues differ before the last Assistant turn"
    assert hh.dropped == [(86, "an empty response"), (516, "an empty response"), (925, "an empty response"),
                          (1103, "an empty response"), (1254, differ), (1688, differ), (1952, differ), (2036, differ)]
    assert len(hh.items) == 2312 - 8
    for item in hh.items:
        raw = hh_raw[item["row"]]
        prompt = item["prompt"]
        assert prompt.endswith("\n\nAssistant:") and prompt.startswith("\n\nHuman:")
        assert raw["chosen"] == prompt + item["chosen"] and raw["rejected"] == prompt + item["rejected"]
        assert "\n\nAssistant:" not in item["chosen"]  # the prompt runs to the chosen transcript's last Assistant turn
        assert item["chosen"].startswith(" ") and item["rejected"].startswith(" ")  # kept as is, the space too
    for row, reason in hh.dropped:
        raw = hh_raw[row]
        prompt = raw["chosen"][: raw["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")]
        if reason == differ:
            assert not raw["rejected"].startswith(prompt)
        else:
            assert not raw["chosen"][len(prompt) :].strip() and raw["rejected"][len(prompt) :].strip()


# --- splits -------------------------------------------------------------------------------------


def test_book_split_is_the_books_by_row_position_minus_the_dropped(book):
    s = preference_split(book)
    rows = {k: [it["row"] for it in v] for k, v in s.items()}
    kept = lambda r: [i for i in r if i not in BOOK_EQUAL_ROWS]
    assert rows == {"train": kept(range(935)), "val": kept(range(1045, 1100)), "test": kept(range(935, 1045))}
    assert {k: len(v) for k, v in s.items()} == {"train": 929, "val": 55, "test": 110}
    assert rows == {k: kept(v) for k, v in book_split(range(1100)).items()}
    assert preference_split(book, seed=7) == s  # the book's split has no shuffle


@pytest.mark.parametrize(("name", "sizes"), [("demo", (255, 15, 30)), ("hh", (1965, 116, 231))])
def test_other_splits_are_seeded_85_5_10_of_the_rows(request, name, sizes):
    data = request.getfixturevalue(name)
    n = len(data.items) + len(data.dropped)
    perm = np.random.default_rng(123).permutation(n).tolist()
    train, val, test = sizes
    assert (train, test) == (int(0.85 * n), int(0.10 * n)) and train + val + test == n
    expected = {"train": perm[:train], "test": perm[train : train + test], "val": perm[train + test :]}
    dropped = {r for r, _ in data.dropped}
    s = preference_split(data)
    rows = {k: [it["row"] for it in v] for k, v in s.items()}
    assert rows == {k: [r for r in v if r not in dropped] for k, v in expected.items()}
    assert sorted(r for v in rows.values() for r in v) == [it["row"] for it in data.items]  # disjoint and covering
    assert preference_split(data, seed=123) == s
    other = {k: [it["row"] for it in v] for k, v in preference_split(data, seed=124).items()}
    assert other != rows and sorted(r for v in other.values() for r in v) == sorted(r for v in rows.values() for r in v)
    with pytest.raises(LmforgeError, match="seed must be a non-negative integer"):
        preference_split(data, seed=-1)


# --- text -----------------------------------------------------------------------------------------


def test_alpaca_prompt_is_the_instruction_tuning_prompt(book):
    with_input = next(it for it in book.items if it["input"])
    without = next(it for it in book.items if not it["input"])
    for item in (with_input, without):
        prompt, chosen, rejected = render_pair(item, "alpaca", None)
        sft = {"instruction": item["instruction"], "input": item["input"], "output": item["chosen"]}
        assert [(prompt, chosen)] == AlpacaTemplate().item_segments(sft)
        assert rejected == item["rejected"] and prompt.endswith("\n\n### Response:\n")
        assert render_pair(item, "alpaca", AlpacaTemplate()) == (prompt, chosen, rejected)
    assert "\n\n### Input:\n" + with_input["input"] in render_pair(with_input, "alpaca", None)[0]
    # another template renders the same item its own way, as instruction tuning with it would
    prompt = render_pair(without, "alpaca", ChatTemplate())[0]
    assert prompt == f"<|user|>\n{without['instruction']}\n<|assistant|>\n"


def test_chat_prompt_is_the_history_with_a_generation_prompt(demo):
    for item in demo.items[:40]:
        prompt, chosen, rejected = render_pair(item, "chat", None)
        assert prompt == ChatTemplate().render(item["messages"], add_generation_prompt=True)
        assert (chosen, rejected) == (item["chosen"], item["rejected"])
        assert render_pair(item, "chat", AlpacaTemplate())[0] == AlpacaTemplate().render(item["messages"], True)


def test_dialogue_prompt_is_the_raw_transcript(hh):
    item = hh.items[0]
    assert render_pair(item, "dialogue", None) == (item["prompt"], item["chosen"], item["rejected"])
    with pytest.raises(LmforgeError, match="takes no template"):
        render_pair(item, "dialogue", ChatTemplate())
    with pytest.raises(LmforgeError, match="unknown preference kind 'dpo'"):
        render_pair(item, "dpo", None)
    assert PREFERENCE_KINDS == ("alpaca", "chat", "dialogue")


# --- reading: formats and errors ----------------------------------------------------------------


ROWS = [
    {"instruction": "Add.", "input": None, "chosen": "2", "rejected": "3", "id": 7},
    {"instruction": "Sub.", "input": "5 1", "output": "4", "chosen": "4", "rejected": "four"},
    {"instruction": "Same.", "chosen": "x", "rejected": "x"},
    {"instruction": "Blank.", "chosen": "  \n", "rejected": "y"},
]


def test_json_array_jsonl_and_gzip_read_the_same(tmp_path):
    array = json.dumps(ROWS)
    lines = "\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in ROWS[2:]) + "\n"
    files = {
        "a.json": array.encode(),
        "a.jsonl": lines.encode(),
        "a.jsonl.gz": gzip.compress(lines.encode()),
        "a.json.gz": gzip.compress(array.encode()),
        "packed.json": gzip.compress(array.encode()),  # gzip known by its magic bytes, not its name
    }
    results = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        results.append(read_preferences(tmp_path / name))
    first = results[0]
    assert first.kind == "alpaca"
    assert first.items == [
        {"instruction": "Add.", "input": "", "chosen": "2", "rejected": "3", "id": 7, "row": 0},
        {"instruction": "Sub.", "input": "5 1", "output": "4", "chosen": "4", "rejected": "four", "row": 1},
    ]
    assert first.dropped == [(2, "chosen equals rejected"), (3, "an empty response")]
    assert all((r.items, r.dropped, r.kind) == (first.items, first.dropped, first.kind) for r in results)


def test_chat_rows_in_every_accepted_shape(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "Hi"}], "system": "Be kind.",
         "chosen": {"from": "gpt", "value": "Hello"}, "rejected": {"from": "assistant", "value": "Go away"}},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "R"}],
         "chosen": "yes", "rejected": [{"role": "assistant", "content": "no"}]},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "user", "value": "U"}],
         "chosen": [{"from": "gpt", "value": "c"}], "rejected": {"role": "assistant", "content": "r"}},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = read_preferences(path)
    assert data.kind == "chat" and data.dropped == []
    assert data.items == [
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
         "chosen": "Hello", "rejected": "Go away", "row": 0},
        {"messages": rows[1]["messages"], "chosen": "yes", "rejected": "no", "row": 1},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
         "chosen": "c", "rejected": "r", "row": 2},
    ]
    assert render_pair(data.items[0], "chat", None)[0] == "<|system|>\nBe kind.\n<|user|>\nHi\n<|assistant|>\n"


def test_dialogue_rows_with_a_given_prompt(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "P:", "chosen": " a", "rejected": " b"}, DIALOGUE]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = read_preferences(path)
    assert data.kind == "dialogue"
    assert data.items == [{"prompt": "P:", "chosen": " a", "rejected": " b", "row": 0},
                          {"prompt": "\n\nHuman: h\n\nAssistant:", "chosen": " x", "rejected": " y", "row": 1}]


A = {"instruction": "a", "chosen": "x", "rejected": "y"}
CHAT = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": "b"}
DIALOGUE = {"chosen": "\n\nHuman: h\n\nAssistant: x", "rejected": "\n\nHuman: h\n\nAssistant: y"}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([A, {"instruction": "b", "rejected": "y"}], "row 1: missing key 'chosen'"),
        ([A, A, {"instruction": "b", "chosen": "y"}], "row 2: missing key 'rejected'"),
        ([A, {"input": "i", "chosen": "x", "rejected": "y"}], "row 1: missing key 'instruction'"),
        ([CHAT, {"chosen": "x", "rejected": "y"}], "row 1: missing key 'conversations' or 'messages'"),
        ([DIALOGUE, {"chosen": "x"}], "row 1: missing key 'rejected'"),
        ([{**A, "chosen": 3}], "row 0: 'chosen' must be a string, got int"),
        ([A, {**A, "input": ["i"]}], "row 1: 'input' must be a string, got list"),
        ([DIALOGUE, {**DIALOGUE, "rejected": {"text": "y"}}], "row 1: 'rejected' must be a string, got dict"),
        ([A, "just text"], "row 1: expected a JSON object, got str"),
        ([{**CHAT, "chosen": {"from": "human", "value": "a"}}], "row 0: 'chosen' is a user message; a reply must be from the"),
        ([CHAT, {**CHAT, "rejected": {"role": "system", "content": "b"}}], "row 1: 'rejected' is a system message"),
        ([{**CHAT, "rejected": [{"from": "gpt", "value": "a"}] * 2}], "row 0: 'rejected' must be one reply"),
        ([{**CHAT, "chosen": 5}], "row 0: 'chosen' must be a string or an assistant message, got int"),
        ([{**CHAT, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
         "row 0: the history must end with a user message"),
        ([{**CHAT, "conversations": [{"from": "tool", "value": "q"}]}], "row 0: conversations\\[0\\] is from 'tool'"),
        ([A, A, CHAT], "row 2 is a row of kind 'chat', but row 0 made this a file of 'alpaca' rows"),
        ([DIALOGUE, A], "row 1 is a row of kind 'alpaca', but row 0 made this a file of 'dialogue' rows"),
        ([CHAT, {"prompt": "p", "chosen": "x", "rejected": "y"}], "row 1 is a row of kind 'dialogue', but row 0 made"),
        ([{"chosen": "no turns", "rejected": "no turns either"}], "row 0: 'chosen' has no '\\\\n\\\\nAssistant:' turn"),
        ([{**A, "rejected": "x"}, {**A, "chosen": " "}], "all 2 rows were dropped \\(an empty response; chosen equals rejected"),
        ([], "holds no rows"),
    ],
)
def test_errors_name_the_file_and_row(tmp_path, rows, message):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(LmforgeError, match=message) as e:
        read_preferences(path)
    assert str(path) in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(LmforgeError, match="no file at"):
        read_preferences(tmp_path / "missing.json")
    (tmp_path / "bad.jsonl").write_text(json.dumps(A) + "\n{nope\n")
    with pytest.raises(LmforgeError, match="bad.jsonl, line 2: not valid JSON"):
        read_preferences(tmp_path / "bad.jsonl")
    (tmp_path / "fake.jsonl.gz").write_text(json.dumps(A))
    with pytest.raises(LmforgeError, match="not a readable gzip file"):
        read_preferences(tmp_path / "fake.jsonl.gz")
    with pytest.raises(LmforgeError, match="is not a regular file"):
        read_preferences(tmp_path)


# --- batches, by hand -------------------------------------------------------------------------------


def test_a_padded_pair_written_out_by_hand(bytes_tok):
    # "Hi:" = 72 105 58; "ok" = 111 107; "no!!" = 110 111 33 33; <|endoftext|> = 256
    b = PreferenceBatches([("Hi:", "ok", "no!!"), ("Q", "", "x")], bytes_tok, batch_size=2)
    out = b.collate([0, 1])
    assert set(out) == {"input_ids", "labels", "attention_mask", "index"}
    assert all(t.dtype == torch.long for t in out.values()) and out["input_ids"].shape == (2, 2, 7)
    assert out["input_ids"].tolist() == [
        [[72, 105, 58, 111, 107, EOT, EOT], [72, 105, 58, 110, 111, 33, 33]],  # chosen padded with eot; rejected full
        [[81, EOT, EOT, EOT, EOT, EOT, EOT], [81, 120, EOT, EOT, EOT, EOT, EOT]],
    ]
    # both rows: the prompt's own next tokens and the padding are masked; the response and one eot are learned
    assert out["labels"].tolist() == [
        [[M, M, 111, 107, EOT, M, M], [M, M, 110, 111, 33, 33, EOT]],
        [[EOT, M, M, M, M, M, M], [120, EOT, M, M, M, M, M]],
    ]
    assert out["attention_mask"].tolist() == [
        [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]],
        [[1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]],
    ]
    assert out["index"].tolist() == [0, 1]
    assert (b.truncated, b.dropped, b.kept) == (0, [], [0, 1])
    for row in out["labels"].reshape(4, 7).tolist():
        assert row.count(EOT) == 1  # the eot appended exactly once per response
    one = b.collate([1])
    assert one["input_ids"].shape == (1, 2, 2)  # padded to the batch's longest row, not the data set's
    assert one["input_ids"].tolist() == [[[81, EOT], [81, 120]]] and one["labels"].tolist() == [[[EOT, M], [120, EOT]]]
    assert one["index"].tolist() == [1]
    padded = PreferenceBatches([("Hi:", "ok", "no!!")], bytes_tok, batch_size=1, pad_id=0).collate([0])
    assert padded["input_ids"][0, 0].tolist() == [72, 105, 58, 111, 107, 0, 0]
    assert padded["labels"][0, 0].tolist() == [M, M, 111, 107, EOT, M, M]


def test_truncation_cuts_the_prompts_start_then_the_responses_end(bytes_tok):
    pairs = [
        ("abcdefghij", "12", "1234", 8),  # prompt > 8 // 2: cut to max(4, 8 - 5 + 1) = 4, "ghij"; responses whole
        ("abcdefghij", "123456789", "x", 8),  # prompt cut to 4; the longer response to 8 - 4 + 1 = 5, its eot lost
        ("ab", "123456789", "y", 8),  # prompt within 8 // 2: kept; the response cut to 8 - 2 + 1 = 7
        ("abcdef", "1", "2", 6),  # prompt cut only as far as needed: max(3, 6 - 2 + 1) = 5, "bcdef"
        ("abcde", "1", "2", 6),  # fits exactly: 5 + 2 - 1 = 6 positions, not truncated
    ]
    expected = [
        ("ghij", ids("12") + [EOT], ids("1234") + [EOT]),
        ("ghij", ids("12345"), ids("x") + [EOT]),
        ("ab", ids("1234567"), ids("y") + [EOT]),
        ("bcdef", ids("1") + [EOT], ids("2") + [EOT]),
        ("abcde", ids("1") + [EOT], ids("2") + [EOT]),
    ]
    for (prompt, chosen, rejected, max_length), (kept_prompt, c, r) in zip(pairs, expected):
        b = PreferenceBatches([(prompt, chosen, rejected)], bytes_tok, batch_size=1, max_length=max_length)
        out = b.collate([0])
        p = ids(kept_prompt)
        for k, response in enumerate((c, r)):
            n = len(p) + len(response) - 1
            assert n <= max_length
            assert out["input_ids"][0, k, :n].tolist() == (p + response)[:-1]
            assert out["labels"][0, k, :n].tolist() == [M] * (len(p) - 1) + response
            assert out["attention_mask"][0, k].tolist() == [1] * n + [0] * (out["input_ids"].shape[-1] - n)
        assert b.truncated == (kept_prompt != prompt or c[-1] != EOT or r[-1] != EOT) and b.dropped == []
    together = PreferenceBatches([(p, c, r) for p, c, r, _ in pairs], bytes_tok, batch_size=5, max_length=8)
    assert together.truncated == 3 and together.kept == [0, 1, 2, 3, 4]  # the last two fit in 8


def test_pairs_with_nothing_left_to_learn_are_dropped(bytes_tok):
    # max_length 1: the prompt's share is 1 // 2 = 0. A response of just its eot still fits after the prompt's
    # last token; a longer one leaves max(0, 1 - 2 + 1) = 0 prompt tokens, nothing to predict the response from.
    b = PreferenceBatches([("abc", "x", ""), ("abc", "", ""), ("z", "yy", "w")], bytes_tok, batch_size=1, max_length=1)
    assert b.dropped == [0, 2] and b.kept == [1] and b.truncated == 1 and len(b) == 1
    out = b.collate([0])
    assert out["input_ids"].tolist() == [[[99], [99]]] and out["labels"].tolist() == [[[EOT], [EOT]]]
    assert out["index"].tolist() == [1]  # the pair's position in the pairs given
    with pytest.raises(LmforgeError, match="none of the 2 pairs has a response left"):
        PreferenceBatches([("abc", "x", ""), ("z", "yy", "w")], bytes_tok, batch_size=1, max_length=1)


def test_batch_errors(bytes_tok):
    with pytest.raises(LmforgeError, match="pair 1: the prompt is empty"):
        PreferenceBatches([("p", "a", "b"), ("", "a", "b")], bytes_tok, batch_size=1)
    with pytest.raises(LmforgeError, match="no <\\|endoftext\\|>"):
        PreferenceBatches([("p", "a", "b")], Tokenizer([]), batch_size=1, pad_id=0)
    with pytest.raises(LmforgeError, match="pair 0 must be three strings"):
        PreferenceBatches([("p", "a")], bytes_tok, batch_size=1)
    with pytest.raises(LmforgeError, match="max_length must be a positive integer"):
        PreferenceBatches([("p", "a", "b")], bytes_tok, batch_size=1, max_length=0)
    with pytest.raises(LmforgeError, match="too few for one batch of 2"):
        PreferenceBatches([("p", "a", "b")], bytes_tok, batch_size=2)


def test_real_pairs_batch_and_are_stateless_in_the_step(gpt2_tok, book, hh):
    pairs = [render_pair(it, "alpaca", None) for it in book.items[:20]]
    a = PreferenceBatches(pairs, gpt2_tok, batch_size=4, seed=3)
    assert a.steps_per_epoch == 5 and len(a) == 20
    for s in (7, 0, 12):
        x, y = a.batch(s), PreferenceBatches(pairs, gpt2_tok, batch_size=4, seed=3).batch(s)
        assert all(torch.equal(x[k], y[k]) for k in x)
        assert x["index"].tolist() == a.sampler.indices(s)
    for out in a.iter_eval(8):
        for b, i in enumerate(out["index"].tolist()):
            prompt, chosen, rejected = pairs[i]
            for k, response in enumerate((chosen, rejected)):
                labels, inputs = out["labels"][b, k], out["input_ids"][b, k]
                assert gpt2_tok.decode(labels[labels != M].tolist()) == response + "<|endoftext|>"
                n = int(out["attention_mask"][b, k].sum())
                assert gpt2_tok.decode(inputs[:n].tolist() + [int(labels[n - 1])]) == prompt + response + "<|endoftext|>"
    # long HH transcripts: every row within max_length, the prompt's end and the responses' starts kept
    dialogue = [render_pair(it, "dialogue", None) for it in hh.items[:40]]
    t = PreferenceBatches(dialogue, gpt2_tok, batch_size=4, max_length=64)
    assert t.truncated > 0 and t.dropped == [] and t.kept == list(range(40))
    for out in t.iter_eval(16):
        assert out["input_ids"].shape[-1] <= 64
        for b, i in enumerate(out["index"].tolist()):
            p = gpt2_tok.encode(dialogue[i][0])
            for k in range(2):
                r = gpt2_tok.encode(dialogue[i][1 + k]) + [50256]
                labels = out["labels"][b, k].tolist()
                learned = [t for t in labels if t != M]
                assert learned and learned == r[: len(learned)]  # the responses' starts
                kept = next(j for j, t in enumerate(labels) if t != M) + 1  # the first learned label follows the prompt
                assert out["input_ids"][b, k, :kept].tolist() == p[len(p) - kept :]  # the prompt's end


# --- properties ---------------------------------------------------------------------------------------


@given(prompt=st.text(min_size=1, max_size=40), chosen=st.text(max_size=40), rejected=st.text(max_size=40))
def test_learned_labels_decode_to_each_response_and_one_eot(gpt2_tok, prompt, chosen, rejected):
    out = PreferenceBatches([(prompt, chosen, rejected)], gpt2_tok, batch_size=1).collate([0])
    p = gpt2_tok.encode(prompt)
    for k, response in enumerate((chosen, rejected)):
        labels = out["labels"][0, k]
        learned = labels[labels != IGNORE_INDEX].tolist()
        assert gpt2_tok.decode(learned) == response + "<|endoftext|>" and learned.count(50256) == 1
        assert labels[: len(p) - 1].tolist() == [IGNORE_INDEX] * (len(p) - 1)
        n = int(out["attention_mask"][0, k].sum())
        assert out["input_ids"][0, k, :n].tolist() == (p + gpt2_tok.encode(response) + [50256])[:-1]


@given(prompt=st.text(min_size=1, max_size=30), chosen=st.text(max_size=30), rejected=st.text(max_size=30),
       max_length=st.integers(2, 24))
def test_truncation_keeps_the_prompts_end_and_the_responses_start(bytes_tok, prompt, chosen, rejected, max_length):
    b = PreferenceBatches([(prompt, chosen, rejected)], bytes_tok, batch_size=1, max_length=max_length)
    assert b.dropped == []  # above max_length 1 the rule leaves something of the prompt and of each response
    out = b.collate([0])
    p, responses = ids(prompt), [ids(chosen) + [EOT], ids(rejected) + [EOT]]
    longer = max(len(r) for r in responses)
    assert b.truncated == int(len(p) + longer - 1 > max_length)
    for k, r in enumerate(responses):
        labels, inputs = out["labels"][0, k].tolist(), out["input_ids"][0, k].tolist()
        n = int(out["attention_mask"][0, k].sum())
        assert n <= max_length
        kept_prompt = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX) + 1
        assert inputs[:kept_prompt] == p[len(p) - kept_prompt :]  # the prompt's end
        learned = [t for t in labels if t != IGNORE_INDEX]
        assert learned == r[: len(learned)] and len(learned) >= 1  # the response's start
        if not b.truncated:
            assert kept_prompt == len(p) and learned == r
        elif len(p) > max_length // 2:
            assert kept_prompt == min(len(p), max(max_length // 2, max_length - longer + 1))
        else:
            assert kept_prompt == len(p)
