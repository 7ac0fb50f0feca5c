"""The verbs a recipe author runs before training: validate, schema, plan, check and diff."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from compiler.cli.common import EXIT_OK, EXIT_USER, overrides
from compiler.diagnostics import RecipeError, render_all
from runtime.contract.layout import PLAN_JSON, PLAN_MD


def cmd_validate(args: argparse.Namespace) -> int:
    from compiler.rules.validate import validate

    sets = overrides(args)
    failed = False
    for path in args.recipes:
        try:
            _, warnings = validate(Path(path), sets)
        except RecipeError as exc:
            print(render_all(exc.diagnostics), file=sys.stderr)
            failed = True
            continue
        if warnings:
            print(render_all(warnings), file=sys.stderr)
        print(f"ok: {path}")
    return EXIT_USER if failed else EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from compiler.loading.schema import recipe_json_schema

    text = recipe_json_schema()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from compiler.emission.build import compile_recipe

    build = compile_recipe(Path(args.recipe), overrides(args))
    sys.stdout.write(build.files[PLAN_JSON if args.json else PLAN_MD].decode())
    if args.precise:
        from compiler.views.precise import precise_report

        sys.stdout.write(precise_report(build))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from compiler.emission.build import compile_recipe
    from compiler.loading.loader import load_recipe
    from compiler.review.limits import budget_violations

    sets = overrides(args)
    build = compile_recipe(Path(args.recipe), sets)
    violations = budget_violations(load_recipe(Path(args.recipe), sets), build.plan)
    if violations:
        print(render_all(violations), file=sys.stderr)
        return EXIT_USER
    print(f"ok: {args.recipe}: {build.plan['summary']}")
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    from compiler.emission.build import compile_recipe
    from compiler.loading.loader import parse_document
    from compiler.review.diff import plan_changes, setting_changes
    from compiler.views.diff import render_markdown, render_text

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
