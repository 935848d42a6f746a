"""Shards' sequences made from the shard starts the counting pass notes (pipeline/corpus_index.py):
the same sequences, bit for bit, as packing the whole stream, for any set of shards, while the
real tokenizer sees only the texts of the wanted shards, each once."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from helpers import WORDS
from kdpipe.pipeline import corpus as corpus_mod
from kdpipe.pipeline.corpus import iter_sequences, resolve_corpus
from kdpipe.pipeline.corpus_index import indexed_sequences, shard_sequences, shard_starts


class Recording:
    """The real tokenizer, noting every text it is asked to tokenise."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.seen = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.seen.extend(texts)
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def corpus_file(path: Path, seed: int = 0) -> Path:
    """Texts from 1 to ~60 words, some far over a sequence, and one long line cut in pieces."""
    rnd = random.Random(seed)
    lines = [" ".join(rnd.choice(WORDS) for _ in range(rnd.choice([1, 2, 5, 20, 60]))) for _ in range(90)]
    lines[40] = " ".join(rnd.choice(WORDS) for _ in range(corpus_mod._LONG_TEXT // 3))  # > _LONG_TEXT chars
    lines[41] = "\u200b"  # not blank to iter_texts, no tokens to the tokenizer
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("mode,seq_len,shard_size", [("pack", 16, 7), ("pack", 10, 1), ("line", 12, 5)])
def test_any_set_of_shards_has_the_sequences_of_the_whole_stream(tmp_path, tokenizer, mode, seq_len, shard_size):
    corpus = resolve_corpus([str(corpus_file(tmp_path / "c.txt"))])
    whole = list(iter_sequences(corpus, tokenizer, seq_len, mode))
    starts = [st for _, st in shard_starts(indexed_sequences(corpus, tokenizer, seq_len, mode), shard_size)
              if st is not None]
    n_shards = -(-len(whole) // shard_size)
    assert len(starts) == n_shards > 4
    assert [st.tokens_before for st in starts] == [sum(map(len, whole[:i * shard_size])) for i in range(n_shards)]
    for wanted in (range(n_shards), range(1, n_shards, 2), [0, n_shards - 1], [n_shards // 2]):
        rec = Recording(tokenizer)
        got = dict(shard_sequences(corpus, rec, seq_len, mode, starts, shard_size, len(whole), wanted))
        assert list(got) == list(wanted)
        for i, seqs in got.items():
            want = whole[i * shard_size:(i + 1) * shard_size]
            assert len(seqs) == len(want) and all(np.array_equal(a, b) for a, b in zip(seqs, want)), (wanted, i)
        occurs = Counter(t for text in corpus_mod.iter_texts(corpus) for t in [text, *corpus_mod._pieces(text)])
        assert all(n <= occurs[t] for t, n in Counter(rec.seen).items())  # no text tokenised twice
        if len(wanted) == 1:  # only the texts from the shard's start to the next shard's
            first = starts[wanted[0]].text
            last = starts[wanted[0] + 1].text if wanted[0] + 1 < n_shards else None
            texts = list(corpus_mod.iter_texts(corpus))[first:None if last is None else last + 1]
            assert rec.seen and set(rec.seen) <= set(texts) | {p for t in texts for p in corpus_mod._pieces(t)}


def test_a_truncated_stream_ends_its_last_shard_where_it_was_cut(tmp_path, tokenizer):
    """--max-sequences: the last shard holds the sequences up to the cut, not the stream's rest."""
    corpus = resolve_corpus([str(corpus_file(tmp_path / "c.txt", seed=1))])
    whole = list(itertools.islice(iter_sequences(corpus, tokenizer, 16, "pack"), 23))
    starts = [st for _, st in shard_starts(itertools.islice(indexed_sequences(corpus, tokenizer, 16, "pack"), 23), 5)
              if st is not None]
    got = dict(shard_sequences(corpus, tokenizer, 16, "pack", starts, 5, 23, [3, 4]))
    assert [len(got[3]), len(got[4])] == [5, 3]
    assert all(np.array_equal(a, b) for a, b in zip(got[3] + got[4], whole[15:]))
