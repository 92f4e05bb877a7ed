"""data_prep end to end on tiny generated corpora: round trip, determinism, split stability,
counts, input formats, parts + merge, crash leftovers, inspect --verify, tar member checks."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_prep.build import BuildOptions, ValSplit, build_shards, train_tokenizer
from data_prep.errors import DataPrepError, UnsafeTarError
from data_prep.inspect import inspect_dir, verify_shards
from data_prep.merge import merge_parts
from data_prep.shards import iter_tar_samples

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "tu", "ve", "ra", "si", "po") for b in "ntslrm"]


def docs(n: int, seed: int, lo: int = 3, hi: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(lo, hi))) for _ in range(n)]


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return str(path)


def rows_of(out: Path, split: str) -> list[list[int]]:
    m = json.loads((out / "manifest.json").read_text())
    rows = []
    for rec in m["shards"]:
        if rec["split"] == split:
            rows += [ids.tolist() for _, ids in iter_tar_samples(str(out / rec["name"]))]
    return rows


def reference_rows(doc_ids: list[list[int]], seq_len: int, cls: int, sep: int) -> tuple[list, int]:
    """The packing rule, written out plainly: d1 [SEP] d2 ..., bodies never start with [SEP]."""
    stream: list[int] = []
    for ids in doc_ids:
        if ids:
            stream += ([sep] if stream else []) + ids
    rows, pos, body = [], 0, seq_len - 2
    while True:
        if pos < len(stream) and stream[pos] == sep:
            pos += 1
        if len(stream) - pos < body:
            return rows, len(stream) - pos
        rows.append([cls] + stream[pos:pos + body] + [sep])
        pos += body


def sha_tree(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    return {"root": root,
            "txt": write_lines(root / "a.txt", docs(150, 1)),
            "jsonl": write_jsonl(root / "b.jsonl", docs(120, 2))}


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "shards"
    build_shards([corpus["jsonl"], corpus["txt"]], str(out), BuildOptions(seq_len=32, vocab_size=200,
                 val_fraction=0.2, samples_per_shard=20))
    return out


def test_token_stream_equals_tokenized_input(corpus, built):
    from transformers import AutoTokenizer

    m = json.loads((built / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(built / "tokenizer"))
    assert len(tok) == m["vocab_size"] and m["dtype"] == "uint16"
    sp = m["tokenizer"]["special_ids"]
    assert sp == {"pad": tok.pad_token_id, "unk": tok.unk_token_id, "cls": tok.cls_token_id,
                  "sep": tok.sep_token_id, "mask": tok.mask_token_id}
    is_val = ValSplit(0.2, 0)
    sources = {corpus["txt"]: Path(corpus["txt"]).read_text().splitlines(),
               corpus["jsonl"]: [json.loads(x)["text"] for x in Path(corpus["jsonl"]).read_text().splitlines()]}
    for split in ("train", "val"):
        expected, remainder = [], 0
        for path in sorted(sources):  # sources are packed in sorted path order
            texts = [t for t in sources[path] if is_val(t) == (split == "val")]
            ids = tok(texts, add_special_tokens=False)["input_ids"]
            rows, rest = reference_rows(ids, 32, sp["cls"], sp["sep"])
            expected += rows
            remainder += rest
        got = rows_of(built, split)
        assert got == expected and len(got) > 0
        assert m["splits"][split]["samples"] == len(got)
        assert m["splits"][split]["tokens"] == 32 * len(got)
    assert m["remainder_tokens"] == sum(sum(s["remainder_tokens"].values()) for s in m["sources"])


def test_webdataset_reads_the_contract(built):
    import webdataset as wds

    m = json.loads((built / "manifest.json").read_text())
    urls = [str(built / s["name"]) for s in m["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                        empty_check=False).decode()
    keys = []
    for sample in ds:
        ids = sample["input_ids.npy"]
        assert ids.dtype == np.uint16 and ids.shape == (32,)
        keys.append(sample["__key__"])
    assert len(keys) == len(set(keys)) == sum(s["samples"] for s in m["shards"])
    assert all("." not in k and "/" not in k for k in keys)
    assert [s["name"] for s in m["shards"]][0] == "train-000000.tar"


def test_deterministic_same_sha256_any_worker_count(corpus, built, tmp_path, monkeypatch):
    import data_prep.build

    monkeypatch.setattr(data_prep.build, "BATCH_DOCS", 7)  # many batches in flight at once
    out = tmp_path / "again"
    build_shards([corpus["txt"], corpus["jsonl"]], str(out), BuildOptions(seq_len=32, vocab_size=200,
                 val_fraction=0.2, samples_per_shard=20, workers=2))
    a, b = sha_tree(built), sha_tree(out)
    a.pop("manifest.json"), b.pop("manifest.json")  # the manifest records the flags (workers)
    assert a == b and any(k.endswith(".tar") for k in a)
    ma = json.loads((built / "manifest.json").read_text())
    mb = json.loads((out / "manifest.json").read_text())
    assert ma["shards"] == mb["shards"] and ma["tokenizer"] == mb["tokenizer"]


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> str:
    """A tokenizer where every word of WORDS is one token, for exact-fill documents."""
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz")
    wp = BertWordPieceTokenizer({t: i for i, t in enumerate(vocab)}, lowercase=True)
    hf = BertTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", sep_token="[SEP]",
                           pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    out = tmp_path_factory.mktemp("wordtok") / "tok"
    hf.save_pretrained(str(out))
    return str(out)


def test_split_stable_under_input_reordering(tmp_path, word_tokenizer):
    # Every document is exactly seq_len - 2 tokens, so each row holds exactly one document and
    # the rows of a split are its documents: reordering must give the same sets.
    texts = docs(300, 7, lo=14, hi=14)
    a = [write_lines(tmp_path / "x.txt", texts[:150]), write_lines(tmp_path / "y.txt", texts[150:])]
    rng = random.Random(3)
    shuffled = texts[:]
    rng.shuffle(shuffled)
    b = [write_lines(tmp_path / "p.txt", shuffled[:100]), write_lines(tmp_path / "q.txt", shuffled[100:200]),
         write_lines(tmp_path / "r.txt", shuffled[200:])]
    kw = dict(seq_len=16, tokenizer_dir=word_tokenizer, val_fraction=0.3, samples_per_shard=1000)
    ma = build_shards(a, str(tmp_path / "A"), BuildOptions(**kw))
    mb = build_shards(b[::-1], str(tmp_path / "B"), BuildOptions(**kw))
    assert ma["remainder_tokens"] == mb["remainder_tokens"] == 0
    for split in ("train", "val"):
        ra, rb = rows_of(tmp_path / "A", split), rows_of(tmp_path / "B", split)
        assert len(ra) == ma["splits"][split]["samples"] > 20
        assert sorted(ra) == sorted(rb) and ra != rb  # same documents, packed in another order


def test_counts_add_up_with_skipped_documents(tmp_path):
    good = docs(60, 4)
    lines = [json.dumps({"text": t}) for t in good]
    lines[3] = "{not json"
    lines[7] = json.dumps({"body": "no text field"})
    lines[9] = json.dumps({"text": ""})
    lines[11] = json.dumps({"text": 42})
    lines[13] = json.dumps({"text": "\u200b\x01"})  # not blank, but no tokens after BERT cleaning
    lines.insert(20, "")  # a blank line is not a document
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    txt = write_lines(tmp_path / "plain.txt", docs(40, 5))
    m = build_shards([str(src), txt], str(tmp_path / "out"), BuildOptions(seq_len=24, vocab_size=150,
                     val_fraction=0.25, skip_bad=True, samples_per_shard=7))
    by = {Path(s["path"]).name: s for s in m["sources"]}
    d = by["mixed.jsonl"]["documents"]
    assert d["in"] == 61 and d["skipped"] == 6 and d["kept"] == 55
    assert d["skipped_by_reason"] == {"empty": 1, "invalid_json": 1, "missing_field": 1,
                                      "no_tokens": 1, "not_a_string": 1, "undecodable": 1}
    assert by["plain.txt"]["documents"] == {"in": 40, "kept": 40, "skipped": 0, "skipped_by_reason": {}}
    for s in m["sources"]:
        assert s["documents"]["in"] == s["documents"]["kept"] + s["documents"]["skipped"]
        assert sum(s["split_documents"].values()) == s["documents"]["kept"]
    assert m["documents"] == {"in": 101, "kept": 95, "skipped": 6,
                              "skipped_by_reason": d["skipped_by_reason"]}
    for split in ("train", "val"):
        shards = [s for s in m["shards"] if s["split"] == split]
        assert all(s["samples"] <= 7 for s in shards)
        assert sum(s["samples"] for s in shards) == m["splits"][split]["samples"] == \
            sum(s["samples"][split] for s in m["sources"])
    assert m["content_tokens"] == sum(s["tokens"] for s in m["sources"]) > 0


def test_every_input_format(tmp_path):
    import datasets
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = docs(40, 9)
    paths = [write_lines(tmp_path / "lines.txt", texts[:10])]
    (tmp_path / "paras.txt").write_text("\n\n".join(f"{t}\n{t}" for t in texts[10:15]) + "\n")
    paths.append(str(tmp_path / "paras.txt"))
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"content": t}) + "\n" for t in texts[15:22])
    paths.append(str(tmp_path / "z.jsonl.gz"))
    (tmp_path / "t.csv").write_text('id,body\n1,"multi\nline, quoted ""doc"""\n'
                                    + "".join(f"{i},{t}\n" for i, t in enumerate(texts[22:28])))
    paths.append(str(tmp_path / "t.csv"))
    pq.write_table(pa.table({"body": texts[28:34]}), tmp_path / "p.parquet")
    paths.append(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_dict({"body": texts[34:40]}).save_to_disk(str(tmp_path / "hfds"))
    paths.append(str(tmp_path / "hfds"))
    common = dict(seq_len=16, vocab_size=100, val_fraction=0.0, doc_separator="blank")
    m = build_shards(paths[1:3], str(tmp_path / "o1"), BuildOptions(text_field="content", **common))
    m2 = build_shards(paths[3:], str(tmp_path / "o2"), BuildOptions(text_column="body", **common))
    m3 = build_shards(paths[:1], str(tmp_path / "o3"), BuildOptions(**{**common, "doc_separator": "line"}))
    got = {Path(s["path"]).name: (s["format"], s["documents"]["kept"])
           for mm in (m, m2, m3) for s in mm["sources"]}
    assert got == {"paras.txt": ("text", 5), "z.jsonl.gz": ("jsonl", 7), "t.csv": ("csv", 7),
                   "p.parquet": ("parquet", 6), "hfds": ("hf_dataset", 6), "lines.txt": ("text", 10)}
    assert m2["splits"]["val"]["samples"] == 0 and m2["splits"]["train"]["samples"] > 0


def test_parts_and_merge_hold_the_same_samples(tmp_path):
    files = [write_lines(tmp_path / f"f{i}.txt", docs(60, 20 + i)) for i in range(5)]
    tok = tmp_path / "tok"
    train_tokenizer(files, str(tok), vocab_size=150)
    kw = dict(seq_len=24, tokenizer_dir=str(tok), val_fraction=0.2, samples_per_shard=10)
    single = build_shards(files, str(tmp_path / "one"), BuildOptions(**kw))
    parted = tmp_path / "parted"
    for part in (2, 0, 1):  # any order, as a Slurm array would
        build_shards(files, str(parted), BuildOptions(part=part, parts=3, **kw))
    with pytest.raises(DataPrepError, match="not empty"):
        build_shards(files, str(parted), BuildOptions(part=1, parts=3, **kw))  # part 1 is already there
    merged = merge_parts(str(parted))
    names = [s["name"] for s in merged["shards"]]
    assert len(names) == len(set(names)) and all(n.startswith(("train-0000", "val-0000")) for n in names)
    for split in ("train", "val"):
        assert sorted(rows_of(tmp_path / "one", split)) == sorted(rows_of(parted, split))
        assert merged["splits"][split]["samples"] == single["splits"][split]["samples"]
    for k in ("documents", "content_tokens", "remainder_tokens", "vocab_size", "tokenizer"):
        assert merged[k] == single[k]
    assert verify_shards(str(parted)) == []


def test_merge_refuses_a_missing_part_and_takes_an_empty_one(tmp_path):
    files = [write_lines(tmp_path / f"f{i}.txt", docs(40, i)) for i in range(2)]
    tok = tmp_path / "tok"
    train_tokenizer(files, str(tok), vocab_size=100)
    kw = dict(seq_len=16, tokenizer_dir=str(tok), parts=3)
    (tmp_path / "p" / ".tokenizer.tmp-99999").mkdir(parents=True)  # another part placing it now
    build_shards(files, str(tmp_path / "p"), BuildOptions(part=0, **kw))
    empty = build_shards(files, str(tmp_path / "p"), BuildOptions(part=2, **kw))  # 2 files, 3 parts: no files
    assert empty["shards"] == [] and empty["documents"]["in"] == 0
    with pytest.raises(DataPrepError, match=r"missing \[1\]"):
        merge_parts(str(tmp_path / "p"))
    build_shards(files, str(tmp_path / "p"), BuildOptions(part=1, **kw))
    merged = merge_parts(str(tmp_path / "p"))
    assert merged["documents"]["in"] == 80 and len(merged["sources"]) == 2


def test_rerun_after_crash_restarts_cleanly(corpus, built, tmp_path):
    out = tmp_path / "crashed"
    out.mkdir()
    (out / ".incomplete").write_text("")  # what a killed build leaves behind, with:
    (out / "train-000000.tar").write_bytes(b"stale complete shard")
    (out / "train-000099.tar").write_bytes(b"a shard this build will not write again")
    (out / "val-000003.tar.tmp").write_bytes(b"half written")
    (out / ".tokenizer.tmp-12345").mkdir()
    build_shards([corpus["txt"], corpus["jsonl"]], str(out), BuildOptions(seq_len=32, vocab_size=200,
                 val_fraction=0.2, samples_per_shard=20))
    assert sha_tree(out) == sha_tree(built)
    with pytest.raises(DataPrepError, match="not empty"):  # a finished build is never overwritten
        build_shards([corpus["txt"]], str(out), BuildOptions(seq_len=32, vocab_size=200))


def test_inspect_verify_catches_a_corrupted_shard(built, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built, out)
    buf = io.StringIO()
    assert inspect_dir(str(out), samples=2, verify=True, out=buf)
    assert "[CLS]" in buf.getvalue() and "all match the manifest" in buf.getvalue()
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01  # one bit inside a sample's token ids
    shard.write_bytes(bytes(data))
    problems = verify_shards(str(out))
    assert problems == ["train-000001.tar: sha256 differs from the manifest (corrupt or replaced)"]
    (out / "val-000000.tar").write_bytes(data[:3000])  # truncated
    assert any(p.startswith("val-000000.tar") for p in verify_shards(str(out)))
    assert not inspect_dir(str(out), samples=0, verify=True, out=io.StringIO())


def _tar_with(path: Path, name: str, kind: bytes = tarfile.REGTYPE) -> None:
    payload = io.BytesIO()
    np.save(payload, np.arange(8, dtype=np.uint16), allow_pickle=False)
    with tarfile.open(path, "w") as tf:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        if kind == tarfile.SYMTYPE:
            ti.linkname = "/etc/passwd"
        else:
            ti.size = len(payload.getvalue())
        tf.addfile(ti, io.BytesIO(payload.getvalue()) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("name,kind", [("../evil.input_ids.npy", tarfile.REGTYPE),
                                       ("/abs/evil.input_ids.npy", tarfile.REGTYPE),
                                       ("a/../../evil.input_ids.npy", tarfile.REGTYPE),
                                       ("link.input_ids.npy", tarfile.SYMTYPE)])
def test_tar_members_with_unsafe_names_are_refused(tmp_path, built, name, kind):
    bad = tmp_path / "bad.tar"
    _tar_with(bad, name, kind)
    with pytest.raises(UnsafeTarError):
        list(iter_tar_samples(str(bad)))
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built, out)
    shutil.copy(bad, out / "val-000000.tar")
    assert any("unsafe" in p or "not a regular file" in p for p in verify_shards(str(out)))


def test_pickled_npy_member_is_refused(tmp_path):
    bad = tmp_path / "pickle.tar"
    payload = io.BytesIO()
    np.save(payload, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with tarfile.open(bad, "w") as tf:
        ti = tarfile.TarInfo("k-000000.input_ids.npy")
        ti.size = len(payload.getvalue())
        tf.addfile(ti, io.BytesIO(payload.getvalue()))
    with pytest.raises(DataPrepError, match="not a valid .npy"):
        list(iter_tar_samples(str(bad)))


def test_shard_bounds_in_bytes(corpus, tmp_path):
    m = build_shards([corpus["txt"]], str(tmp_path / "o"), BuildOptions(seq_len=32, vocab_size=200,
                     val_fraction=0.0, max_shard_bytes=30_000))
    assert len(m["shards"]) > 2
    for s in m["shards"]:
        assert s["bytes"] == os.path.getsize(tmp_path / "o" / s["name"]) <= 30_000
    counts = collections.Counter(s["samples"] for s in m["shards"][:-1])
    assert len(counts) == 1  # every full shard holds the same number of samples


def test_special_token_text_in_documents_stays_text(tmp_path, word_tokenizer):
    src = write_lines(tmp_path / "a.txt", ["kan lon [MASK] min [SEP] tun [CLS] ven [PAD] ran"] * 20)
    m = build_shards([src], str(tmp_path / "o"), BuildOptions(seq_len=16, tokenizer_dir=word_tokenizer,
                     val_fraction=0.0))
    sp = m["tokenizer"]["special_ids"]
    rows = rows_of(tmp_path / "o", "train")
    assert rows and all(r[0] == sp["cls"] and r[-1] == sp["sep"] for r in rows)
    inner = [t for r in rows for t in r[1:-1]]
    assert sp["mask"] not in inner and sp["cls"] not in inner and sp["pad"] not in inner
    assert inner.count(sp["sep"]) <= 20  # only the separators between documents
