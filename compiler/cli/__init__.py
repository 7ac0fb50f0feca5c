"""The `recipe` command line. Only this package prints and chooses exit codes:
0 success, 1 the user's input is wrong, 2 a bug in recipe itself.

Here: the argument parser and `main`; each verb lives in the module for its group (authoring,
building, running, data). Heavy libraries (torch, transformers) are never imported at module
level; commands that need them run the runtime in a subprocess or import inside the command.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from compiler.cli import authoring, building, data, hardware, running
from compiler.cli.common import EXIT_BUG, EXIT_USER, SET_HELP
from compiler.diagnostics import RecipeError, render_all

# The record shapes of compiler.loading.spec.data (repeated here so the parser needs no pydantic import).
FORMAT_NAMES = ("columns", "instruction", "completion", "scored", "preference", "prompt", "openai-chat",
                "chatglm-chat", "sharegpt")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check recipes (schema and cross-field rules; reads no data)")
    p.add_argument("recipes", nargs="+", metavar="RECIPE")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.set_defaults(func=authoring.cmd_validate)

    p = sub.add_parser("compile", help="measure the data, plan, and write build/<name>/")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--out", metavar="DIR", help="build directory (default: build/<name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.set_defaults(func=building.cmd_compile)

    p = sub.add_parser("plan", help="compile in memory and print the plan")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--json", action="store_true", help="print plan.json instead of plan.md")
    p.add_argument("--precise", action="store_true",
                   help="also simulate one step of each stage on fake tensors and compare the memory estimates")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.set_defaults(func=authoring.cmd_plan)

    p = sub.add_parser("diff", help="what a recipe change does to the plan (+ added, - removed, ~ changed)")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("other", nargs="?", metavar="OTHER", help="the changed recipe (RECIPE is then the old one)")
    p.add_argument("--against", metavar="REV", help="compare RECIPE with itself at a git revision, e.g. origin/main")
    p.add_argument("--markdown", action="store_true", help="a markdown table for a pull-request comment")
    p.set_defaults(func=authoring.cmd_diff)

    p = sub.add_parser("check", help="compile in memory and fail when the plan exceeds [budget] or a device")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.set_defaults(func=authoring.cmd_check)

    p = sub.add_parser("schema", help="print the recipe JSON Schema (for editors and CI)")
    p.add_argument("--out", metavar="FILE", help="write it to FILE instead of stdout")
    p.set_defaults(func=authoring.cmd_schema)

    p = sub.add_parser("run", help="train and evaluate a compiled build")
    p.add_argument("build", metavar="BUILD_DIR")
    p.set_defaults(func=running.cmd_run)

    p = sub.add_parser("eval", help="evaluate a trained build on its held-out split")
    p.add_argument("build", metavar="BUILD_DIR")
    p.add_argument("--checkpoint", metavar="PATH", help="model directory (default: BUILD_DIR/model)")
    p.set_defaults(func=running.cmd_eval)

    p = sub.add_parser("chat", help="talk to a build's model (trained, or the base weights before training)")
    p.add_argument("build", metavar="BUILD_DIR")
    p.add_argument("--prompt", metavar="TEXT", help="one message, print the reply, exit (default: interactive, or "
                                                    "one message per line of stdin)")
    p.set_defaults(func=running.cmd_chat)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    c = data_sub.add_parser("check", help="format errors by category, token distributions and fine-tuning cost")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--format", required=True, choices=sorted(FORMAT_NAMES), help="record shape")
    c.add_argument("--file-format", default="auto", choices=["auto", "tsv", "csv", "json", "jsonl"])
    c.add_argument("--columns", help="comma-separated column names for a TSV/CSV without a header")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--usd-per-1k-tokens", type=float, default=0.008, help="price per 1,000 training tokens")
    c.add_argument("--epochs", type=int, help="override the epochs heuristic")
    c.add_argument("--token-limit", type=int, default=4096, help="tokens billed per example at most")
    c.set_defaults(func=data.cmd_data_check)

    p = sub.add_parser("inspect", help="look inside a compiled recipe")
    inspect_sub = p.add_subparsers(dest="inspect_command", required=True, metavar="SUBCOMMAND")
    c = inspect_sub.add_parser("data", help="print each token of the first rows with its label id or -100")
    c.add_argument("recipe", metavar="RECIPE")
    c.add_argument("--rows", type=int, default=3)
    c.add_argument("--data", metavar="NAME", help="data set (default: the first stage's)")
    c.add_argument("--split", choices=["train", "heldout"], default="train")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    c.set_defaults(func=data.cmd_inspect_data)

    p = sub.add_parser("hardware", help="hardware tools")
    hardware_sub = p.add_subparsers(dest="hardware_command", required=True, metavar="SUBCOMMAND")
    c = hardware_sub.add_parser("probe", help="time matmuls, memory bandwidth and tiny training steps; write a "
                                              "hardware file (the schema of specs/hardware)")
    c.add_argument("--out", metavar="FILE", help="write the file here (default: stdout), e.g. specs/hardware/cpu.toml")
    c.add_argument("--device", choices=["cpu", "cuda"], help="the device to measure (default: cuda when present)")
    c.add_argument("--name", help="the file's name field (default: the device)")
    c.add_argument("--usd-per-hour", type=float, default=0.10, help="price per device-hour to record")
    c.set_defaults(func=hardware.cmd_hardware_probe)

    p = sub.add_parser("fetch", help="download and cache pinned assets (default: all)")
    p.add_argument("names", nargs="*", metavar="ASSET")
    p.set_defaults(func=building.cmd_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as exc:
        print(render_all(exc.diagnostics), file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug in recipe, not the user's input: show everything
        traceback.print_exc()
        print("internal error: this is a bug in recipe; please report it with the trace above", file=sys.stderr)
        return EXIT_BUG
