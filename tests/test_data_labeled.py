"""Classification data: the SMS Spam Collection read whole, the book's balanced split, per-batch padding."""

from __future__ import annotations

import collections
import json
import os

import pytest
import torch
from conftest import shared
from hypothesis import given
from hypothesis import strategies as st

from lmforge.config import Config
from lmforge.data.batches import EpochSampler
from lmforge.data.labeled import (
    ClassificationBatches,
    Example,
    balanced_split,
    min_per_class,
    pad_rows,
    read_labeled,
    save_split,
    split_sizes,
)
from lmforge.errors import LmforgeError
from lmforge.model import GPT, last_real_index
from lmforge.tokenizer import Tokenizer

SMS = "sms_spam/SMSSpamCollection"


@pytest.fixture(scope="module")
def sms():
    return read_labeled(shared(SMS))


def test_sms_collection_loads_every_row_verbatim(sms):
    examples, names = sms
    assert names == ["ham", "spam"]
    counts = collections.Counter(names[e.label] for e in examples)
    assert len(examples) == 5574 and counts == {"ham": 4827, "spam": 747}  # the readme's figures
    raw = shared(SMS).read_text(encoding="utf-8").split("\n")[:-1]
    assert [(names[e.label], e.text) for e in examples] == [tuple(line.split("\t", 1)) for line in raw]
    quoted = [e.text for e in examples if '"' in e.text]
    assert len(quoted) == 145  # messages a csv reader with default quoting would merge or mangle


def test_balanced_split_has_the_books_sizes_and_is_balanced(sms):
    examples, _ = sms
    splits = balanced_split(examples)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1045, "val": 149, "test": 300}
    for rows in splits.values():
        c = collections.Counter(e.label for e in rows)
        assert abs(c[0] - c[1]) <= 1
    chosen = [id(e) for rows in splits.values() for e in rows]
    assert len(set(chosen)) == 1494  # disjoint
    assert sum(e.label for rows in splits.values() for e in rows) == 747  # every spam message used
    assert {id(e) for e in examples} >= set(chosen)
    again = balanced_split(examples)
    assert all([id(e) for e in again[k]] == [id(e) for e in splits[k]] for k in splits)
    other = balanced_split(examples, seed=7)
    assert [id(e) for e in other["train"]] != [id(e) for e in splits["train"]]


@given(
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    fractions=st.sampled_from([(0.7, 0.1, 0.2), (0.8, 0.1, 0.1), (0.5, 0.25, 0.25), (1, 0, 0)]),
    seed=st.integers(0, 2**16),
)
def test_balanced_split_properties(counts, fractions, seed):
    examples = [Example(f"{c}-{i}", c) for c, n in enumerate(counts) for i in range(n)]
    m = min(counts)
    sizes = split_sizes(m * len(counts), fractions)
    enough = all(size >= len(counts) for size, f in zip(sizes, fractions) if f > 0)
    if len(counts) < 2 or not enough:  # one class, or a split that would miss a class: refused, saying why
        with pytest.raises(LmforgeError, match="only one class" if len(counts) < 2 else f"every class needs at least {min_per_class(len(counts), fractions)} rows"):
            balanced_split(examples, fractions=fractions, seed=seed)
        return
    assert m >= min_per_class(len(counts), fractions)
    splits = balanced_split(examples, fractions=fractions, seed=seed)
    assert tuple(len(splits[k]) for k in ("train", "val", "test")) == sizes
    for name, rows in splits.items():
        c = collections.Counter(e.label for e in rows)
        per = [c[k] for k in range(len(counts))]
        assert max(per) - min(per) <= 1
        assert min(per) >= 1 or len(rows) == 0 and fractions[("train", "val", "test").index(name)] == 0
    used = [e.text for rows in splits.values() for e in rows]
    assert len(set(used)) == len(used) == m * len(counts)
    assert collections.Counter(int(t.split("-")[0]) for t in used) == dict.fromkeys(range(len(counts)), m)


def test_one_class_is_refused_naming_it():
    """Regression: a file with one class trained and reported 100% accuracy."""
    ham = [Example(f"m{i}", 0) for i in range(50)]
    with pytest.raises(LmforgeError, match=r"only one class \(label 0: 50\); a classifier needs examples of at least two classes"):
        balanced_split(ham)
    with pytest.raises(LmforgeError, match=r"only one class \(ham: 50, spam: 0\)"):
        balanced_split(ham, label_names=["ham", "spam"])


def test_too_few_rows_say_what_each_class_has_and_needs():
    """Regression: with four rows the error talked about batch sizes."""
    four = [Example("a", 0), Example("b", 1), Example("c", 0), Example("d", 1)]
    message = (
        r"too few examples for a balanced train/val/test split \(0.7, 0.1, 0.2\): with 2 rows of each class "
        r"\(the smallest class's count\), val would get 0 rows, fewer than one per class \(2 classes\). "
        r"Rows per class: ham: 2, spam: 2; every class needs at least 10 rows"
    )
    with pytest.raises(LmforgeError, match=message):
        balanced_split(four, label_names=["ham", "spam"])
    lopsided = [Example(f"h{i}", 0) for i in range(100)] + [Example(f"s{i}", 1) for i in range(9)]
    with pytest.raises(LmforgeError, match="with 9 rows of each class .*Rows per class: ham: 100, spam: 9; every class needs at least 10"):
        balanced_split(lopsided, label_names=["ham", "spam"])
    with pytest.raises(LmforgeError, match=r"\(per_class\), val would get 1 row, .*at least 10"):
        balanced_split(lopsided + [Example("s9", 1)], per_class=5)
    splits = balanced_split(lopsided + [Example("s9", 1)])  # 10 of each: every split holds both classes
    assert [len(splits[s]) for s in ("train", "val", "test")] == [14, 2, 4]
    assert all({e.label for e in splits[s]} == {0, 1} for s in splits)


def test_min_per_class():
    assert [min_per_class(k) for k in (2, 3, 5, 10)] == [10, 10, 10, 10]
    assert min_per_class(2, (1, 0, 0)) == 1 and min_per_class(4, (0.5, 0.25, 0.25)) == 4
    for k in (2, 3, 7):
        for fractions in [(0.7, 0.1, 0.2), (0.8, 0.1, 0.1), (0.5, 0.25, 0.25)]:
            p = min_per_class(k, fractions)
            assert min(split_sizes(p * k, fractions)) >= k > min(split_sizes((p - 1) * k, fractions))


def test_read_labeled_refuses_a_device_or_fifo_without_blocking(tmp_path):
    """Regression: /dev/zero read forever; a FIFO blocked the reader."""
    os.mkfifo(tmp_path / "pipe.tsv")
    with pytest.raises(LmforgeError, match="pipe.tsv is not a regular file: it is a FIFO"):
        read_labeled(tmp_path / "pipe.tsv")
    with pytest.raises(LmforgeError, match="/dev/zero is not a regular file: it is a character device"):
        read_labeled("/dev/zero")
    with pytest.raises(LmforgeError, match="is not a regular file: it is a folder"):
        read_labeled(tmp_path)
    with pytest.raises(LmforgeError, match="no file at"):
        read_labeled(tmp_path / "missing.tsv")


def test_balanced_split_rejects_bad_arguments():
    ex = [Example("a", 0), Example("b", 1), Example("c", 1)]
    with pytest.raises(LmforgeError, match="smallest class's count 1"):
        balanced_split(ex, per_class=2)
    with pytest.raises(LmforgeError, match="add up to 1"):
        balanced_split(ex, fractions=(0.7, 0.1, 0.1))
    with pytest.raises(LmforgeError, match="at least one example"):
        balanced_split([])


def test_book_style_csv_and_jsonl_and_save_split_round_trip(tmp_path, sms):
    # the book's train.csv: pandas-written, header Label,Text, integer labels, quoted fields
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('Label,Text\n0,"Hi, ""you"" there"\n1,"WIN now\non two lines"\n0,plain\n', encoding="utf-8")
    examples, names = read_labeled(csv_path)  # columns matched ignoring case
    assert names == ["0", "1"]
    assert examples == [Example('Hi, "you" there', 0), Example("WIN now\non two lines", 1), Example("plain", 0)]

    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text("".join(json.dumps({"review": t, "stars": s}) + "\n" for t, s in [("bad", 2), ("good", 10), ("ok", 2)]))
    examples, names = read_labeled(jsonl, text_field="review", label_field="stars")
    assert names == ["2", "10"] and [e.label for e in examples] == [0, 1, 0]  # integer labels sort as numbers

    sms_examples, sms_names = sms
    splits = balanced_split(sms_examples)
    paths = save_split(splits, tmp_path / "split", sms_names)
    for name, path in paths.items():
        assert read_labeled(path, labels=sms_names) == (splits[name], sms_names)


def test_read_errors_name_the_file_and_line(tmp_path):
    def bad(name: str, content: str, **kw):
        p = tmp_path / name
        p.write_text(content, encoding="utf-8")
        with pytest.raises(LmforgeError) as e:
            read_labeled(p, **kw)
        assert name in str(e.value)
        return str(e.value)

    assert "line 2: unknown label 'maybe'" in bad("sms", "ham\thi\nmaybe\tho\n", labels=["ham", "spam"])
    assert "line 3: no tab" in bad("sms2", "ham\thi\nspam\tyo\njust text\n")
    assert "line 1: no text column 'body'" in bad("a.csv", "label,text\nx,y\n", text_field="body")
    assert "line 3: the row has no value in column 'text'" in bad("b.csv", "label,text\nx,y\nz\n")
    assert "line 2: no field 'label'" in bad("c.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n')
    assert "line 1: not valid JSON" in bad("d.jsonl", "{oops\n")
    assert "holds no examples" in bad("e.csv", "label,text\n")
    assert "holds no examples" in bad("empty", "")


@pytest.fixture(scope="module")
def bytes_tok():
    """Byte-level, no merges: token id = byte value, so expected ids can be written by hand."""
    return Tokenizer([], {"<|endoftext|>": 256})


def test_per_batch_padding_right_and_left(bytes_tok):
    texts = ["a", "abc", "ab", "abcde"]
    b = ClassificationBatches([Example(t, i % 2) for i, t in enumerate(texts)], bytes_tok, batch_size=2)
    (x1, m1, y1), (x2, m2, y2) = list(b.iter_eval(2))
    last1, last2 = last_of(m1), last_of(m2)
    assert y2.tolist() == [0, 1]
    assert x1.tolist() == [[97, 256, 256], [97, 98, 99]] and last1.tolist() == [0, 2] and y1.tolist() == [0, 1]
    assert x2.tolist() == [[97, 98, 256, 256, 256], [97, 98, 99, 100, 101]] and last2.tolist() == [1, 4]
    assert x1.dtype == m1.dtype == y1.dtype == torch.long
    assert m1.tolist() == [[1, 0, 0], [1, 1, 1]]
    left = ClassificationBatches([Example(t, 0) for t in texts], bytes_tok, batch_size=2, padding_side="left")
    (x1, m1, _), (x2, m2, _) = list(left.iter_eval(2))
    last1, last2 = last_of(m1), last_of(m2)
    assert m1.tolist() == [[0, 0, 1], [1, 1, 1]]
    assert x1.tolist() == [[256, 256, 97], [97, 98, 99]] and last1.tolist() == [2, 2]
    assert x2.tolist() == [[256, 256, 256, 97, 98], [97, 98, 99, 100, 101]] and last2.tolist() == [4, 4]
    # texts are encoded with special strings as plain text, so the pad id marks exactly the padding
    quoted = ClassificationBatches([Example("x<|endoftext|>", 0), Example("y", 1)], bytes_tok, batch_size=2)
    x, m, _ = next(quoted.iter_eval(2))
    assert last_of(m).tolist() == [13, 0]
    assert m.tolist() == (x != quoted.pad_id).long().tolist()


def last_of(mask: torch.Tensor) -> torch.Tensor:
    return last_real_index(mask, mask.size(1), mask.device)


def test_truncation_keeps_the_beginning(bytes_tok):
    b = ClassificationBatches([Example("abcdef", 1), Example("ab", 0)], bytes_tok, batch_size=2, max_length=4)
    x, m, y = next(b.iter_eval(2))
    assert x.tolist() == [[97, 98, 99, 100], [97, 98, 256, 256]] and last_of(m).tolist() == [3, 1] and b.truncated == 1
    assert y.tolist() == [1, 0]


def test_right_padding_is_exact_for_a_causal_model(gpt2_tok, sms):
    """The logits at last_index of a padded batch equal those of each text run alone."""
    examples = sms[0][:6]
    b = ClassificationBatches(examples, gpt2_tok, batch_size=6, max_length=40)
    torch.manual_seed(0)
    model = GPT(Config.from_name("nano", vocab_size=gpt2_tok.vocab_size, n_layer=1)).eval()
    x, m, _ = b.batch(0)
    last = last_of(m)
    assert x.shape[1] == max(len(r) for r in b.ids) and len(set(last.tolist())) > 1  # some rows padded
    with torch.no_grad():
        batched = model(x)[torch.arange(len(x)), last]
        for row, i in zip(range(len(x)), last.tolist()):
            alone = model(x[row : row + 1, : i + 1])[0, -1]
            torch.testing.assert_close(batched[row], alone, rtol=1e-4, atol=1e-4)


def test_batches_are_stateless_in_the_step_and_epochs_cover_everything(bytes_tok):
    examples = [Example(f"text {i}", i % 3) for i in range(10)]
    a = ClassificationBatches(examples, bytes_tok, batch_size=3, seed=5)
    b = ClassificationBatches(examples, bytes_tok, batch_size=3, seed=5)
    assert a.steps_per_epoch == 3  # drop_last: 10 // 3
    forward = [a.batch(s) for s in range(7)]
    backward = [b.batch(s) for s in reversed(range(7))][::-1]  # drawn in another order, resumed mid-way
    for f, g in zip(forward, backward):
        assert all(torch.equal(u, v) for u, v in zip(f, g))
    sampler = EpochSampler(10, 3, seed=5)
    for epoch in range(2):
        seen = [i for k in range(3) for i in sampler.indices(epoch * 3 + k)]
        assert len(set(seen)) == 9  # one epoch: distinct rows, the last partial batch dropped
    assert sampler.order(0).tolist() != sampler.order(1).tolist()
    full = EpochSampler(10, 3, seed=5, drop_last=False)
    assert full.steps_per_epoch == 4 and sorted(i for k in range(4) for i in full.indices(k)) == list(range(10))
    evaluated = torch.cat([y for _, _, y in a.iter_eval(4)])
    assert evaluated.tolist() == [e.label for e in examples]


def test_batching_errors(bytes_tok):
    with pytest.raises(LmforgeError, match="example 1 has an empty text"):
        ClassificationBatches([Example("a", 0), Example("", 1)], bytes_tok, batch_size=1)
    with pytest.raises(LmforgeError, match="no <\\|endoftext\\|> to pad with; pass pad_id"):
        ClassificationBatches([Example("a", 0)], Tokenizer([]), batch_size=1)
    with pytest.raises(LmforgeError, match="too few for one batch of 4"):
        ClassificationBatches([Example("a", 0)], bytes_tok, batch_size=4)
    with pytest.raises(LmforgeError, match="padding_side"):
        pad_rows([[1]], 0, "middle")  # type: ignore[arg-type]
