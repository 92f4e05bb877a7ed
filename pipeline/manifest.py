"""Reading a data_prep output directory (docs/ARCHITECTURE.md, section 1) with clear errors."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.errors import DataError

REBUILD = "rebuild the shards with python -m data_prep build (docs/DATA_PREP.md)"


class Manifest:
    """The manifest of a shard directory. `location` is a local directory or a URL prefix
    (http(s)://..., or anything webdataset opens) under which the shards and manifest.json lie."""

    def __init__(self, location: str, data: dict[str, Any]) -> None:
        self.location = location.rstrip("/")
        self.path = f"{self.location}/manifest.json"
        self.data = data
        if not isinstance(data, dict):
            raise DataError(f"the manifest is {type(data).__name__}, not a JSON object", self.path, REBUILD)
        for key in ("seq_len", "vocab_size", "shards", "tokenizer"):
            if key not in data:
                raise DataError(f"manifest lacks the key {key!r}", self.path, REBUILD)
        self.seq_len: int = self._positive_int(data, "seq_len")
        self.vocab_size: int = self._positive_int(data, "vocab_size")
        special = data["tokenizer"].get("special_ids", {}) if isinstance(data["tokenizer"], dict) else {}
        missing = {"cls", "sep", "pad", "mask"} - set(special)
        if missing:
            raise DataError(f"tokenizer.special_ids lacks {sorted(missing)}", self.path, REBUILD)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in special.values()):
            raise DataError(f"tokenizer.special_ids has a value that is not a token id: {special!r}", self.path, REBUILD)
        self.special_ids: dict[str, int] = dict(special)
        if not isinstance(data["shards"], list):
            raise DataError("'shards' is not a list", self.path, REBUILD)
        for index, shard in enumerate(data["shards"]):
            ok = (isinstance(shard, dict) and isinstance(shard.get("name"), str)
                  and shard.get("split") in ("train", "val") and isinstance(shard.get("samples"), int)
                  and shard["samples"] >= 0)
            if not ok:
                raise DataError(f"shards[{index}] lacks a name, a split 'train' or 'val' or an integer samples count: "
                                f"{shard!r}", self.path, REBUILD)

    def _positive_int(self, data: dict[str, Any], key: str) -> int:
        value = data[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DataError(f"{key} is not a positive integer: {value!r}", self.path, REBUILD)
        return value

    @classmethod
    def load(cls, location: str) -> "Manifest":
        if "://" in location:
            import urllib.request

            url = f"{location.rstrip('/')}/manifest.json"
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    return cls(location, json.loads(response.read()))
            except (OSError, ValueError) as err:  # URLError, timeouts, not JSON, not UTF-8
                raise DataError(f"cannot read the manifest ({type(err).__name__}: {err})", url,
                                "check the URL and that the server is up, or copy the shards locally") from None
        path = Path(location) / "manifest.json"
        if not Path(location).is_dir():
            raise DataError(f"no such directory: {location}", "data.dir",
                            "build the shards with python -m data_prep build, or point data.dir at them")
        if not path.is_file():
            raise DataError(f"{location} has no manifest.json: not a data_prep output directory", "data.dir",
                            "point data.dir at the --out directory of python -m data_prep build")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"manifest is not valid JSON ({err})", str(path), REBUILD) from None
        manifest = cls(location, data)
        manifest.check_local_shards()
        return manifest

    def shards(self, split: str) -> list[dict[str, Any]]:
        return [s for s in self.data["shards"] if s.get("split") == split]

    def split_samples(self, split: str) -> int:
        return sum(int(s["samples"]) for s in self.shards(split))

    def url(self, shard: dict[str, Any]) -> str:
        name = shard["name"]
        if "/" in name or ".." in name:
            raise DataError(f"unsafe shard name {name!r} (a path)", self.path, "use shards built by data_prep only")
        return f"{self.location}/{name}"

    def tokenizer_dir(self) -> str:
        return os.path.join(self.location, self.data["tokenizer"].get("dir", "tokenizer"))

    def check_local_shards(self) -> None:
        if not self.shards("train"):
            raise DataError("the manifest lists no train shards", self.path, REBUILD)
        missing = [s["name"] for s in self.data["shards"] if not os.path.isfile(self.url(s))]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(f"shards listed in the manifest are missing: {', '.join(missing[:5])}{more}", self.path,
                            "copy the whole shard directory, or " + REBUILD)
