"""`kdpipe cache verify|info|fidelity`: check a cache against its manifest; say what it holds; measure
how faithful each target mode's L_ce would be on its positions.

    kdpipe cache verify caches/wiki
    kdpipe cache verify --deep caches/wiki
    kdpipe cache fidelity caches/wiki --teacher ./bert-mlm --k 8,32,128 --samples 8,32,128 \
        --temperatures 1,2,4 --positions 2000 --out fidelity.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kdpipe.pipeline import storage
from kdpipe.pipeline.cache import Problem, load_manifest, verify_cache
from kdpipe.pipeline.config import echo_json, floats_option, ints_option
from kdpipe.pipeline.fsutil import atomic_write_json


def verify(cache_dir: Path | str, deep: bool = False) -> list[Problem]:
    """Every listed file against the manifest (sizes, SHA-256, each shard footer's fingerprint); with
    `deep`, every shard's values too (pipeline/values.py). A cache on a store is fetched a shard at
    a time."""
    from kdpipe.pipeline.values import deep_problems

    with storage.local_cache(str(cache_dir)) as local:
        m, problems = verify_cache(local)
        if deep:
            problems += deep_problems(local, m, {p.path for p in problems})
    return problems


def info(cache_dir: Path | str) -> dict[str, Any]:
    with storage.local_cache(str(cache_dir)) as local:  # reads the manifest, fetches no shard
        m = load_manifest(local)
    return {
        "cache": str(cache_dir), "schema_version": m.schema_version,
        "fingerprint_sha256": m.fingerprint_sha256, "fingerprint": m.fingerprint,
        "shards": len(m.shards), "sequences": m.sequences, "rows": m.rows, "tokens": m.tokens,
        "bytes": m.bytes, "bytes_per_token": m.bytes_per_token,
        "bytes_per_token_by_column": m.bytes_per_token_by_column,
        "bytes_per_token_by_kind": bytes_by_kind(m),
        "targets": m.targets, "target_positions": m.target_positions, "top_k": m.top_k,
        "temperatures": m.temperatures, "samples": m.samples, "state_dim": m.state_dim,
        "hidden_dim": m.hidden_dim, "hidden_layers": m.hidden_layers,
        "relation": m.relation.model_dump() if m.relation else None,
        "created_at": m.created_at, "finished_at": m.finished_at,
    }


def bytes_by_kind(m: Any) -> dict[str, float]:
    """Bytes per token of each kind of stored target: the inputs (ids, masks, row fields), the
    last hidden state, the other layers' states (and each one's share), the attention projections of
    the relation targets (and each part's share), the mode's L_ce columns."""
    from kdpipe.pipeline.modes import get_mode

    cols = m.bytes_per_token_by_column
    kinds = {"hidden": ("hidden",), "hidden_layers": ("hidden_layers",), "relation": ("relation",),
             "targets": get_mode(m.targets).columns}
    out = {k: round(sum(cols.get(c, 0.0) for c in v), 3) for k, v in kinds.items() if any(c in cols for c in v)}
    out["inputs"] = round(sum(v for c, v in cols.items() if not any(c in v2 for v2 in kinds.values())), 3)
    if m.hidden_layers:
        out["hidden_per_layer"] = round(out.get("hidden_layers", 0.0) / len(m.hidden_layers), 3)
    if m.relation:  # each part costs the same: what another choice of --relation-parts would take
        out["relation_per_part"] = round(out.get("relation", 0.0) / len(m.relation.parts), 3)
    return dict(sorted(out.items()))


@click.group("cache")  # kdpipe's group (pipeline/cli.py) turns a KdpipeError into one line
def command() -> None:
    """Inspect and check a teacher cache."""


@command.command("verify")
@click.argument("cache_dir")  # a path or a URL (s3://...): a Path would fold its '//'
@click.option("--deep", is_flag=True, help="Also read every shard and check its values: finite, ids below the "
              "vocabulary, positions inside their row, counts consistent, log Z >= logsumexp of the top-k.")
def verify_command(cache_dir: str, deep: bool) -> None:
    """Check every file of a cache against its manifest (sizes, SHA-256, footer fingerprints);
    with --deep, what the shards hold as well."""
    problems = verify(cache_dir, deep)
    for p in problems:
        click.echo(f"CORRUPT {p}", err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in cache {cache_dir}")
    click.echo(f"ok: {cache_dir}")


@command.command("info")
@click.argument("cache_dir")
def info_command(cache_dir: str) -> None:
    """Print what a cache holds and what it was made from."""
    echo_json(info(cache_dir))


@command.command("fidelity", epilog="Example: kdpipe cache fidelity caches/wiki --teacher ./bert-mlm "
                 "--k 8,32,128 --samples 8,32,128 --temperatures 1,2,4 --out fidelity.json")
@click.argument("cache_dir")
@click.option("--teacher", required=True, help="The cache's teacher (its weights are checked).")
@click.option("--student", help="A student model folder or student-train run directory. "
              "[the DistilBERT-init student: half the teacher's layers, copied from it]")
@click.option("--positions", type=int, default=2000, show_default=True,
              help="Target positions to sample (whole rows: a few more).")
@click.option("--k", "ks", callback=ints_option, default="8,32,128", show_default=True,
              help="Top-k sizes to compare.")
@click.option("--samples", callback=ints_option, default="8,32,128", show_default=True,
              help="Draws per position of the sampled mode to compare.")
@click.option("--temperatures", callback=floats_option, default="1,2,4", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Which rows are sampled.")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Write the report as JSON.")
def fidelity_command(cache_dir: str, teacher: str, student: str | None, positions: int, ks: list[int],
                     samples: list[int], temperatures: list[float], seed: int, device: str,
                     out: Path | None) -> None:
    """Compare L_ce of each target mode (topk k, sampled N, exact) with the exact full-vocabulary
    KL on positions of CACHE_DIR: loss error, gradient angle and norm, bytes per token."""
    from kdpipe.pipeline.fidelity import FidelitySpec, markdown, run_fidelity

    spec = FidelitySpec(positions=positions, ks=tuple(ks), samples=tuple(samples),
                        temperatures=tuple(temperatures), seed=seed, device=device)
    with storage.local_cache(cache_dir) as local:  # a cache on a store: the shards it samples are fetched
        report = run_fidelity(local, teacher, student, spec)
    if storage.is_url(cache_dir):
        report["cache"] = cache_dir
    if out is not None:
        atomic_write_json(out, report)
    click.echo(markdown(report))
