"""The config reference. Each key's one-line help is its comment in pipeline/config.py: one source
for `python -m pipeline.train --print-config` and for docs/CONFIG.md, which a test keeps current:

    python -m pipeline.config_help > docs/CONFIG.md
"""
from __future__ import annotations

import ast
import dataclasses
import json
import sys
import typing
from pathlib import Path

from pipeline.config import Config, to_dict

SOURCE = Path(__file__).with_name("config.py")


def key_help() -> dict[str, str]:
    """"section.key" -> the comment on that field's line in pipeline/config.py."""
    lines = SOURCE.read_text().splitlines()
    classes = {node.name: node for node in ast.parse(SOURCE.read_text()).body if isinstance(node, ast.ClassDef)}
    sections = {f.name: typing.get_type_hints(Config)[f.name].__name__ for f in dataclasses.fields(Config)}
    help_of = {}
    for section, class_name in sections.items():
        for node in classes[class_name].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                _, _, comment = lines[node.lineno - 1].partition("  # ")
                help_of[f"{section}.{node.target.id}"] = comment.strip()
    return help_of


def _value(value) -> str:
    return json.dumps(value) if isinstance(value, (str, list)) else str(value).lower() if isinstance(value, bool) \
        else str(value)


def describe(cfg: Config) -> str:
    """The resolved config as YAML, each key with its help."""
    help_of, out = key_help(), []
    for section, values in to_dict(cfg).items():
        out.append(f"{section}:")
        for key, value in values.items():
            out.append(f"  {key}: {_value(value)}  # {help_of.get(f'{section}.{key}', '')}".rstrip(" #"))
    return "\n".join(out)


def markdown() -> str:
    help_of, defaults = key_help(), to_dict(Config())
    out = ["# Configuration reference", "",
           "Every key of a run config (`configs/*.yaml`, `--config`) and of `--set key=value`, with its default.",
           "Generated from the comments in `pipeline/config.py` by `python -m pipeline.config_help > docs/CONFIG.md`;",
           "`python -m pipeline.train --print-config [--config C] [--set ...]` prints a resolved config the same way.",
           "Numbers may be written 5e-4, 1.0e-3 or 3; `--set` values are read as YAML, as the file's are.", ""]
    for section, values in defaults.items():
        out += [f"## {section}", "", "| key | default | meaning |", "|---|---|---|"]
        out += [f"| `{section}.{key}` | `{_value(value)}` | {help_of.get(f'{section}.{key}', '').replace('|', '&#124;')} |"
                for key, value in values.items()]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(markdown())
