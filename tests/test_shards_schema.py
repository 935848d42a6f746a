"""Shards: the explicit Arrow schema, a lossless round trip, and files that plain `pyarrow` and
`datasets` read without any kdpipe code, holding what the teacher produced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import load_file

from helpers import plain_rows
from kdpipe.pipeline.shards import ShardData, from_table, iter_row_groups, read_fingerprint, to_table, write_shard
from kdpipe.schemas.shard import (
    FINGERPRINT_KEY, SCHEMA_VERSION, SCHEMA_VERSION_KEY, id_type, shard_schema, vector_layout,
)


def random_shard(rows: int, k: int, n_t: int, d: int, vocab: int, seed: int = 0) -> ShardData:
    rng = np.random.default_rng(seed)
    length = rng.integers(3, 40, size=rows)
    mlm_count = np.array([rng.integers(0, n + 1) for n in length])
    n, m = int(length.sum()), int(mlm_count.sum())
    return ShardData(
        seq_id=np.arange(100, 100 + rows), view=rng.integers(0, 3, size=rows), length=length,
        input_ids=rng.integers(0, vocab, size=n), mlm_count=mlm_count,
        mlm_positions=rng.integers(0, 40, size=m), mlm_labels=rng.integers(0, vocab, size=m),
        topk_ids=rng.integers(0, vocab, size=(n, k)),
        topk_logits=rng.normal(0, 5, size=(n, k)).astype(np.float32),
        log_z=rng.normal(10, 3, size=(n, n_t)).astype(np.float32),
        hidden=rng.normal(0, 1, size=(n, d)).astype(np.float32),
    )


@pytest.mark.parametrize("vocab", [30522, 70000])
def test_round_trip(tmp_path: Path, vocab: int) -> None:
    data = random_shard(300, 8, 3, 16, vocab)
    schema = shard_schema(vocab, k=8, n_temperatures=3, hidden_dim=16)
    path = tmp_path / "shard-00000.parquet"
    write_shard(path, to_table(data, schema), "ab" * 32, zstd_level=3)
    assert read_fingerprint(path) == "ab" * 32
    assert not list(tmp_path.glob(".*"))  # no temporary left
    table = pq.read_table(path)
    assert table.schema.equals(schema, check_metadata=False)
    assert table.schema.metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()
    back = from_table(table)
    exact = ("seq_id", "view", "length", "input_ids", "mlm_count", "mlm_positions", "mlm_labels",
             "topk_ids", "log_z")
    for name in exact:
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name), err_msg=name)
    for name in ("topk_logits", "hidden"):  # stored as float16
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name).astype(np.float16))
    # streaming by row group gives the same rows
    parts = list(iter_row_groups(path))
    assert len(parts) > 1
    np.testing.assert_array_equal(np.concatenate([p.input_ids for p in parts]), data.input_ids)


def test_types_are_sized_to_the_data() -> None:
    assert id_type(30522) == pa.uint16() and id_type(65536) == pa.uint16()
    assert id_type(65537) == pa.uint32()
    s = shard_schema(30522, k=32, n_temperatures=3, hidden_dim=128)
    assert vector_layout(s.field("topk_ids")) == (np.dtype("<u2"), 32)
    assert vector_layout(s.field("topk_logits")) == (np.dtype("<f2"), 32)
    assert vector_layout(s.field("log_z")) == (np.dtype("<f4"), 3)
    assert vector_layout(s.field("hidden")) == (np.dtype("<f2"), 128)
    assert vector_layout(shard_schema(70000, k=4, n_temperatures=1, hidden_dim=8).field("topk_ids")) == \
        (np.dtype("<u4"), 4)
    # one binary value per row, no nested list levels (issue 17: they set the host path's pace)
    assert all(s.field(c).type == pa.large_binary() for c in ("topk_ids", "topk_logits", "log_z", "hidden"))
    assert s.field("input_ids").type == pa.list_(pa.uint16())
    assert not any(f.nullable for f in s)


def test_zstd_and_plain_vectors_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "s.parquet"
    write_shard(path, to_table(random_shard(50, 4, 2, 8, 1000), shard_schema(1000, k=4, n_temperatures=2, hidden_dim=8)), "0" * 64, 3)
    md = pq.ParquetFile(path).metadata
    col = {md.row_group(0).column(i).path_in_schema: md.row_group(0).column(i)
           for i in range(md.num_columns)}
    assert all(c.compression == "ZSTD" for c in col.values())
    assert not any("DICTIONARY" in e for c in col.values() for e in c.encodings)
    for name in ("hidden", "topk_ids", "topk_logits", "log_z"):  # one flat byte array per row, no levels
        assert col[name].physical_type == "BYTE_ARRAY"  # under its own name: not a nested list's leaf


# ------------------------------------------------------------------- a real cache, read plainly

def manifest_of(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def test_plain_pyarrow_reads_what_the_teacher_produced(reference_cache: Path, teacher_model, tokenizer,
                                                       corpus_file: Path) -> None:
    """Each stored row, read with pyarrow alone, against the teacher run again on the stored input."""
    from kdpipe.pipeline.corpus import iter_sequences, resolve_corpus

    m = manifest_of(reference_cache)
    k, temps, d = m["top_k"], m["temperatures"], m["hidden_dim"]
    projection = load_file(str(reference_cache / m["projection"]["path"]))["projection"]  # (H, d)
    assert projection.shape == (teacher_model.config.hidden_size, d)
    seqs = list(iter_sequences(resolve_corpus([str(corpus_file)]), tokenizer, m["seq_len"], "pack"))
    assert len(seqs) == m["sequences"]
    checked = 0
    for entry in m["shards"][:3] + m["shards"][-1:]:
        table = plain_rows(pq.read_table(reference_cache / entry["path"]))
        assert len(table) == entry["rows"]
        assert [r["seq_id"] for r in table] == list(range(entry["first_seq"], entry["first_seq"] + entry["num_seqs"]))
        for row in table:
            ids = np.array(row["input_ids"])
            pos, labels = np.array(row["mlm_positions"], dtype=np.int64), np.array(row["mlm_labels"])
            assert row["length"] == len(ids) == len(row["topk_ids"]) == len(row["hidden"])
            original = ids.copy()
            original[pos] = labels
            np.testing.assert_array_equal(original, seqs[row["seq_id"]])  # masked from the corpus
            assert len(pos) == int(np.ceil(0.15 * (len(ids) - 2) - 1e-9))
            with torch.inference_mode():
                out = teacher_model(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True)
            z = out.logits[0].double()  # (T, V)
            stored_ids = torch.tensor(row["topk_ids"].astype(np.int64))  # (T, k)
            stored_vals = torch.tensor(row["topk_logits"], dtype=torch.float64)
            # the stored ids are the k largest logits, by falling value, stored to fp16 precision
            assert torch.allclose(z.gather(1, stored_ids), stored_vals, rtol=1e-3, atol=1e-3)
            kth = z.topk(k, dim=-1).values[:, -1:]
            assert (z.gather(1, stored_ids) >= kth - 1e-4).all()
            assert (stored_vals.diff(dim=-1) <= 0).all()
            ref_log_z = torch.stack([torch.logsumexp(z / t, dim=-1) for t in temps], dim=-1)
            assert torch.allclose(torch.tensor(row["log_z"], dtype=torch.float64), ref_log_z, atol=1e-4)
            ref_hidden = out.hidden_states[-1][0].double() @ torch.from_numpy(projection).double()
            assert torch.allclose(torch.tensor(row["hidden"], dtype=torch.float64), ref_hidden,
                                  rtol=2e-3, atol=2e-3)
            checked += 1
    assert checked >= 7


def test_datasets_reads_the_shards(reference_cache: Path, tmp_path: Path) -> None:
    import datasets

    m = manifest_of(reference_cache)
    files = [str(reference_cache / e["path"]) for e in m["shards"]]
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == m["rows"]
    assert ds.column_names == pq.read_schema(files[0]).names
    plain = pa.concat_tables([pq.read_table(f) for f in files])
    for i in (0, ds.num_rows // 2, ds.num_rows - 1):
        a, b = ds[i], plain.slice(i, 1).to_pylist()[0]
        for col in b:
            assert a[col] == b[col], col  # vector columns: the same bytes
        decoded = plain_rows(plain.slice(i, 1))[0]
        assert decoded["hidden"].shape == (b["length"], m["hidden_dim"])
        assert decoded["topk_ids"].shape == (b["length"], m["top_k"])
    assert sum(ds["length"]) == m["tokens"]


def test_shard_footer_carries_the_fingerprint(reference_cache: Path) -> None:
    m = manifest_of(reference_cache)
    md = pq.read_schema(reference_cache / m["shards"][0]["path"]).metadata
    assert md[FINGERPRINT_KEY].decode() == m["fingerprint_sha256"]


def test_shards_describe_themselves(reference_cache: Path) -> None:
    """Decoding the top-k targets needs no manifest: the footer names log_z's temperatures, says
    the logits are raw and where the targets sit; the probabilities it describes are the teacher's."""
    m = manifest_of(reference_cache)
    schema = pq.read_schema(reference_cache / m["shards"][0]["path"])
    desc = json.loads(schema.metadata[b"kdpipe.description"])
    assert desc["temperatures"] == [1.0, 1.5, 3.0] == m["temperatures"]
    assert desc["targets"] == "topk" and desc["target_positions"] == "all" and desc["k"] == 8
    assert "raw" in desc["topk_logits"] and desc["hidden"]["dim"] == 16
    assert desc["hidden"]["projection"] == m["fingerprint"]["hidden"]["projection"]
    log_z = schema.field("log_z").metadata
    assert json.loads(log_z[b"kdpipe.temperatures"]) == [1.0, 1.5, 3.0] and log_z[b"kdpipe.positions"] == b"all"
    assert b"raw" in schema.field("topk_logits").metadata[b"kdpipe.meaning"]
    # with the footer alone: p_i = exp(z_i / T - log_z[T]) sums to at most 1 at every T
    t = pq.read_table(reference_cache / m["shards"][0]["path"], columns=["topk_logits", "log_z"])
    rows = plain_rows(t)
    z = np.concatenate([r["topk_logits"] for r in rows]).astype(np.float64)  # (P, k)
    lz = np.concatenate([r["log_z"] for r in rows]).astype(np.float64)  # (P, n_T)
    for j, temp in enumerate(desc["temperatures"]):
        p = np.exp(z / temp - lz[:, j:j + 1]).sum(-1)
        assert (p <= 1 + 1e-2).all() and (p > 0).all()


def test_datasets_loads_a_cache_folder_as_it_is(reference_cache: Path, tmp_path: Path) -> None:
    import datasets

    m = manifest_of(reference_cache)
    card = (reference_cache / "README.md").read_text()
    assert "configs:" in card and "shards/*.parquet" in card and m["fingerprint_sha256"] in card
    ds = datasets.load_dataset(str(reference_cache), cache_dir=str(tmp_path / "hf"))
    assert list(ds) == ["train"] and ds["train"].num_rows == m["rows"]
    assert sum(ds["train"]["length"]) == m["tokens"]
    # the card's recipe for a vector column, on what datasets loaded: (length, width) of finite values
    d = m["hidden_dim"]
    assert f'hidden = np.frombuffer(ds[0]["hidden"], "<f2").reshape(-1, {d})' in card
    assert "| topk_ids | uint16 (`<u2`) | 8 |" in card and "| log_z | float32 (`<f4`) | 3 |" in card
    row = ds["train"][0]
    hidden = np.frombuffer(row["hidden"], "<f2").reshape(-1, d)
    assert hidden.shape == (row["length"], d) and np.isfinite(hidden).all()


def test_a_cache_without_targets_or_hidden_states_is_described_too() -> None:
    """Mode none (teacher-adapt's cache) has no targets, temperatures or projection."""
    from types import SimpleNamespace

    from kdpipe.pipeline import cache_card

    fp = {"targets": {"mode": "none", "positions": "all", "temperatures": None}, "hidden": None,
          "teacher": {"model_type": "bert", "vocab_size": 50, "weights_sha256": None}}
    schema = cache_card.describe(shard_schema(50, mode="none"), fp)
    assert json.loads(schema.metadata[b"kdpipe.description"])["targets"] == "none"
    m = SimpleNamespace(fingerprint=fp, fingerprint_sha256="0" * 64, vocab_size=50, sequences=3, seq_len=8,
                        rows=3, tokens=20, targets="none", top_k=0, hidden_dim=0, bytes_per_token=1.0,
                        temperatures=[], state_dim=None, hidden_layers=[], relation=None)
    card = cache_card.render(m)
    assert "configs:" in card and "Vector columns" not in card  # mode none stores none


def test_vector_columns_decode_as_views_and_refuse_partial_entries() -> None:
    """A vector column decodes to a view of its data buffer (no copy); a row whose bytes are not
    whole entries is a LayoutError naming it, never values shifted into the next row."""
    from kdpipe.pipeline.shards import LayoutError, decode_vectors, encode_vectors

    field = shard_schema(1000, k=4, n_temperatures=2, hidden_dim=8).field("hidden")
    values = np.random.default_rng(0).normal(size=(9, 8)).astype(np.float16)
    col = encode_vectors(values, np.array([4, 0, 5]), field)
    back, counts = decode_vectors(col, field)
    assert np.shares_memory(back, values)  # the encoded column holds the buffer itself, too
    np.testing.assert_array_equal(back, values)
    assert counts.tolist() == [4, 0, 5]
    later, counts = decode_vectors(col.slice(2), field)  # a slice starts inside the data buffer
    np.testing.assert_array_equal(later, values[4:])
    assert counts.tolist() == [5]
    with pytest.raises(ValueError, match=r"\(9, 8\) values wanted"):
        encode_vectors(values[:, :4], np.array([4, 0, 5]), field)
    torn = pa.array([values[:4].tobytes(), values[4:].tobytes()[:-2]], pa.large_binary())
    with pytest.raises(LayoutError, match="row 1: hidden holds 78 bytes, not a whole number of 16-byte"):
        decode_vectors(torn, field)


def test_a_cache_of_an_older_schema_is_refused_in_one_line(copy_cache, kdpipe_inproc, one_line_error, digest,
                                                           tmp_path: Path) -> None:
    """A version-2 cache (nested lists) is not read as if it were version 3: every reader says to re-dump."""
    from kdpipe.pipeline.cache import fingerprint_sha256

    cache = copy_cache()
    m = manifest_of(cache)
    m["schema_version"] = m["fingerprint"]["schema_version"] = 2
    m["fingerprint_sha256"] = fingerprint_sha256(m["fingerprint"])
    (cache / "manifest.json").write_text(json.dumps(m))
    before = digest(cache)
    for args in (("cache", "verify", "--deep", cache),
                 ("student-train", "--cache", cache, "--out", tmp_path / "run", "--temperature", "1.5")):
        one_line_error(kdpipe_inproc(*args), "schema version 2", f"reads version {SCHEMA_VERSION} only", "re-dump")
    assert digest(cache) == before and not (tmp_path / "run").exists()


def test_narrowing_to_float16_rounds_as_numpy_does() -> None:
    """as_stored narrows with torch (numpy is ~30x slower): the same bits as numpy's astype, ties,
    subnormals, overflow to infinity and signed zeros included."""
    from kdpipe.pipeline.shards import as_stored

    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = np.unique(halves[np.isfinite(halves)].astype(np.float64))
    x = np.concatenate([finite, (finite[:-1] + finite[1:]) / 2, [65519.9, 65520.0, 1e6, -1e6, -0.0]]).astype(np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    got = as_stored(x.reshape(-1, 1), np.dtype(np.float16))
    assert got.dtype == np.float16 and got.shape == (len(x), 1)
    assert np.array_equal(got.reshape(-1).view(np.uint16), want.view(np.uint16))
