"""Instruction and chat data: the book's template and split, masks checked by hand, batches like the book's collate."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import shared
from hypothesis import given
from hypothesis import strategies as st

from lmforge.data.instruct import IGNORE_INDEX, InstructionBatches, book_split, encode_example, encode_segments, read_instructions
from lmforge.errors import LmforgeError
from lmforge.serve.chat import ChatSession
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.templates import AlpacaTemplate, ChatTemplate, format_alpaca, session_messages

BOOK_DATA = "llms-from-scratch/instruction-data.json"


@pytest.fixture(scope="module")
def book_items():
    return read_instructions(shared(BOOK_DATA))


@pytest.fixture(scope="module")
def bytes_tok():
    """Byte-level, no merges: token id = byte value, so expected ids can be written by hand."""
    return Tokenizer([], {"<|endoftext|>": 256})


# --- the book's code, verbatim (LLMs-from-scratch ch07), as the reference ---------------


def book_format_input(entry):
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def book_collate(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None):
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy()
        new_item += [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


# --- the template and the split -----------------------------------------------------------


def test_alpaca_text_equals_the_books_with_and_without_input(book_items):
    with_input = book_items[0]
    without = next(it for it in book_items if not it["input"])
    for item in (with_input, without):
        prompt, response = format_alpaca(item)
        assert prompt + response == book_format_input(item) + f"\n\n### Response:\n{item['output']}"
    assert format_alpaca(without)[0] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{without['instruction']}\n\n### Response:\n"
    )
    assert "\n\n### Input:\nfreind --> friend\n\n### Response:\n" in format_alpaca(with_input)[0]
    # the chat form of an Alpaca model: the first turn's prompt is exactly the training prompt
    t = AlpacaTemplate()
    assert t.render(session_messages(None, [], without["instruction"]), True) == format_alpaca(without)[0]
    assert t.item_segments(with_input) == [format_alpaca(with_input)]


def test_book_split_sizes_on_the_real_file(book_items):
    assert len(book_items) == 1100
    s = book_split(book_items)
    assert {k: len(v) for k, v in s.items()} == {"train": 935, "val": 55, "test": 110}
    assert s["train"] == book_items[:935] and s["test"] == book_items[935:1045] and s["val"] == book_items[1045:]


def test_read_instructions_formats(tmp_path):
    demo = read_instructions(shared("llama-factory/alpaca_en_demo.json"))
    assert len(demo) == 999 and all(set(it) == {"instruction", "input", "output"} for it in demo)
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"instruction": "Add.", "output": "2", "input": None, "id": 7},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "Be kind."},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = read_instructions(path)
    assert items[0] == {"instruction": "Add.", "output": "2", "input": "", "id": 7}
    assert items[1] == {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    assert items[2] == rows[2]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "item 1: missing key 'output'"),
        ([{"input": "x", "output": "y"}], "item 0: missing key 'instruction'"),
        ([{"instruction": "a", "output": 3}], "item 0: 'output' must be a string"),
        ([{"messages": [{"role": "user", "content": "q"}]}], "item 0: the conversation must end with an assistant"),
        ([{"messages": [{"role": "assistant", "content": "a"}]}], "messages\\[0\\] is an assistant message where a user"),
        ([{"messages": [{"role": "bot", "content": "a"}]}], "messages\\[0\\] has role 'bot'"),
        ([{"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "x"}]}], "conversations\\[1\\] is from 'tool'"),
        ([{"conversations": [{"from": "human"}]}], "conversations\\[0\\] needs keys 'from' and 'value'"),
        ([], "holds no items"),
    ],
)
def test_read_instructions_errors_name_the_item_and_key(tmp_path, rows, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(LmforgeError, match=message) as e:
        read_instructions(path)
    assert str(path) in str(e.value)


def test_read_instructions_bad_json_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{nope\n')
    with pytest.raises(LmforgeError, match="line 2: not valid JSON"):
        read_instructions(path)


# --- masks, by hand -------------------------------------------------------------------------


def test_masks_written_out_by_hand(bytes_tok, gpt2_tok):
    # "Hi:" + "ok" + <|endoftext|> = 72 105 58 | 111 107 | 256
    assert encode_example(bytes_tok, "Hi:", "ok") == ([72, 105, 58, 111, 107], [-100, -100, 111, 107, 256])
    assert encode_example(bytes_tok, "Hi:", "ok", mask_prompt=False) == ([72, 105, 58, 111, 107], [105, 58, 111, 107, 256])
    assert encode_example(bytes_tok, "Hi:", "ok", max_length=3) == ([72, 105, 58], [-100, -100, 111])
    assert encode_example(bytes_tok, "Hi:", "") == ([72, 105, 58], [-100, -100, 256])  # the end alone is learned
    # two turns: "ab" "c" "d" "e" <eot>: the prompt "d" in between is not learned
    assert encode_segments(bytes_tok, [("ab", "c"), ("d", "e")]) == ([97, 98, 99, 100, 101], [-100, 99, -100, 101, 256])
    # GPT-2: "Hello," = 15496 11, " world" = 995, <|endoftext|> = 50256
    assert encode_example(gpt2_tok, "Hello,", " world") == ([15496, 11, 995], [-100, 995, 50256])


def test_chat_template_text_and_segments_by_hand(bytes_tok):
    t = ChatTemplate()
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
        {"role": "assistant", "content": "B"},
    ]
    assert t.render(messages, False) == "<|system|>\nS\n<|user|>\nU\n<|assistant|>\nA\n<|user|>\nV\n<|assistant|>\nB"
    assert t.render(messages[:4], True) == "<|system|>\nS\n<|user|>\nU\n<|assistant|>\nA\n<|user|>\nV\n<|assistant|>\n"
    assert t.render(session_messages("S", [("U", "A")], "V"), True) == t.render(messages[:4], True)  # ChatSession's state
    assert t.segments(messages) == [("<|system|>\nS\n<|user|>\nU\n<|assistant|>\n", "A"), ("\n<|user|>\nV\n<|assistant|>\n", "B")]
    _, y = encode_segments(bytes_tok, t.segments(messages))
    learned = [(i, label) for i, label in enumerate(y) if label != IGNORE_INDEX]
    first_reply = len("<|system|>\nS\n<|user|>\nU\n<|assistant|>\n")  # the position of "A" in the ids
    second = first_reply + 1 + len("\n<|user|>\nV\n<|assistant|>\n")
    assert learned == [(first_reply - 1, ord("A")), (second - 1, ord("B")), (second, 256)]
    a = AlpacaTemplate()
    assert a.render(session_messages("Be brief.", [("Hi", "Hello")], "Bye"), True) == (
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello\n\n### Instruction:\nBye\n\n### Response:\n"
    )
    assert t.item_segments({"instruction": "Add", "input": "1 1", "output": "2"}) == [("<|user|>\nAdd\n\n1 1\n<|assistant|>\n", "2")]


def test_template_errors():
    t = ChatTemplate()
    with pytest.raises(LmforgeError, match="generation prompt needs a conversation that ends with a user"):
        t.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], True)
    with pytest.raises(LmforgeError, match="must end with an assistant message"):
        t.segments([{"role": "user", "content": "q"}])
    with pytest.raises(LmforgeError, match="messages\\[2\\] is a system message where a user message belongs"):
        t.segments([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}])
    with pytest.raises(LmforgeError, match="the prompt is empty"):
        encode_example(Tokenizer([], {"<|endoftext|>": 256}), "", "x")
    with pytest.raises(LmforgeError, match="no <\\|endoftext\\|>"):
        encode_example(Tokenizer([]), "p", "x")


# --- properties -------------------------------------------------------------------------------


@given(prompt=st.text(min_size=1), response=st.text(), mask=st.booleans())
def test_unmasked_labels_decode_to_exactly_the_response_and_eot(gpt2_tok, prompt, response, mask):
    x, y = encode_example(gpt2_tok, prompt, response, mask_prompt=mask)
    p, r = gpt2_tok.encode(prompt), gpt2_tok.encode(response)
    assert x == p + r and len(y) == len(x)
    if mask:
        assert y == [IGNORE_INDEX] * (len(p) - 1) + r + [50256]
        assert gpt2_tok.decode([i for i in y if i != IGNORE_INDEX]) == response + "<|endoftext|>"
    else:
        assert y == (p + r + [50256])[1:]


messages_st = st.tuples(
    st.one_of(st.none(), st.text()), st.lists(st.tuples(st.text(), st.text()), min_size=1, max_size=3)
).map(
    lambda st_: ([{"role": "system", "content": st_[0]}] if st_[0] is not None else [])
    + [m for u, a in st_[1] for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
)


@given(messages=messages_st, alpaca=st.booleans(), max_length=st.one_of(st.none(), st.integers(1, 60)))
def test_chat_learns_every_reply_and_only_the_replies(gpt2_tok, messages, alpaca, max_length):
    t = AlpacaTemplate() if alpaca else ChatTemplate()
    segments = t.segments(messages)
    assert "".join(p + r for p, r in segments) == t.render(messages, False)
    x, y = encode_segments(gpt2_tok, segments)
    replies = "".join(m["content"] for m in messages if m["role"] == "assistant")
    assert gpt2_tok.decode([i for i in y if i != IGNORE_INDEX]) == replies + "<|endoftext|>"
    assert y[-1] == 50256 and y.count(50256) == 1
    xt, yt = encode_segments(gpt2_tok, segments, max_length=max_length)
    n = len(x) if max_length is None else min(len(x), max_length)
    assert (xt, yt) == (x[:n], y[:n])  # truncation: the first max_length positions, cut from the end


# --- batches -----------------------------------------------------------------------------------


def test_batches_equal_the_books_collate_without_masking(gpt2_tok, book_items):
    items = book_items[:16]
    ours = InstructionBatches(items, gpt2_tok, batch_size=8, mask_prompt=False)
    book = [gpt2_tok.encode(book_format_input(it) + f"\n\n### Response:\n{it['output']}") for it in items]
    widths = []
    for k, (x, y) in enumerate(ours.iter_eval(8)):
        bx, by = book_collate(book[8 * k : 8 * k + 8])
        assert torch.equal(x, bx) and torch.equal(y, by)
        widths.append(x.shape[1])
    assert widths[0] != widths[1]  # padded per batch, not to a global maximum
    for k, (x, y) in enumerate(InstructionBatches(items, gpt2_tok, batch_size=8, mask_prompt=False, max_length=40).iter_eval(8)):
        bx, by = book_collate(book[8 * k : 8 * k + 8], allowed_max_length=40)
        assert torch.equal(x, bx) and torch.equal(y, by)


def test_masked_batches_pad_inputs_with_eot_and_labels_with_ignore(gpt2_tok, book_items):
    b = InstructionBatches(book_items[:4], gpt2_tok, batch_size=2)
    (x1, y1), (x2, y2) = b.iter_eval(2)
    for x, y, first in ((x1, y1, 0), (x2, y2, 2)):
        assert x.shape == y.shape and x.dtype == y.dtype == torch.long
        assert x.shape[1] == max(len(b.examples[first][0]), len(b.examples[first + 1][0]))
        for row in range(2):
            ex_x, ex_y = b.examples[first + row]
            assert x[row].tolist() == ex_x + [50256] * (x.shape[1] - len(ex_x))
            assert y[row].tolist() == ex_y + [IGNORE_INDEX] * (x.shape[1] - len(ex_y))
            response = format_alpaca(book_items[first + row])[1]
            assert gpt2_tok.decode([t for t in ex_y if t != IGNORE_INDEX]) == response + "<|endoftext|>"


def test_batches_are_stateless_in_the_step(gpt2_tok, book_items):
    a = InstructionBatches(book_items[:50], gpt2_tok, batch_size=8, seed=3)
    b = InstructionBatches(book_items[:50], gpt2_tok, batch_size=8, seed=3)
    assert a.steps_per_epoch == 6
    steps = [13, 2, 7, 0]
    for s in steps:
        assert all(torch.equal(u, v) for u, v in zip(a.batch(s), b.batch(s)))
    epoch0 = [a.sampler.indices(k) for k in range(6)]
    epoch1 = [a.sampler.indices(6 + k) for k in range(6)]
    assert len({i for batch in epoch0 for i in batch}) == 48 and epoch0 != epoch1  # each epoch a new order
    x, y = a.batch(8)
    assert torch.equal(x, a.collate(epoch1[2])[0]) and torch.equal(y, a.collate(epoch1[2])[1])
    c = InstructionBatches(book_items[:50], gpt2_tok, batch_size=8, seed=4)
    assert not all(torch.equal(u, v) for u, v in zip(a.batch(0), c.batch(0)))


def test_examples_with_nothing_left_to_learn_are_dropped_and_listed(gpt2_tok, book_items):
    prompt_lengths = [len(gpt2_tok.encode(format_alpaca(it)[0])) for it in book_items[:10]]
    cut = sorted(prompt_lengths)[5]
    b = InstructionBatches(book_items[:10], gpt2_tok, batch_size=2, max_length=cut)
    # a prompt of n tokens fills positions 0..n-2 with prompt targets; position n-1 predicts the reply
    assert b.dropped == [i for i, n in enumerate(prompt_lengths) if n > cut] != []
    assert b.kept == [i for i, n in enumerate(prompt_lengths) if n <= cut] and len(b) == len(b.kept)
    with pytest.raises(LmforgeError, match="none of the 10 examples has a response left"):
        InstructionBatches(book_items[:10], gpt2_tok, batch_size=2, max_length=5)


def test_chat_session_talks_through_either_template(gpt2_tok):
    class RecordingEngine:
        """Stands in for `Engine`: records what the session asks for, replies with fixed text."""

        def __init__(self):
            self.tokenizer, self.config, self.calls = gpt2_tok, SimpleNamespace(context_length=1024), []

        def stream(self, prompt, **kw):
            self.calls.append((prompt, kw))
            yield 1, " Hello there. "

    for template in (ChatTemplate(), AlpacaTemplate()):
        engine = RecordingEngine()
        session = ChatSession(engine, system="Be kind.", template=template, max_new_tokens=16)
        assert "".join(session.reply("Hi")) == " Hello there. "
        list(session.reply("And you?"))
        history = [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "And you?"},
        ]
        prompt, kw = engine.calls[1]
        assert prompt == gpt2_tok.encode(template.render(history, True))
        assert kw["stop_strings"] == template.stop_strings and 50256 in kw["stop_ids"]
