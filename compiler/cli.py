"""The `recipe` command line. Only this module prints and chooses exit codes:
0 success, 1 the user's input is wrong, 2 a bug in recipe itself.

Heavy libraries (torch, transformers) are never imported here; commands that need them run
the runtime in a subprocess or import inside the command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

from compiler.diagnostics import RecipeError, render_all

EXIT_OK, EXIT_USER, EXIT_BUG = 0, 1, 2
# The record shapes of compiler.spec.data (repeated here so the parser needs no pydantic import).
FORMAT_NAMES = ("columns", "instruction", "completion", "scored", "preference", "prompt", "openai-chat",
                "chatglm-chat", "sharegpt")


def _overrides(args: argparse.Namespace) -> list:
    from compiler.overrides import parse_override

    return [parse_override(text) for text in getattr(args, "set", None) or []]


def _cmd_validate(args: argparse.Namespace) -> int:
    from compiler.validate import validate

    overrides = _overrides(args)
    failed = False
    for path in args.recipes:
        try:
            _, warnings = validate(Path(path), overrides)
        except RecipeError as exc:
            print(render_all(exc.diagnostics), file=sys.stderr)
            failed = True
            continue
        if warnings:
            print(render_all(warnings), file=sys.stderr)
        print(f"ok: {path}")
    return EXIT_USER if failed else EXIT_OK


def _cmd_compile(args: argparse.Namespace) -> int:
    from compiler.build import compile_recipe, write_build

    build = compile_recipe(Path(args.recipe), _overrides(args))
    out = Path(args.out) if args.out else Path("build") / build.name
    try:
        notes = write_build(build, out)
    except OSError as exc:
        from runtime.contract.files import write_failure

        problem = write_failure(out, exc)
        if problem is None:
            raise
        raise RecipeError.single(f"could not write {out}: {problem}; the build there (if any) is unchanged; free "
                                 "some space and compile again") from None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if build.warnings:
        print(render_all(build.warnings), file=sys.stderr)
    print(f"wrote {out}/ (plan: {out}/plan.md)")
    print(build.plan["summary"])
    return EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    from compiler.build import compile_recipe

    build = compile_recipe(Path(args.recipe), _overrides(args))
    sys.stdout.write(build.files["plan.json" if args.json else "plan.md"].decode())
    if args.precise:
        from compiler.precise_check import precise_report

        sys.stdout.write(precise_report(build))
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from compiler.build import compile_recipe
    from compiler.check import budget_violations
    from compiler.loader import load_recipe

    overrides = _overrides(args)
    build = compile_recipe(Path(args.recipe), overrides)
    violations = budget_violations(load_recipe(Path(args.recipe), overrides), build.plan)
    if violations:
        print(render_all(violations), file=sys.stderr)
        return EXIT_USER
    print(f"ok: {args.recipe}: {build.plan['summary']}")
    return EXIT_OK


def _cmd_diff(args: argparse.Namespace) -> int:
    from compiler.build import compile_recipe
    from compiler.diff import plan_changes, render_markdown, render_text, setting_changes
    from compiler.loader import parse_document

    after_path = Path(args.recipe)
    if (args.other is None) == (args.against is None):
        raise RecipeError.single("give a second recipe, or --against REV (a git revision), to compare with",
                                 help="recipe diff specs/examples/a.toml specs/examples/b.toml, or "
                                 "recipe diff specs/examples/a.toml --against origin/main")
    temporary = None
    try:
        if args.other is not None:
            before_path, after_path = after_path, Path(args.other)
        else:
            temporary = _recipe_at_revision(after_path, args.against)
            before_path = temporary
        before_build, after_build = compile_recipe(before_path), compile_recipe(after_path)
        settings = setting_changes(parse_document(before_path)[0], parse_document(after_path)[0])
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
    figures = plan_changes(before_build.plan, after_build.plan)
    render = render_markdown if args.markdown else render_text
    sys.stdout.write(render(settings, figures, before_build.plan["summary"], after_build.plan["summary"]))
    return EXIT_OK


def _recipe_at_revision(path: Path, revision: str) -> Path:
    """The recipe as it was at a git revision, written beside the current one (so relative paths
    in it resolve the same way); the caller deletes it."""
    if not path.is_file():
        raise RecipeError.single(f"recipe file {path} not found")
    folder = path.resolve().parent
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True)
    if top.returncode != 0:
        raise RecipeError.single(f"{path} is not in a git repository, so --against {revision} has nothing to read")
    relative = path.resolve().relative_to(Path(top.stdout.strip())).as_posix()
    shown = subprocess.run(["git", "show", f"{revision}:{relative}"], cwd=folder, capture_output=True, text=True)
    if shown.returncode != 0:
        raise RecipeError.single(f"cannot read {relative} at {revision}: {shown.stderr.strip()}",
                                 help="check the revision name, e.g. origin/main (git fetch first)")
    target = folder / f".{path.stem}.at-revision{path.suffix}"
    target.write_text(shown.stdout, encoding="utf-8")
    return target


def _cmd_schema(args: argparse.Namespace) -> int:
    from compiler.schema import recipe_json_schema

    text = recipe_json_schema()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _cmd_data_check(args: argparse.Namespace) -> int:
    from compiler.assets import AssetError, fetch_all, load_catalog
    from compiler.billing import cl100k_encoding
    from compiler.data_report import check_file, render_text

    path = Path(args.file)
    if not path.is_file():
        raise RecipeError.single(f"{args.file} not found")
    try:
        ranks = fetch_all(["cl100k-base"], load_catalog())["cl100k-base"]
    except AssetError as exc:
        raise RecipeError.single(str(exc)) from None
    encoding = cl100k_encoding(ranks)
    report = check_file(
        path, args.format, lambda text: encoding.encode(text, disallowed_special=()),
        columns=args.columns.split(",") if args.columns else None, file_format=args.file_format,
        token_limit=args.token_limit, usd_per_1k_tokens=args.usd_per_1k_tokens, epochs=args.epochs,
    )
    if args.json:
        summary = {k: report[k] for k in ("n_examples", "errors", "warnings", "billing_tokens", "epochs", "cost_usd")}
        print(json.dumps({**summary, "distributions": report["distributions"]}, sort_keys=True))
    else:
        sys.stdout.write(render_text(report, args.file))
    return EXIT_USER if report["errors"] else EXIT_OK


def _cmd_inspect_data(args: argparse.Namespace) -> int:
    from compiler.build import compile_recipe
    from compiler.inspect_data import render_rows

    build = compile_recipe(Path(args.recipe), _overrides(args))
    sys.stdout.write(render_rows(build, args.data, args.rows, args.split))
    return EXIT_OK


def _cmd_fetch(args: argparse.Namespace) -> int:
    from compiler.assets import AssetError, fetch_all, load_catalog

    catalog = load_catalog()
    names = args.names or sorted(catalog)
    unknown = [n for n in names if n not in catalog]
    if unknown:
        raise RecipeError.single(f"unknown asset(s): {', '.join(unknown)}; known: {', '.join(sorted(catalog))}")
    try:
        for name, path in fetch_all(names, catalog).items():
            print(f"{name}: {path}")
    except AssetError as exc:
        raise RecipeError.single(str(exc)) from None
    return EXIT_OK


def _check_build(build_dir: Path) -> None:
    """Refuse a directory that is not a build, or whose compiled files changed since compile.
    First undo any swap of files a killed `recipe compile` or `recipe eval` left half done."""
    import hashlib

    from compiler.build import incomplete_build
    from runtime.contract.config import IncompatibleBuildError, load_runtime_config, unsupported
    from runtime.contract.files import folder_lock, roll_back_interrupted

    if build_dir.is_dir():
        with folder_lock(build_dir):
            restored = roll_back_interrupted(build_dir)
        if incomplete_build(build_dir):
            raise RecipeError.single(
                f"{build_dir} is incomplete: `recipe compile` was interrupted before it finished writing it; "
                f"compile the recipe again (recipe compile RECIPE --out {build_dir})")
        if restored:
            print(f"note: {build_dir}: an interrupted `recipe compile` or `recipe eval` had left files half "
                  "replaced; restored the ones before it", file=sys.stderr)
    try:
        config = load_runtime_config(build_dir)
    except IncompatibleBuildError as exc:
        raise RecipeError.single(str(exc)) from None
    missing = unsupported(config)
    if missing:
        raise RecipeError.single(
            f"{build_dir} compiled, but this runtime cannot execute it yet: " + "; ".join(missing),
            help="the plan (plan.md) is valid; train it with a runtime that supports these features",
        )
    manifest_path = build_dir / "manifest.json"
    try:
        recorded = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise RecipeError.single(
            f"{manifest_path} is missing or unreadable", help="recompile the recipe with `recipe compile`"
        ) from None
    changed = []
    for rel, sha256 in sorted(recorded.items()):
        path = build_dir / rel
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            changed.append(rel)
    if changed:
        raise RecipeError.single(
            f"{build_dir} was changed after compile: {', '.join(changed)} no longer match manifest.json",
            help="edit the recipe and recompile instead of editing build files",
        )


def _cmd_run(args: argparse.Namespace) -> int:
    build_dir = Path(args.build)
    _check_build(build_dir)
    _refuse_if_training(build_dir)
    launch = build_dir / "launch.sh"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    result = subprocess.run(["bash", str(launch)], env=env)
    if result.returncode != 0:
        print(f"error: {launch} exited with status {result.returncode}; see the output above", file=sys.stderr)
        return EXIT_USER
    report = build_dir / "run_report.json"
    if report.is_file():
        from runtime.report import summary_line

        print(f"{summary_line(json.loads(report.read_text()))}; report: {build_dir / 'run_report.md'}")
    _print_eval(build_dir)
    return EXIT_OK


def _refuse_if_training(build_dir: Path) -> None:
    """Say at once, before torchrun starts, that another run holds the build's run lock (training
    checks again itself, which closes the race between two runs started together)."""
    from runtime.contract.files import RunLockBusy, run_lock

    try:
        with run_lock(build_dir, create=False):
            pass
    except RunLockBusy:
        raise RecipeError.single(
            f"another run is training {build_dir} right now; wait for it to finish (or compile the recipe "
            "into another directory with --out)") from None


def _cmd_chat(args: argparse.Namespace) -> int:
    from runtime.chat import ChatError, run
    from runtime.core.model import ModelLoadError

    build_dir = Path(args.build)
    if not (build_dir / "runtime.json").is_file():
        raise RecipeError.single(f"{build_dir} is not a build directory (run `recipe compile RECIPE` first)")
    try:
        return run(build_dir, args.prompt)
    except (ChatError, ModelLoadError) as exc:
        raise RecipeError.single(str(exc)) from None
    except KeyboardInterrupt:
        return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    build_dir = Path(args.build)
    _check_build(build_dir)
    command = [sys.executable, "-m", "runtime.evaluate", str(build_dir)]
    if args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    result = subprocess.run(command, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if result.returncode != 0:
        return EXIT_USER
    _print_eval(build_dir)
    return EXIT_OK


def _print_eval(build_dir: Path) -> None:
    path = build_dir / "eval.json"
    if not path.is_file():
        return
    report = json.loads(path.read_text())
    if "accuracy" not in report:
        print(f"held-out loss {report['loss']:.4f} (perplexity {report['perplexity']:.2f}) on {report['n']} "
              f"examples; report: {path}")
        return
    acc, base = report["accuracy"], report["majority_baseline"]
    print(
        f"held-out accuracy {acc:.1%} on {report['n']} examples "
        f"(majority-class baseline {base:.1%}, {100 * (acc - base):+.1f} points); report: {path}"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    set_help = "override one recipe value, e.g. --set train.learning_rate=1e-4 (repeatable; shown in the plan)"

    p = sub.add_parser("validate", help="check recipes (schema and cross-field rules; reads no data)")
    p.add_argument("recipes", nargs="+", metavar="RECIPE")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("compile", help="measure the data, plan, and write build/<name>/")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--out", metavar="DIR", help="build directory (default: build/<name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("plan", help="compile in memory and print the plan")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--json", action="store_true", help="print plan.json instead of plan.md")
    p.add_argument("--precise", action="store_true",
                   help="also simulate one step of each stage on fake tensors and compare the memory estimates")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("diff", help="what a recipe change does to the plan (+ added, - removed, ~ changed)")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("other", nargs="?", metavar="OTHER", help="the changed recipe (RECIPE is then the old one)")
    p.add_argument("--against", metavar="REV", help="compare RECIPE with itself at a git revision, e.g. origin/main")
    p.add_argument("--markdown", action="store_true", help="a markdown table for a pull-request comment")
    p.set_defaults(func=_cmd_diff)

    p = sub.add_parser("check", help="compile in memory and fail when the plan exceeds [budget] or a device")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("schema", help="print the recipe JSON Schema (for editors and CI)")
    p.add_argument("--out", metavar="FILE", help="write it to FILE instead of stdout")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("run", help="train and evaluate a compiled build")
    p.add_argument("build", metavar="BUILD_DIR")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("eval", help="evaluate a trained build on its held-out split")
    p.add_argument("build", metavar="BUILD_DIR")
    p.add_argument("--checkpoint", metavar="PATH", help="model directory (default: BUILD_DIR/model)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("chat", help="talk to a build's model (trained, or the base weights before training)")
    p.add_argument("build", metavar="BUILD_DIR")
    p.add_argument("--prompt", metavar="TEXT", help="one message, print the reply, exit (default: interactive, or "
                                                    "one message per line of stdin)")
    p.set_defaults(func=_cmd_chat)

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
    c.set_defaults(func=_cmd_data_check)

    p = sub.add_parser("inspect", help="look inside a compiled recipe")
    inspect_sub = p.add_subparsers(dest="inspect_command", required=True, metavar="SUBCOMMAND")
    c = inspect_sub.add_parser("data", help="print each token of the first rows with its label id or -100")
    c.add_argument("recipe", metavar="RECIPE")
    c.add_argument("--rows", type=int, default=3)
    c.add_argument("--data", metavar="NAME", help="data set (default: the first stage's)")
    c.add_argument("--split", choices=["train", "heldout"], default="train")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    c.set_defaults(func=_cmd_inspect_data)

    p = sub.add_parser("fetch", help="download and cache pinned assets (default: all)")
    p.add_argument("names", nargs="*", metavar="ASSET")
    p.set_defaults(func=_cmd_fetch)
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


if __name__ == "__main__":
    sys.exit(main())
