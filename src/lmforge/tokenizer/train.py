"""Train a byte-level BPE vocabulary: the incremental algorithm.

1. Pre-tokenize the corpus and count each distinct piece ("word") once, with its
   frequency; BPE never merges across pieces, so words are all we need.
2. Count every adjacent pair of tokens over the words, weighted by frequency, and keep
   for each pair the set of words it occurs in.
3. Repeatedly take the most frequent pair from a heap, merge it in just the words that
   contain it, and update only the pair counts those words change.

Ties are broken by a fixed rule so training is deterministic: among pairs with the
same count, the one whose (left bytes, right bytes) sorts first wins.

The heap is lazy. A pair's count only ever falls, except for pairs containing the new
token, which are pushed afresh after each merge; so an entry whose stored count no
longer matches is re-pushed with the current count when it surfaces.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from multiprocessing import get_context

import regex
from tqdm.auto import tqdm

from lmforge.errors import LmforgeError
from lmforge.tokenizer.patterns import GPT2_PATTERN, resolve_pattern
from lmforge.tokenizer.tokenizer import ENDOFTEXT, Tokenizer, check_special_strings

_pattern: regex.Pattern | None = None
_special: regex.Pattern | None = None


def _init_worker(pattern: str, specials: Sequence[str]) -> None:
    global _pattern, _special
    _pattern = regex.compile(pattern)
    _special = regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))) if specials else None


def _count_chunks(chunks: list[str]) -> Counter:
    """Count pre-tokenized pieces; special-token strings are cut out so they never merge."""
    counts: Counter = Counter()
    for chunk in chunks:
        for part in _special.split(chunk) if _special else (chunk,):
            counts.update(_pattern.findall(part))
    return counts


def _groups(chunks: Iterable[str], size: int = 1 << 20) -> Iterable[list[str]]:
    group, n = [], 0
    for c in chunks:
        group.append(c)
        n += len(c)
        if n >= size:
            yield group
            group, n = [], 0
    if group:
        yield group


def count_words(
    chunks: Iterable[str], pattern: str = GPT2_PATTERN, special_tokens: Sequence[str] = (), workers: int | None = None
) -> Counter:
    """Frequency of each pre-tokenized piece over all chunks (chunks must not split a piece)."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1:
        _init_worker(pattern, special_tokens)
        total: Counter = Counter()
        for group in _groups(chunks):
            total.update(_count_chunks(group))
        return total
    total = Counter()
    with get_context("fork" if os.name == "posix" else "spawn").Pool(
        workers, initializer=_init_worker, initargs=(pattern, list(special_tokens))
    ) as pool:
        for counts in pool.imap_unordered(_count_chunks, _groups(chunks)):
            total.update(counts)
    return total


def learn_merges(word_counts: Counter, n_merges: int, progress: bool = True) -> list[tuple[int, int]]:
    """The merge list (pairs of token ids; byte b has id b, merge k makes id 256 + k)."""
    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    token_of: dict[bytes, int] = {t: i for i, t in enumerate(vocab)}
    words: list[list[int]] = []
    freqs: list[int] = []
    for w, f in word_counts.items():
        ids = list(w.encode("utf-8", "surrogatepass"))
        if len(ids) > 1:
            words.append(ids)
            freqs.append(f)

    pair_count: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, w in enumerate(words):
        f = freqs[wi]
        for p in zip(w, w[1:]):
            pair_count[p] += f
            where[p].add(wi)
    heap = [(-c, vocab[a], vocab[b], a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    bar = tqdm(total=n_merges, desc="bpe merges", unit="merge", disable=not progress, leave=False)
    while len(merges) < n_merges and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        count = pair_count.get((a, b), 0)
        if count != -neg:  # stale entry: re-queue at its true count
            if count > 0:
                heapq.heappush(heap, (-count, vocab[a], vocab[b], a, b))
            continue
        merged = vocab[a] + vocab[b]
        t = token_of.get(merged)
        if t is None:  # a new token; an existing one can arise when two pair orders meet
            t = len(vocab)
            vocab.append(merged)
            token_of[merged] = t
            merges.append((a, b))
            bar.update()
        touched: set[tuple[int, int]] = set()
        for wi in where.pop((a, b)):
            w = words[wi]
            if a not in w:
                continue
            out, i, n = [], 0, len(w)
            while i < n:
                if w[i] == a and i + 1 < n and w[i + 1] == b:
                    out.append(t)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            if len(out) == n:  # stale index: the pair is gone from this word
                continue
            f = freqs[wi]
            for p in zip(w, w[1:]):
                pair_count[p] -= f
            for p in zip(out, out[1:]):
                pair_count[p] += f
                if t in p:
                    where[p].add(wi)
                    touched.add(p)
            words[wi] = out
        del pair_count[(a, b)]
        for p in touched:
            heapq.heappush(heap, (-pair_count[p], vocab[p[0]], vocab[p[1]], p[0], p[1]))
    bar.close()
    return merges


def train_bpe(
    chunks: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    pattern: str = "gpt2",
    workers: int | None = None,
    progress: bool = True,
    name: str = "lmforge-bpe",
) -> Tokenizer:
    """Train a tokenizer of `vocab_size` ids: 256 bytes + merges + `special_tokens` (ids last).

    `chunks` is text cut only where no pre-tokenizer piece spans a cut (as
    `lmforge.corpus.read_chunks` yields it); `pattern` is a name (gpt2, gpt4) or a regex. If the corpus runs out of pairs first, the
    vocabulary is smaller than asked; check `tokenizer.vocab_size`.
    """
    pattern = resolve_pattern(pattern)  # checked now, not after the corpus is read
    specials = list(dict.fromkeys(special_tokens))
    check_special_strings(specials)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise LmforgeError(f"--vocab-size must be an integer, not {vocab_size!r}")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise LmforgeError(f"--workers {workers!r}: give a number of processes of at least 1 (or leave it out for all cores)")
    n_merges = vocab_size - 256 - len(specials)
    if n_merges < 0:
        raise LmforgeError(f"--vocab-size {vocab_size} is too small: it must be at least 256 bytes + {len(specials)} special tokens")
    word_counts = count_words(chunks, pattern, specials, workers)
    if not word_counts:
        raise LmforgeError("the training text is empty")
    merges = learn_merges(word_counts, n_merges, progress)
    first_special = 256 + len(merges)
    return Tokenizer(merges, {s: first_special + i for i, s in enumerate(specials)}, pattern, name=name)
