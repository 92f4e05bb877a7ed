"""Every bad input gives a clear error, ``<what> (<where>): <what to do>``, naming the file and line
(or the flag), raised before any output is left behind; with skip_bad the same inputs are skipped
and counted. The CLI turns each into one stderr line and exit 2, never a traceback."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.build import BuildOptions, build_shards
from data_prep.errors import BadInputError, DataPrepError
from data_prep.tokenizer import load_tokenizer

GOOD = [f"word{i % 7} text{i % 5} more{i % 3} lines of plain words here" for i in range(60)]


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def good_lines(n: int = 60) -> bytes:
    return ("\n".join(GOOD[:n]) + "\n").encode()


def good_jsonl(n: int = 60) -> list[bytes]:
    return [json.dumps({"text": t}).encode() for t in GOOD[:n]]


def jsonl_with(line5: bytes) -> bytes:
    lines = good_jsonl()
    lines[4] = line5
    return b"\n".join(lines) + b"\n"


def err(what: str, where: str) -> str:
    """The pattern of an error ``<what> (<where>): <what to do>``: ``where`` ends the parenthesis
    (after the tmp dir), and something to do follows."""
    return rf"^{what}.* \([^()]*{where}\): \S"


def truncated_gzip() -> bytes:
    blob = gzip.compress(("\n".join(GOOD * 200) + "\n").encode())
    return blob[: len(blob) // 2]


# (name, file name, content, expected message pattern, skip reason or None for a file error)
CASES = [
    ("invalid JSON", "a.jsonl", jsonl_with(b'{"text": "unterminated'), err("invalid JSON", r"a\.jsonl:5"), "invalid_json"),
    ("missing field", "a.jsonl", jsonl_with(b'{"body": "x"}'), err("no field 'text'", r"a\.jsonl:5"), "missing_field"),
    ("not a string", "a.jsonl", jsonl_with(b'{"text": null}'), err("field 'text' is NoneType", r"a\.jsonl:5"), "not_a_string"),
    ("not an object", "a.jsonl", jsonl_with(b'["text"]'), err("a JSON list", r"a\.jsonl:5"), "not_an_object"),
    ("undecodable jsonl", "a.jsonl", jsonl_with(b'{"text": "caf\xe9"}'), err("bytes are not valid UTF-8", r"a\.jsonl:5"), "undecodable"),
    ("undecodable text", "a.txt", good_lines(4) + b"bad \xff\xfe bytes\n" + good_lines(), err("bytes are not valid UTF-8", r"a\.txt:5"), "undecodable"),
    ("undecodable csv", "a.csv", b"id,text\n1,ok\n2,\"two\nlines\"\n3,caf\xe9\n" + b"".join(b"9,%s\n" % t.encode() for t in GOOD), err("bytes are not valid UTF-8", r"a\.csv:5"), "undecodable"),
    ("csv short row", "a.csv", b"id,text\n1,ok\n2,fine\n3,good\n4\n" + b"".join(b"9,%s\n" % t.encode() for t in GOOD), err("row has no column 'text'", r"a\.csv:5"), "missing_field"),
    ("nul bytes in csv", "a.csv", b"id,text\n1,ok\n2,fine\n3,good\n4,a\x00b\n" + b"".join(b"9,%s\n" % t.encode() for t in GOOD), err(r"binary data \(NUL bytes\)", r"a\.csv:5"), "binary"),
    ("not gzip", "a.txt.gz", b"this is not gzip data", err("not gzip data", r"a\.txt\.gz"), None),
    ("truncated gzip", "a.txt.gz", truncated_gzip(), err("read error", r"a\.txt\.gz:\d+"), None),
    ("utf-16", "a.txt", "\n".join(GOOD).encode("utf-16"), err("UTF-16 or UTF-32 text", r"a\.txt:1"), None),
    ("csv without the column", "a.csv", b"id,body\n1,hello\n", err("no column 'text'", r"a\.csv:1"), None),
    ("not parquet", "a.parquet", b"PAR1 garbage", err("cannot read as Parquet", r"a\.parquet"), None),
]


@pytest.mark.parametrize("name,fname,data,pattern,reason", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_file_and_line(tmp_path, name, fname, data, pattern, reason):
    src = write(tmp_path / fname, data)
    out = tmp_path / "out"
    with pytest.raises(BadInputError, match=pattern):
        build_shards([src], str(out), BuildOptions(seq_len=16, vocab_size=60))
    assert not out.exists()  # nothing half-written is left behind


@pytest.mark.parametrize("name,fname,data,pattern,reason", CASES, ids=[c[0] for c in CASES])
def test_skip_bad_skips_and_counts(tmp_path, name, fname, data, pattern, reason):
    src = write(tmp_path / fname, data)
    ok = write(tmp_path / "ok.txt", good_lines())
    m = build_shards([src, ok], str(tmp_path / "out"), BuildOptions(seq_len=16, vocab_size=60, skip_bad=True))
    s = next(s for s in m["sources"] if s["path"] == src)
    d = s["documents"]
    assert d["in"] == d["kept"] + d["skipped"]
    if reason is None:  # the file (or its rest) could not be read: recorded, not hidden
        assert s["error"] and Path(src).name in s["error"]
    else:
        assert d["skipped_by_reason"] == {reason: 1} and s["error"] is None
    assert m["documents"]["skipped"] == d["skipped"]


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc")
def test_unreadable_file(tmp_path):
    src = tmp_path / "io_error.txt"  # opens, then every read fails with EIO (even as root)
    src.symlink_to("/proc/self/mem")
    with pytest.raises(BadInputError, match=err("read error", r"io_error\.txt:1")):
        build_shards([str(src)], str(tmp_path / "out"), BuildOptions(seq_len=16, vocab_size=60))
    assert not (tmp_path / "out").exists()
    ok = write(tmp_path / "ok.txt", good_lines())
    m = build_shards([str(src), ok], str(tmp_path / "out"), BuildOptions(seq_len=16, vocab_size=60, skip_bad=True))
    bad = next(s for s in m["sources"] if s["path"] == str(src))
    assert "io_error.txt" in bad["error"] and bad["documents"]["in"] == 0 and bad["sha256"] is None
    assert m["documents"]["kept"] == 60


@pytest.mark.parametrize("kwargs,pattern", [
    ({"seq_len": 4}, r"too small.* \(--seq-len 4\): pass --seq-len 8 or more"),
    ({"seq_len": 16, "vocab_size": 8}, r"too small.* \(--vocab-size 8\): pass --vocab-size 32 or more"),
    ({"seq_len": 16, "vocab_size": 60, "tokenizer_dir": "x"}, r"\(--vocab-size/--tokenizer\): give exactly one"),
    ({"seq_len": 16}, r"\(--vocab-size/--tokenizer\): give exactly one"),
    ({"seq_len": 16, "vocab_size": 60, "val_fraction": 1.0}, r"\(--val-fraction 1\.0\): "),
    ({"seq_len": 16, "vocab_size": 60, "workers": 0}, r"\(--workers 0\): pass --workers 1"),
    ({"seq_len": 16, "vocab_size": 60, "part": 2, "parts": 2}, r"\(--part 2 --parts 2\): "),
    ({"seq_len": 16, "vocab_size": 60, "parts": 2}, r"shared tokenizer \(--parts 2\): train it once"),
    ({"seq_len": 16, "vocab_size": 60, "doc_separator": "para"}, r"'para' \(--doc-separator\): use one of"),
    ({"seq_len": 16, "vocab_size": 60, "samples_per_shard": 0}, r"\(--samples-per-shard 0\): "),
    ({"seq_len": 16, "vocab_size": 60, "max_shard_bytes": 1000}, r"\(--max-shard-bytes 1000\): pass --max-shard-bytes \d+"),
])
def test_bad_flags(tmp_path, kwargs, pattern):
    src = write(tmp_path / "a.txt", good_lines())
    with pytest.raises(DataPrepError, match=pattern):
        build_shards([src], str(tmp_path / "out"), BuildOptions(**kwargs))
    assert not (tmp_path / "out").exists()


def test_empty_corpus(tmp_path):
    src = write(tmp_path / "empty.txt", b"\n   \n\n")
    with pytest.raises(DataPrepError, match=err("empty corpus", r"empty\.txt")):
        build_shards([src], str(tmp_path / "out"), BuildOptions(seq_len=16, vocab_size=60))
    src = write(tmp_path / "blank.jsonl", b'{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(DataPrepError, match=err("empty corpus", r"blank\.jsonl")):
        build_shards([src], str(tmp_path / "out"), BuildOptions(seq_len=16, tokenizer_dir=_tokenizer(tmp_path)))


def test_corpus_too_small_for_seq_len(tmp_path):
    src = write(tmp_path / "short.txt", b"one tiny document\n")
    with pytest.raises(DataPrepError, match=err("corpus too small", "--seq-len 512")):
        build_shards([src], str(tmp_path / "out"), BuildOptions(seq_len=512, tokenizer_dir=_tokenizer(tmp_path)))
    assert not (tmp_path / "out").exists()


def test_missing_inputs(tmp_path):
    with pytest.raises(BadInputError, match=err("no such file", r"nope\.txt")):
        build_shards([str(tmp_path / "nope.txt")], str(tmp_path / "out"), BuildOptions(seq_len=16, vocab_size=60))
    with pytest.raises(DataPrepError, match=err("no files match", r"--input .*\*\.jsonl")):
        build_shards([str(tmp_path / "*.jsonl")], str(tmp_path / "out"), BuildOptions(seq_len=16, vocab_size=60))
    src = write(tmp_path / "a.docx", b"x")
    with pytest.raises(DataPrepError, match=err("cannot tell the format", r"a\.docx")):
        build_shards([src], str(tmp_path / "out"), BuildOptions(seq_len=16, vocab_size=60))


def test_output_dir_not_empty(tmp_path):
    src = write(tmp_path / "a.txt", good_lines())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("someone else's file")
    with pytest.raises(DataPrepError, match=err(r"output directory is not empty \(notes\.md\)", "--out .*out")):
        build_shards([src], str(out), BuildOptions(seq_len=16, vocab_size=60))
    assert os.listdir(out) == ["notes.md"]


def _tokenizer(tmp_path: Path) -> str:
    d = tmp_path / "tok"
    if not d.exists():
        from data_prep.tokenizer import check_tokenizer, save_tokenizer, train_wordpiece

        save_tokenizer(check_tokenizer(train_wordpiece(GOOD, 60), "trained"), str(d))
    return str(d)


def test_tiny_vocab_tokenizer_is_refused(tmp_path):
    from transformers import BertTokenizerFast

    good = _tokenizer(tmp_path)
    assert load_tokenizer(good).vocab_size >= 32
    trap = BertTokenizerFast(vocab_file=os.path.join(good, "vocab.txt"))  # the STACK_NOTES trap
    bad = tmp_path / "trap"
    trap.save_pretrained(str(bad))
    with pytest.raises(DataPrepError, match=r"only \d+ tokens"):
        load_tokenizer(str(bad))
    # a vocab.txt that disagrees with the tokenizer it sits beside
    mixed = tmp_path / "mixed"
    shutil.copytree(good, mixed)
    (mixed / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(40)) + "\n")
    with pytest.raises(DataPrepError, match=r"tokens but its vocab\.txt has 40"):
        build_shards([write(tmp_path / "a.txt", good_lines())], str(tmp_path / "out"),
                     BuildOptions(seq_len=16, tokenizer_dir=str(mixed)))
    with pytest.raises(DataPrepError, match=err("no such directory", "nowhere")):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_cli_reports_errors_with_exit_code_2(tmp_path):
    src = write(tmp_path / "a.jsonl", jsonl_with(b"{oops"))
    res = subprocess.run([sys.executable, "-m", "data_prep", "-q", "build", "--input", src,
                          "--out", str(tmp_path / "out"), "--seq-len", "16", "--vocab-size", "60"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 2
    assert re.fullmatch(r"error: invalid JSON.* \([^()]*a\.jsonl:5\): .*--skip-bad.*\n", res.stderr), res.stderr
    assert "Traceback" not in res.stderr


def test_nul_bytes_are_reported_as_binary_data_not_as_an_encoding_problem(tmp_path):
    """A text input holding NUL bytes is binary data, and the message says so with file and line.

    Written before the fix and seen failing on the old code: a .txt whose line 5 holds NUL bytes
    (otherwise valid UTF-8) was built without a word, the NULs going in as text; a gzip file named
    .txt was reported as "bytes are not valid UTF-8" (an encoding problem, which it is not)."""
    nul = write(tmp_path / "a.txt", good_lines(4) + b"abc\x00\x00def\n" + good_lines())
    with pytest.raises(BadInputError, match=r"^binary data \(NUL bytes\), not text \(.*a\.txt:5\): "
                                            r".*--skip-bad") as exc:
        build_shards([nul], str(tmp_path / "out"), BuildOptions(seq_len=16, vocab_size=60))
    assert (exc.value.path, exc.value.line) == (nul, 5)
    gz = write(tmp_path / "b.txt", gzip.compress(good_lines()))
    with pytest.raises(BadInputError, match=r"^binary data \(NUL bytes\), not text \(.*b\.txt:1\): "):
        build_shards([gz], str(tmp_path / "out"), BuildOptions(seq_len=16, vocab_size=60))
    ok = write(tmp_path / "ok.txt", good_lines())
    m = build_shards([nul, ok], str(tmp_path / "out"), BuildOptions(seq_len=16, vocab_size=60, skip_bad=True))
    assert next(s for s in m["sources"] if s["path"] == nul)["documents"]["skipped_by_reason"] == {"binary": 1}


@pytest.mark.parametrize("target", ["file", "dir"])
def test_inspect_of_something_else_says_it_is_not_an_output_dir(tmp_path, capsys, target):
    """`inspect` given a text file or a directory without manifest.json says it is not a data_prep
    output directory and what to pass instead.

    Written before the fix and seen failing on the old code: `inspect README.md` said
    "README.md: invalid JSON at line 1: Expecting value", as if a manifest were damaged."""
    from data_prep.cli import main

    path = tmp_path / "README.md"
    if target == "file":
        path.write_text("# A project\n\nSome text.\n")
    else:
        path.mkdir()
        (path / "notes.txt").write_text("x")
    assert main(["-q", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid JSON" not in err
    kind = "a file" if target == "file" else "no manifest.json"
    assert re.fullmatch(rf"error: not a data_prep output directory \({kind}\) \({re.escape(str(path))}\): "
                        r"pass the --out directory of .+\n", err), err


def test_error_form_and_attributes():
    """``str(err)`` is exactly ``<what> (<where>): <what to do>`` on one line; the parts stay
    attributes (BadInputError keeps path, line, reason) and survive pickling (worker processes)."""
    import pickle

    e = BadInputError("a.txt", 3, "bytes are not valid UTF-8", "re-encode it")
    assert str(e) == "bytes are not valid UTF-8 (a.txt:3): re-encode it"
    assert (e.path, e.line, e.reason, e.where, e.fix) == ("a.txt", 3, "bytes are not valid UTF-8", "a.txt:3",
                                                          "re-encode it")
    assert e.problem == "bytes are not valid UTF-8 (a.txt:3)"
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is BadInputError and str(back) == str(e) and back.line == 3
    multi = DataPrepError("cannot load:\n  line one\n  line two", where="tok", fix="pass\nanother")
    assert str(multi) == "cannot load: line one line two (tok): pass another"


REPO = Path(__file__).resolve().parent.parent
ONE_LINE = re.compile(r"error: .+ \(([^()]+)\): .+")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", "-q", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_cli_bad_inputs_give_one_line_and_exit_2(tmp_path):
    """A handful of bad inputs, flags and environments through the real CLI: each exits 2 with
    exactly one stderr line ``error: <what> (<where>): <what to do>`` naming the file or flag, no
    traceback (exit 1 is kept for bugs)."""
    nul = write(tmp_path / "nul.txt", good_lines(4) + b"a\x00b\n" + good_lines())
    latin1 = write(tmp_path / "latin1.txt", "café au lait\n".encode("latin-1") * 60)
    ok = write(tmp_path / "ok.txt", good_lines())
    bad_manifest = tmp_path / "shards"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.json").write_bytes(b"\xff\xfe not json")
    build = ["build", "--seq-len", "16", "--vocab-size", "60"]
    cases = [  # (args, what the error must name, and where: in the parenthesis or anywhere in the line)
        ([*build, "-i", nul, "-o", str(tmp_path / "o1")], f"{nul}:5", "where"),
        ([*build, "-i", latin1, "-o", str(tmp_path / "o2")], f"{latin1}:1", "where"),
        ([*build, "-i", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o3")], "missing.txt", "where"),
        ([*build, "-i", str(tmp_path), "--format", "text", "-o", str(tmp_path / "o4")], str(tmp_path), "where"),
        ([*build, "-i", ok, "-o", f"{ok}/sub"], f"--out {ok}/sub", "where"),
        (["build", "--seq-len", "4", "--vocab-size", "60", "-i", ok, "-o", str(tmp_path / "o5")], "--seq-len 4", "where"),
        (["build", "--seq-len", "x", "--vocab-size", "60", "-i", ok, "-o", str(tmp_path / "o6")], "--seq-len", "line"),
        (["inspect", str(REPO / "README.md")], str(REPO / "README.md"), "where"),
        (["inspect", str(bad_manifest)], str(bad_manifest / "manifest.json"), "where"),
        (["merge", ok], ok, "where"),
        (["tokenizer", "-i", ok, "-o", ok, "--vocab-size", "60"], f"--out {ok}", "where"),
    ]
    if os.path.isdir("/proc/self"):  # a path that cannot be created, even as root
        cases.append(([*build, "-i", ok, "-o", "/proc/self/data_prep_out"], "--out /proc/self/data_prep_out", "where"))
    for args, named, part in cases:
        res = _cli(*args)
        line = res.stderr
        assert res.returncode == 2, (args, res.returncode, res.stderr)
        assert "Traceback" not in line, (args, line)
        assert line.count("\n") == 1 and line.startswith("error: "), (args, line)
        m = ONE_LINE.fullmatch(line.rstrip("\n"))
        assert m, (args, line)
        assert named in (m.group(1) if part == "where" else line), (args, named, line)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))  # nothing left behind
