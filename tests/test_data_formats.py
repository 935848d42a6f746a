"""`--data` reads what `datasets` reads: CSV/TSV, compressed text, any plain-text extension,
save_to_disk folders (Dataset and DatasetDict), local dataset repository folders; `--format`
says what a file is. Each gives the same documents as the plain text file."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pytest

from kdpipe.pipeline.corpus import iter_texts, resolve_corpus
from kdpipe.pipeline.errors import KdpipeError

DOCS = ["the king of the city .", "the film, was great", "a river in the north"]


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    f = tmp_path / "plain.txt"
    f.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    return f


def texts(*sources: str | Path, **kw) -> list[str]:
    return list(iter_texts(resolve_corpus([str(s) for s in sources], **kw)))


def test_compressed_and_oddly_named_text(tmp_path: Path, plain: Path) -> None:
    import zstandard

    raw = plain.read_bytes()
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c.txt.bz2").write_bytes(bz2.compress(raw))
    (tmp_path / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "c.cor").write_bytes(raw)
    for name in ("c.txt.gz", "c.txt.bz2", "c.txt.zst", "c.cor"):
        corpus = resolve_corpus([str(tmp_path / name)])
        assert corpus.builder == "text" and texts(tmp_path / name) == DOCS, name
    # the fingerprint hashes the file as stored; a .txt's has the keys it always had
    import hashlib

    assert resolve_corpus([str(plain)]).fingerprint == {
        "format": "text", "text_column": "text",
        "files": [{"name": "plain.txt", "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}]}
    (tmp_path / "bad.txt.gz").write_bytes(gzip.compress("caf\u00e9 na\u00efve\n".encode("latin-1")))
    with pytest.raises(KdpipeError, match="not valid UTF-8 once decompressed"):
        resolve_corpus([str(tmp_path / "bad.txt.gz")])
    (tmp_path / "torn.txt.gz").write_bytes(gzip.compress(raw)[:20])
    with pytest.raises(KdpipeError, match="cannot be decompressed"):
        resolve_corpus([str(tmp_path / "torn.txt.gz")])


def test_csv_and_tsv_with_a_text_column(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("id,body\n" + "".join(f'{i},"{d}"\n' for i, d in enumerate(DOCS)))
    (tmp_path / "c.tsv").write_text("id\tbody\n" + "".join(f"{i}\t{d}\n" for i, d in enumerate(DOCS)))
    assert texts(tmp_path / "c.csv", text_column="body") == DOCS
    assert texts(tmp_path / "c.tsv", text_column="body") == DOCS
    with pytest.raises(KdpipeError, match="no column 'text'"):
        texts(tmp_path / "c.csv")


def test_format_overrides_the_name(tmp_path: Path) -> None:
    f = tmp_path / "export.dat"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    assert texts(f, data_format="json") == DOCS
    assert texts(f) == [json.dumps({"text": d}) for d in DOCS]  # auto: any other extension is text
    with pytest.raises(KdpipeError, match="one format"):
        resolve_corpus([str(f), str(_csv(tmp_path))])
    assert resolve_corpus([str(f), str(_csv(tmp_path))], data_format="text").builder == "text"


def _csv(tmp_path: Path) -> Path:
    p = tmp_path / "x.csv"
    p.write_text("text\nthe king\n")
    return p


def test_save_to_disk_folders(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": DOCS, "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "validation": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    corpus = resolve_corpus([str(tmp_path / "one")])
    assert corpus.builder == "disk" and texts(tmp_path / "one") == DOCS
    assert {f["name"] for f in corpus.fingerprint["files"]} >= {"state.json", "dataset_info.json"}
    assert texts(tmp_path / "dict") == DOCS
    assert texts(tmp_path / "dict", split="validation") == DOCS[1:2]
    with pytest.raises(KdpipeError, match="no split 'test'.*train, validation"):
        resolve_corpus([str(tmp_path / "dict")], split="test")
    with pytest.raises(KdpipeError, match="read alone"):
        resolve_corpus([str(tmp_path / "one"), str(tmp_path / "dict")])


def test_a_dataset_repository_folder(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                    "  - split: train\n    path: data/train.jsonl\n---\n# my corpus\n")
    (repo / "data" / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    corpus = resolve_corpus([str(repo)])
    assert corpus.builder == "repo" and texts(repo) == DOCS
    # a plain folder of text files (a README without front matter is just a file) is read file by file
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "README.md").write_text("# notes\n")
    (plain / "a.txt").write_text(DOCS[0] + "\n")
    assert resolve_corpus([str(plain)]).builder == "text"
    assert texts(plain) == ["# notes", DOCS[0]]


def test_teacher_dump_takes_a_compressed_corpus_and_refuses_a_bad_format(tmp_path, teacher_dir, corpus_file,
                                                                          kdpipe_inproc, dump_args, one_line_error):
    import pyarrow.parquet as pq

    gz = tmp_path / "corpus.txt.gz"
    gz.write_bytes(gzip.compress(corpus_file.read_bytes()))
    for name, data in (("plain", corpus_file), ("gz", gz)):
        r = kdpipe_inproc("teacher-dump", "--teacher", teacher_dir, "--data", data, "--out", tmp_path / name,
                          *dump_args, "--max-sequences", "8")
        assert r.returncode == 0, r.stderr
    a, b = (pq.read_table(tmp_path / n / "shards").column("input_ids").to_pylist() for n in ("plain", "gz"))
    assert a == b and a
    one_line_error(kdpipe_inproc("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file, "--out",
                                 tmp_path / "x", "--format", "xml"), "--format")


def test_eval_heldout_reads_the_same_formats_with_heldout_format(tmp_path, teacher_dir, small_corpus_file,
                                                                  kdpipe_inproc, one_line_error):
    """The held-out text as a plain file, as a CSV whose name does not say so (--heldout-format), and
    as a save_to_disk DatasetDict's validation split: the same documents, the same masked-LM scores."""
    import datasets

    lines = small_corpus_file.read_text(encoding="utf-8").splitlines()
    dat = tmp_path / "heldout.dat"
    dat.write_text("id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(lines)), encoding="utf-8")
    ds = datasets.Dataset.from_dict({"text": lines})
    datasets.DatasetDict({"train": ds.select([0]), "validation": ds}).save_to_disk(str(tmp_path / "disk"))
    args = ("eval", "--teacher", teacher_dir, "--student", f"s={teacher_dir}", "--no-speed", "--seq-len", "32",
            "--heldout-sequences", "8")
    scores = {}
    for name, extra in (("plain", ("--heldout", small_corpus_file)),
                        ("csv", ("--heldout", dat, "--heldout-format", "csv", "--heldout-text-column", "body")),
                        ("disk", ("--heldout", tmp_path / "disk", "--heldout-split", "validation"))):
        r = kdpipe_inproc(*args, *extra, "--out", tmp_path / f"report-{name}")
        assert r.returncode == 0, r.stderr
        part = json.loads((tmp_path / f"report-{name}" / "parts" / "mlm" / "s.json").read_text())["data"]
        scores[name] = {k: part[k] for k in ("masked_tokens", "top1_accuracy", "mean_cross_entropy", "tokens")}
    assert scores["csv"] == scores["plain"] == scores["disk"]
    heldout = json.loads((tmp_path / "report-csv" / "eval.json").read_text())["inputs"]["heldout"]
    assert heldout["format"] == "csv" and heldout["text_column"] == "body"
    one_line_error(kdpipe_inproc(*args, "--heldout", dat, "--out", tmp_path / "x", "--heldout-format", "xml"),
                   "--heldout-format")
    one_line_error(kdpipe_inproc(*args, "--heldout", dat, "--out", tmp_path / "y", "--heldout-format", "csv"),
                   "held-out text", "no column 'text'", "--heldout-text-column")
