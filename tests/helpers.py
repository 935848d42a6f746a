"""Tiny real models and corpora built in code, shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

WORDS = ("the a of and to in is was for on with as by at from that it his her they "
         "film book city river music war king game team school water light music year time "
         "first new old great small long high early late north south house road story life").split()


def write_vocab(path: Path) -> Path:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    # dict.fromkeys: one id per token ("a" is a word and a letter), so every id fits the embeddings
    vocab = list(dict.fromkeys(specials + sorted(set(WORDS)) + letters + [".", ",", "0", "1", "2"]))
    path.write_text("\n".join(vocab) + "\n")
    return path


def tiny_teacher(folder: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 BERT masked LM with its tokenizer, saved as a plain folder."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizerFast(vocab=str(write_vocab(folder / "vocab.txt")), do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128)
    BertForMaskedLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def student_train(*args):
    """`kdpipe student-train ARGS` through click's runner (a click Result: exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from kdpipe.pipeline.cli import cli

    return CliRunner().invoke(cli, ["student-train", *map(str, args)])


def assert_refused(result, *needles: str) -> None:
    """A click Result that failed with one `Error:` line holding every needle, and no traceback."""
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert result.exit_code != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def tiny_corpus(path: Path, lines: int = 60, seed: int = 0) -> Path:
    import random

    rnd = random.Random(seed)
    text = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 25))) + " ." for _ in range(lines)]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def plain_rows(table) -> list[dict]:
    """A shard table's rows as plain values, read the way the cache's dataset card tells a reader
    without kdpipe: a vector column's value is `np.frombuffer(value, dtype).reshape(-1, width)`,
    dtype and width from the field's metadata (`kdpipe.dtype`, `kdpipe.width`)."""
    import numpy as np

    vectors = {f.name: (np.dtype(f.metadata[b"kdpipe.dtype"].decode()), int(f.metadata[b"kdpipe.width"]))
               for f in table.schema if f.metadata and b"kdpipe.dtype" in f.metadata}
    rows = table.to_pylist()
    for row in rows:
        for name, (dtype, width) in vectors.items():
            row[name] = np.frombuffer(row[name], dtype).reshape(-1, width)
    return rows


def tiny_task(path: Path, rows: int = 24, seed: int = 0) -> Path:
    """A two-class JSON-lines task of short random sentences (labels alternate pos/neg)."""
    import random

    rnd = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"text": " ".join(rnd.choice(["the", "a", "cat", "sat"]) for _ in range(6)),
                                "label": "pos" if i % 2 else "neg"}) + "\n")
    return path


# Settings of the small caches and runs the extra-target tests (layer-wise, relation) share.
SMALL_DUMP = ("--seq-len", "32", "--shard-size", "4", "--top-k", "8", "--hidden-dim", "8", "--temperatures", "1,2",
              "--batch-size", "4", "--writers", "1")
SMALL_TRAIN = ("--batch-size", "4", "--temperature", "2", "--seed", "0", "--max-steps", "6", "--save-every", "3",
               "--log-every", "1")


def small_dump(kdpipe_inproc, teacher: Path, corpus: Path, out: Path, *extra: str):
    """teacher-dump in process with SMALL_DUMP and `extra`."""
    return kdpipe_inproc("teacher-dump", "--teacher", teacher, "--data", corpus, "--out", out, *SMALL_DUMP, *extra)


def manifest_of(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def split_row_groups(cache: Path, rows: int) -> None:
    """Rewrite every shard of `cache` (in place) with row groups of `rows` rows, values, schema and
    footer unchanged, and re-hash the manifest: a reader must give the same rows whatever the
    row groups."""
    import hashlib
    import json

    import pyarrow.parquet as pq

    manifest = json.loads((cache / "manifest.json").read_text())
    for e in manifest["shards"]:
        p = cache / e["path"]
        pq.write_table(pq.read_table(p), p, row_group_size=rows, compression="zstd")
        e["sha256"], e["bytes"] = hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size
    manifest["bytes"] = sum(e["bytes"] for e in manifest["shards"])
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
