"""Corpus reading and packing: full-length packed sequences, line mode, linear in a huge line,
and clear errors for input that is not usable text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kdpipe.pipeline.corpus import iter_sequences, iter_texts, pack, resolve_corpus
from kdpipe.pipeline.errors import KdpipeError

CLS, SEP = 101, 102


def docs_of(lengths: list[int], start: int = 1000) -> list[list[int]]:
    out, nxt = [], start
    for n in lengths:
        out.append(list(range(nxt, nxt + n)))
        nxt += n
    return out


@pytest.mark.parametrize("seq_len", [8, 16, 33])
def test_pack_fills_every_sequence_but_the_last(seq_len: int) -> None:
    docs = docs_of([3, 40, 1, 7, 100, 5, 13])
    seqs = list(pack(docs, seq_len, CLS, SEP, "pack"))
    assert all(s.dtype == np.int64 for s in seqs)
    assert all(len(s) == seq_len for s in seqs[:-1])
    assert 3 <= len(seqs[-1]) <= seq_len
    assert all(s[0] == CLS and s[-1] == SEP for s in seqs)
    # the bodies, concatenated, are the documents joined by [SEP] (none where a document starts a
    # sequence: [CLS] already marks it): nothing lost, nothing repeated
    joined: list[int] = []
    for i, d in enumerate(docs):
        if i and len(joined) % (seq_len - 2):
            joined.append(SEP)
        joined.extend(d)
    assert [int(t) for s in seqs for t in s[1:-1]] == joined


def test_pack_exact_multiple_has_no_empty_tail() -> None:
    seqs = list(pack([list(range(1000, 1030))], 8, CLS, SEP, "pack"))  # 30 = 5 * 6
    assert [len(s) for s in seqs] == [8] * 5


def test_line_mode_one_document_per_sequence() -> None:
    docs = docs_of([3, 14, 1, 6])
    seqs = list(pack(docs, 8, CLS, SEP, "line"))
    assert [len(s) for s in seqs] == [5, 8, 8, 4, 3, 8]  # 14 tokens -> 6 + 6 + 2
    assert all(s[0] == CLS and s[-1] == SEP for s in seqs)
    assert not any(SEP in s[1:-1] for s in seqs), "line mode must not join documents"
    assert [int(t) for s in seqs for t in s[1:-1]] == [t for d in docs for t in d]


def test_seq_len_without_room_is_refused() -> None:
    with pytest.raises(KdpipeError, match="no room"):
        list(pack([[1000]], 2, CLS, SEP))


def test_one_enormous_document_packs_whole() -> None:
    """A 1.2M-token document, cut by offset (bench/corpus_pack.py times that it stays linear: a
    timed test fails on a loaded machine): every token once, in order, full sequences."""
    n = 1_200_000
    seqs = list(pack([list(range(1000, 1000 + n))], 128, CLS, SEP, "pack"))
    assert len(seqs) == -(-n // 126) and all(len(s) == 128 for s in seqs[:-1])
    body = np.concatenate([s[1:-1] for s in seqs])
    assert np.array_equal(body, np.arange(1000, 1000 + n))


def test_enormous_single_line_through_the_tokenizer(tmp_path: Path, tokenizer) -> None:
    words = ("the king of the north river city " * 6000).strip()  # one line, 42k words
    f = tmp_path / "one-line.txt"
    f.write_text(words + "\n", encoding="utf-8")
    corpus = resolve_corpus([str(f)])
    seqs = list(iter_sequences(corpus, tokenizer, 64, "pack"))
    n_tokens = len(tokenizer(words, add_special_tokens=False)["input_ids"])
    assert len(seqs) == -(-n_tokens // 62)
    assert all(len(s) == 64 for s in seqs[:-1])
    assert sum(len(s) - 2 for s in seqs) == n_tokens


def test_real_file_pack_and_line(tmp_path: Path, tokenizer) -> None:
    f = tmp_path / "c.txt"
    f.write_text("the king .\n\n   \nthe river of the north city was long .\nfilm\n", encoding="utf-8")
    corpus = resolve_corpus([str(f)])
    texts = list(iter_texts(corpus))
    assert texts == ["the king .", "the river of the north city was long .", "film"]  # blanks skipped
    packed = list(iter_sequences(corpus, tokenizer, 8, "pack"))
    lines = list(iter_sequences(corpus, tokenizer, 64, "line"))
    assert len(lines) == 3
    assert lines[1][1:-1].tolist() == tokenizer(texts[1], add_special_tokens=False)["input_ids"]
    assert all(len(s) == 8 for s in packed[:-1])
    again = list(iter_sequences(resolve_corpus([str(f)]), tokenizer, 8, "pack"))
    assert all(np.array_equal(a, b) for a, b in zip(packed, again)) and len(packed) == len(again)


def test_jsonl_with_text_column(tmp_path: Path, tokenizer) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(["the king", "a city"])))
    corpus = resolve_corpus([str(f)], text_column="body")
    assert list(iter_texts(corpus)) == ["the king", "a city"]
    with pytest.raises(KdpipeError, match="no column 'text'"):
        list(iter_texts(resolve_corpus([str(f)])))


def test_fingerprint_follows_the_content(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_text("the king .\n", encoding="utf-8")
    a = resolve_corpus([str(f)]).fingerprint
    f.write_text("the kings .\n", encoding="utf-8")
    b = resolve_corpus([str(f)]).fingerprint
    assert a["files"][0]["sha256"] != b["files"][0]["sha256"]
    assert a["files"][0]["name"] == "c.txt"  # a name, not an absolute path: caches travel


@pytest.mark.parametrize("content, needle", [
    (None, r"corpus file\(s\) not found"),
    (b"", "corpus is empty"),
    ("caf\u00e9 na\u00efve\n".encode("latin-1"), "not valid UTF-8"),
    (bytes(range(256)) * 4, "not valid UTF-8"),
    (b"the king \xc3", "middle of a UTF-8 character"),
])
def test_unusable_corpus_is_refused(tmp_path: Path, content: bytes | None, needle: str) -> None:
    f = tmp_path / "c.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(KdpipeError, match=needle) as e:
        resolve_corpus([str(f)])
    assert "\n" not in str(e.value)


def test_mixed_formats_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(KdpipeError, match="one format"):
        resolve_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    (tmp_path / "c.bin").write_bytes(bytes(range(256)))  # an unknown extension is text: checked as such
    with pytest.raises(KdpipeError, match="not valid UTF-8"):
        resolve_corpus([str(tmp_path / "c.bin")])
