"""Where each shard's sequences are cut from the corpus, so a rank (or a resumed run) tokenises
only the texts of the shards it still has to make.

Sequence ids are positions in the packed stream (pipeline/corpus.py), so finding sequence i means
packing everything before it. The dump's counting pass tokenises the whole corpus once anyway;
on the way it notes, for each shard, the packing state at the start of the text its first
sequence is cut in (`ShardStart`: which text, how many sequences still belong to the shard before,
the < seq_len tokens carried over). From those, `shard_sequences` makes any set of shards in one
pass over the texts, tokenising only the texts from each wanted shard's start to the next
shard's, each once: the same sequences, bit for bit, as packing the whole stream (texts in
between are read, not tokenised).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.corpus import _TOKENIZE_BATCH, Corpus, Packer, Packing, indexed_token_docs, iter_texts


@dataclass(frozen=True)
class ShardStart:
    """The packing state where shard i's sequences begin."""

    text: int  # index (in iter_texts) of the text the shard's first sequence is cut in
    skip: int  # sequences cut from that text (and on) before the shard's first: the previous shard's
    carry: tuple[int, ...]  # tokens carried over from earlier texts at the start of that text
    tokens_before: int  # tokens of all sequences before the shard (its progress on a resume)


def indexed_sequences(corpus: Corpus, tokenizer: Any, seq_len: int, mode: Packing
                      ) -> Iterator[tuple[np.ndarray, tuple[int, int, tuple[int, ...]]]]:
    """corpus.iter_sequences' stream, each sequence with the packing state at the start of the
    text it is cut in: (text index, sequences cut before that text, carry)."""
    packer = Packer(seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id, mode)
    n, end = 0, 0
    for i, ids in indexed_token_docs(enumerate(iter_texts(corpus)), tokenizer):
        state = (i, n, packer.carry)
        for seq in packer.feed(ids):
            yield seq, state
            n += 1
        end = i + 1
    state = (end, n, packer.carry)
    for seq in packer.finish():
        yield seq, state


def shard_starts(stream: Iterable[tuple[np.ndarray, tuple[int, int, tuple[int, ...]]]], shard_size: int
                 ) -> Iterator[tuple[np.ndarray, ShardStart | None]]:
    """`indexed_sequences`' sequences, each with the ShardStart of the shard it opens (None for
    the others)."""
    tokens = 0
    for j, (seq, (text, before, carry)) in enumerate(stream):
        yield seq, ShardStart(text, j - before, carry, tokens) if j % shard_size == 0 else None
        tokens += len(seq)


class _Texts:
    """One pass over the corpus's (index, text) pairs, read in ascending order of index."""

    def __init__(self, corpus: Corpus) -> None:
        self._it = enumerate(iter_texts(corpus))

    def batch(self, first: int, last: int | None, n: int) -> list[tuple[int, str]]:
        """Up to n texts from index `first` to `last` (None: no bound); those before `first` are
        read and dropped, none after `last` is read."""
        out: list[tuple[int, str]] = []
        while len(out) < n and (last is None or first <= last):
            item = next(self._it, None)
            if item is None:
                break
            if item[0] >= first:
                out.append(item)
                first = item[0] + 1
        return out


class _Stream:
    """The packed sequences from one packing state on, tokenising texts only as they are needed
    (a batch of texts at a time, none past the bound the caller gives)."""

    def __init__(self, texts: _Texts, tokenizer: Any, packer: Packer, first_text: int, next_seq: int) -> None:
        self.texts, self.tokenizer, self.packer = texts, tokenizer, packer
        self.next_text = first_text  # the next text to tokenise
        self.next_seq = next_seq  # id of the next sequence this stream cuts
        self.docs: deque[list[int]] = deque()  # tokenised, not yet packed
        self.cutting: Iterator[np.ndarray] | None = None
        self.finished = False

    @property
    def tokenised(self) -> int:
        """Index of the last text tokenised."""
        return self.next_text - 1

    def take(self, n: int, last_text: int | None) -> list[np.ndarray]:
        """The next n sequences (fewer at the end of the corpus), reading no text past `last_text`."""
        out = []
        while len(out) < n and (seq := self._next(last_text)) is not None:
            out.append(seq)
        self.next_seq += len(out)
        return out

    def _next(self, last_text: int | None) -> np.ndarray | None:
        while True:
            if self.cutting is not None:
                if (seq := next(self.cutting, None)) is not None:
                    return seq
                self.cutting = None
            if self.docs:
                self.cutting = self.packer.feed(self.docs.popleft())
                continue
            batch = self.texts.batch(self.next_text, last_text, _TOKENIZE_BATCH)
            if batch:
                self.next_text = batch[-1][0] + 1
                self.docs.extend(ids for _, ids in indexed_token_docs(batch, self.tokenizer))
                continue
            if last_text is not None:  # the counting pass found more sequences by this text
                raise KdpipeError(f"the corpus changed while it was read: its text {last_text} and those "
                                  "before it hold fewer sequences than when it was counted; rerun")
            if self.finished:
                return None
            self.finished, self.cutting = True, self.packer.finish()


def shard_sequences(corpus: Corpus, tokenizer: Any, seq_len: int, mode: Packing, starts: list[ShardStart],
                    shard_size: int, n_sequences: int, wanted: Iterable[int]
                    ) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(index, sequences) of each wanted shard (ascending), in one pass over the texts. Shard i's
    sequences are all cut by the end of text starts[i + 1].text, so no text past it is read for
    shard i. Where the texts up to the next wanted shard's start are tokenised already (the next
    shard, or a text longer than the shards in between), packing goes on through them; else it
    restarts from the shard's start, and the texts in between are read, not tokenised. So every
    text is tokenised at most once."""
    texts = _Texts(corpus)
    stream: _Stream | None = None
    for index in wanted:
        st, first = starts[index], index * shard_size
        last = starts[index + 1].text if index + 1 < len(starts) else None
        if stream is None or st.text > stream.tokenised:
            packer = Packer(seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id, mode, st.carry)
            stream = _Stream(texts, tokenizer, packer, st.text, first - st.skip)
        stream.take(first - stream.next_seq, last)  # the previous shards' sequences: dropped
        yield index, stream.take(min(shard_size, n_sequences - first), last)
