"""`sol data check FILE --kind sft|prefs|prompts|text [--from REF]`: the checks a stage
runs on its file, alone, with counts; `sol data export-demo DIR`: the built-in tasks
written as files of these formats."""

from __future__ import annotations

from pathlib import Path

from client.output import add_json_flag, emit, table

KINDS = ("sft", "prefs", "prompts", "text")


def register(subparsers, bench_subparsers) -> None:
    data = subparsers.add_parser("data", help="check training data files; export the built-in tasks as files")
    sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    check = sub.add_parser("check", help="check a JSON Lines file as a stage would, and count it")
    check.add_argument("file", type=Path)
    check.add_argument("--kind", required=True, choices=KINDS, help="the file's format")
    check.add_argument("--from", dest="ref", default=None,
                       help="a checkpoint whose tokenizer and context count tokens and apply the long-row "
                            "rule (without it: structure only)")
    check.add_argument("--registry", type=Path, default=None, help="registry root (default $SOL_HOME/registry)")
    check.add_argument("--skip-long", action="store_true", help="count rows too long for the context as skipped")
    check.add_argument("--max-new-tokens", type=int, default=None,
                       help="prompts: room left for the reply (default: the tiny/cpu presets' RL reply length)")
    check.add_argument("--reward", default=None,
                       help="prompts: also load python:MODULE:FUNCTION and call it on the first row")
    add_json_flag(check)
    check.set_defaults(handler=_check)

    demo = sub.add_parser("export-demo", help="write the built-in tasks as sft/prefs/prompts/text files")
    demo.add_argument("dir", type=Path)
    demo.add_argument("--preset", default="tiny", help="pipeline preset whose task draw is written (default tiny)")
    demo.add_argument("--seed", type=int, default=0)
    add_json_flag(demo)
    demo.set_defaults(handler=_export_demo)


def _check(args) -> int:
    from training.data_check import check_file

    report = check_file(args.file, args.kind, args.ref, args.registry, args.skip_long, args.max_new_tokens,
                        args.reward)
    rows = [[k, "-" if v is None else str(v)] for k, v in report["counts"].items()]
    emit(report, args.json, f"{args.file}: ok ({args.kind})\n" + table(rows, ["count", "value"]))
    return 0


def _export_demo(args) -> int:
    from training.demo_export import export_demo

    written = export_demo(args.dir, args.preset, args.seed)
    emit({"dir": str(args.dir), "files": written}, args.json,
         table([[name, str(n)] for name, n in written.items()], ["file", "rows"]))
    return 0
