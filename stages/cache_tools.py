"""`kdpipe cache verify|info`: check a cache against its manifest; say what it holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kdpipe.pipeline.cache import Problem, load_manifest, verify_cache
from kdpipe.pipeline.cli import LazyGroup, echo_json


def verify(cache_dir: Path) -> list[Problem]:
    _, problems = verify_cache(Path(cache_dir))
    return problems


def info(cache_dir: Path) -> dict[str, Any]:
    m = load_manifest(Path(cache_dir))
    return {
        "cache": str(cache_dir), "schema_version": m.schema_version,
        "fingerprint_sha256": m.fingerprint_sha256, "fingerprint": m.fingerprint,
        "shards": len(m.shards), "sequences": m.sequences, "rows": m.rows, "tokens": m.tokens,
        "bytes": m.bytes, "bytes_per_token": m.bytes_per_token,
        "bytes_per_token_by_column": m.bytes_per_token_by_column,
        "targets": m.targets, "target_positions": m.target_positions, "top_k": m.top_k,
        "temperatures": m.temperatures, "samples": m.samples, "state_dim": m.state_dim,
        "hidden_dim": m.hidden_dim,
        "created_at": m.created_at, "finished_at": m.finished_at,
    }


@click.group("cache", cls=LazyGroup)
def command() -> None:
    """Inspect and check a teacher cache."""


@command.command("verify")
@click.argument("cache_dir", type=click.Path(path_type=Path))
def verify_command(cache_dir: Path) -> None:
    """Check every file of a cache against its manifest (sizes and SHA-256)."""
    problems = verify(cache_dir)
    for p in problems:
        click.echo(f"CORRUPT {p}", err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in cache {cache_dir}")
    click.echo(f"ok: {cache_dir}")


@command.command("info")
@click.argument("cache_dir", type=click.Path(path_type=Path))
def info_command(cache_dir: Path) -> None:
    """Print what a cache holds and what it was made from."""
    echo_json(info(cache_dir))
