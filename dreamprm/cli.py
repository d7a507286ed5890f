"""The `dreamprm` command: argument parsing only; the work is done by library functions.

    dreamprm data check FILE [--from FORMAT] [--tokenizer DIR [--max_length N]] [--json]
    dreamprm data convert --from FORMAT IN OUT
    dreamprm evaluate {steps,processbench,bon} --data FILE (--model PATH | --scores FILE)
    dreamprm export RUN_DIR OUT_DIR [--adapter] [--checkpoint step_N]
    dreamprm smollm2 [--out DIR] [--gguf FILE]    (a real pretrained model folder, see dreamprm/smollm2.py)
    dreamprm train [options of launch/train.py]
    dreamprm weights RUN_DIR [--top K] [--json] [--plot DIR] [--keep F | --min_weight W] [--out FILE]

Each subcommand is a parser built by an add_*_parser(subparsers) function plus a plain
handler function(args) -> exit code; `evaluate`, `export`, `smollm2`, `weights` and `train` are
added the same way in build_parser().
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dreamprm import preflight
from dreamprm.audit import add_weights_parser
from dreamprm.config import DEFAULT_STEP_TAG, FORMAT_CHOICES, ArgParser, parse_config, says_once
from dreamprm.data.readers import format_summary, load_records, summary
from dreamprm.data.record import write_jsonl
from dreamprm.data.tokenize import length_report
from dreamprm.errors import ConfigError, DataError, DreamPRMError
from dreamprm.evaluate import add_evaluate_parser
from dreamprm.export import add_export_parser
from dreamprm.smollm2 import add_smollm2_parser


def _print_problems(problems: list[str], skippable: bool = False) -> None:
    for p in problems:
        print(p, file=sys.stderr)
    hint = "; fix them, or pass --skip-invalid to leave the bad records out" if skippable else ""
    print(f"{len(problems)} problem(s){hint}", file=sys.stderr)


def _load_tokenizer(path: str, step_tag: str):
    """A local tokenizer directory (never downloads) with the step tag as training has it (added
    as a special token when it is not one token), or an error message naming the flag."""
    if not Path(path).is_dir():
        return None, f"--tokenizer: {path} is not a directory (pass a local tokenizer or model folder)"
    from dreamprm.model import load_tokenizer  # slow import, only when asked for

    try:
        return load_tokenizer(path, step_tag), None
    except (OSError, ValueError, DreamPRMError) as e:
        return None, f"--tokenizer: cannot use the tokenizer in {path}: {e}"


def data_check(args) -> int:
    """Validate a data file and print what is in it; exit 1 listing every problem."""
    if args.max_length is not None and not args.tokenizer:
        _print_problems(["--max_length: counts tokens, so it needs --tokenizer DIR"])
        return 1
    if args.max_length is not None and args.max_length < 2:
        _print_problems([f"--max_length: must be >= 2 (got {args.max_length})"])
        return 1
    tokenizer, error = _load_tokenizer(args.tokenizer, args.step_tag) if args.tokenizer else (None, None)
    try:
        records = load_records(args.file, args.fmt, args.step_tag, skip_invalid=args.skip_invalid)
    except DataError as e:
        _print_problems(e.problems + ([error] if error else []), e.skippable)
        return 1
    if error:
        _print_problems([error])
        return 1
    s = summary(records)
    if tokenizer is not None:
        try:
            s.update(length_report(records, tokenizer, args.step_tag, args.chat_template, args.max_length))
        except DreamPRMError as e:
            _print_problems([f"--tokenizer {args.tokenizer}: {e}"])
            return 1
    print(json.dumps(s, indent=1) if args.json else format_summary(s))
    return 0


def data_convert(args) -> int:
    """Read any supported format and write the internal JSONL, whole or not at all (a record
    that cannot be written, a full disk: no OUT file, and an old one is left as it was)."""
    if os.path.realpath(args.output) == os.path.realpath(args.input):  # realpath: no error on a symlink loop
        print("OUT: is the input file; write the converted records to another path", file=sys.stderr)
        return 1
    if os.path.isdir(args.output):
        print(f"OUT: {args.output} is a directory; name the output file (e.g. {Path(args.output) / 'data.jsonl'})",
              file=sys.stderr)
        return 1
    try:
        records = load_records(args.input, args.fmt, args.step_tag, skip_invalid=args.skip_invalid)
        write_jsonl(records, args.output)
    except DataError as e:
        _print_problems(e.problems, e.skippable)
        return 1
    except OSError as e:  # write_jsonl's message names the file and the cause
        print(f"OUT: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {len(records)} records to {args.output}")
    return 0


def add_data_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="check and convert PRM data files")
    sub = data.add_subparsers(dest="data_command", required=True)

    def common(p):
        p.add_argument("--from", dest="fmt", default="auto", choices=FORMAT_CHOICES,
                       help="input format (default: guessed from the first record's keys)")
        p.add_argument("--step-tag", default=DEFAULT_STEP_TAG,
                       help="step separator token; a step containing it is an error (default: %(default)s)")
        p.add_argument("--skip-invalid", action="store_true",
                       help="leave invalid records out (named in a warning) instead of failing")

    check = sub.add_parser("check", help="validate a file and summarise it (exit 1 on bad records)")
    check.add_argument("file", help="data file (JSONL, or a JSON array)")
    common(check)
    check.add_argument("--tokenizer", metavar="DIR", help="local tokenizer or model folder: also report token "
                       "lengths as training encodes them (length distribution)")
    check.add_argument("--max_length", "--max-length", type=int, metavar="N",
                       help="with --tokenizer: how many examples N tokens keep whole, truncate or drop")
    check.add_argument("--chat-template", dest="chat_template", action=argparse.BooleanOptionalAction,
                       default=True, help="count the chat-template prompt as training does (default: on)")
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    check.set_defaults(handler=data_check)

    convert = sub.add_parser("convert", help="convert a file to the internal JSONL format")
    convert.add_argument("input", metavar="IN", help="input data file")
    convert.add_argument("output", metavar="OUT", help="output JSONL path")
    common(convert)
    convert.set_defaults(handler=data_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgParser(prog="dreamprm", description="Process reward model training.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_data_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_export_parser(subparsers)
    add_smollm2_parser(subparsers)
    add_weights_parser(subparsers)
    subparsers.add_parser("train", add_help=False,
                          help="train a PRM (same options as launch/train.py; `dreamprm train --help`)")
    return parser


def train(argv: list[str]) -> int:
    """launch/train.py and `dreamprm train`: the config's and the pre-flight's problems print as one message
    (exit 2), other known failures as one clear message (exit 1)."""
    cfg, problems, notes = parse_config(argv)
    # before torch starts CUDA or DeepSpeed picks its accelerator (pre-flight imports both with --deepspeed)
    if cfg.train.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        notes += preflight.check(cfg, problems)
    except ConfigError as e:
        if says_once():  # every rank of a launcher finds the same problems: one machine prints them once
            print(f"error: {e}", file=sys.stderr)
        return 2
    from dreamprm.train import fit  # the heavy stack (torch, deepspeed) only once the flags are valid
    try:
        return fit(cfg, notes)
    except DreamPRMError as e:  # a bug's ImportError or FileNotFoundError keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the trainer owns its flags (config.build_parser)
        return train(argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
