"""Shared fixtures: offline, single-threaded, tiny real models and corpora built once per session.

Everything is real: a BERT masked LM built in code and saved as a folder, its tokenizer, text
files, Parquet shards written by `kdpipe teacher-dump` run as a subprocess. Torch runs on one
thread here: on a shared 2-core machine, OpenMP threads of tiny matmuls spin against each other
and make a tiny dump several times slower.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["OMP_NUM_THREADS"] = "1"

sys.path.insert(0, str(Path(__file__).parent))  # `from helpers import ...` under importlib mode

import torch  # noqa: E402

from helpers import tiny_corpus, tiny_teacher  # noqa: E402

torch.set_num_threads(1)

KDPIPE = shutil.which("kdpipe", path=str(Path(sys.executable).parent)) or "kdpipe"

# The settings of the session's reference cache (and of the kill/resume test, which must match
# them to compare bytes): many small shards, temperatures that are not powers of two.
DUMP_ARGS = ("--seq-len", "32", "--shard-size", "2", "--top-k", "8", "--hidden-dim", "16",
             "--temperatures", "1,1.5,3", "--batch-size", "4")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    return env


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def run_kdpipe(*args: str | Path, check: bool = True, timeout: float = 120,
               preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """`kdpipe ARGS` in a real subprocess; `check` asserts exit 0 and shows stderr if not."""
    proc = subprocess.run([KDPIPE, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=_env(), preexec_fn=preexec_fn)
    if check:
        assert proc.returncode == 0, f"kdpipe {args} failed ({proc.returncode}):\n{proc.stderr}"
    return proc


def popen_kdpipe(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen([KDPIPE, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env())


def invoke_kdpipe(*args: str | Path) -> subprocess.CompletedProcess:
    """`kdpipe ARGS` in this process through click's runner (real CLI code, a fraction of a
    subprocess's start-up time); an uncaught exception shows up as a traceback on stderr, as it
    would in a terminal."""
    import traceback

    from click.testing import CliRunner

    from kdpipe.pipeline.cli import cli

    argv = [str(a) for a in args]
    r = CliRunner().invoke(cli, argv, prog_name="kdpipe")
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(["kdpipe", *argv], r.exit_code, r.stdout, stderr)


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `root` (hidden ones included)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, no traceback, one `Error: ...` line on stderr holding every needle."""
    assert proc.returncode != 0, f"expected failure, got exit 0; stdout:\n{proc.stdout}"
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    for n in needles:
        assert n in errors[0], f"{n!r} not in {errors[0]!r}"
    return errors[0]


# ------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT masked LM and its tokenizer, saved as a folder."""
    return tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-bert")


@pytest.fixture(scope="session")
def teacher4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer, hidden-32, 2-head BERT masked LM: layers below the last for the extra targets."""
    return tiny_teacher(tmp_path_factory.mktemp("teacher4") / "bert4", layers=4)


@pytest.fixture(scope="session")
def other_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and tokenizer as `teacher_dir`, other weights."""
    return tiny_teacher(tmp_path_factory.mktemp("teacher2") / "tiny-bert", seed=1)


@pytest.fixture(scope="session")
def tokenizer(teacher_dir: Path):
    from kdpipe.pipeline.teacher import load_tokenizer

    return load_tokenizer(str(teacher_dir))


@pytest.fixture(scope="session")
def teacher_model(teacher_dir: Path) -> torch.nn.Module:
    from kdpipe.pipeline.teacher import load_teacher

    return load_teacher(str(teacher_dir))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 5k words: with DUMP_ARGS, ~170 sequences in ~85 shards."""
    return tiny_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", lines=300)


@pytest.fixture(scope="session")
def small_corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_corpus(tmp_path_factory.mktemp("small-corpus") / "small.txt", lines=40, seed=3)


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path,
                    corpus_file: Path) -> Path:
    """A complete cache written by an uninterrupted `kdpipe teacher-dump` subprocess.

    Read-only for the tests: copy it (`copy_cache`) before changing anything."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    run_kdpipe("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file, "--out", out,
               *DUMP_ARGS)
    return out


@pytest.fixture
def copy_cache(tmp_path: Path, reference_cache: Path) -> Callable[[str], Path]:
    def copy(name: str = "cache") -> Path:
        return Path(shutil.copytree(reference_cache, tmp_path / name))

    return copy


# Plain helpers, handed to test modules as fixtures (test modules do not import conftest).

@pytest.fixture(scope="session")
def kdpipe_cli() -> Callable[..., subprocess.CompletedProcess]:
    return run_kdpipe


@pytest.fixture(scope="session")
def kdpipe_inproc() -> Callable[..., subprocess.CompletedProcess]:
    return invoke_kdpipe


@pytest.fixture(scope="session")
def kdpipe_popen() -> Callable[..., subprocess.Popen]:
    return popen_kdpipe


@pytest.fixture(scope="session")
def digest() -> Callable[[Path], dict[str, str]]:
    return tree_digest


@pytest.fixture(scope="session")
def one_line_error() -> Callable[..., str]:
    return assert_one_line_error


@pytest.fixture(scope="session")
def dump_args() -> tuple[str, ...]:
    return DUMP_ARGS
