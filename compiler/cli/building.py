"""The verbs that produce files: compile a recipe into a build directory, fetch pinned assets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compiler.cli.common import EXIT_OK, overrides
from compiler.diagnostics import RecipeError, render_all
from runtime.contract.layout import PLAN_MD


def cmd_compile(args: argparse.Namespace) -> int:
    from compiler.emission.build import compile_recipe, write_build

    build = compile_recipe(Path(args.recipe), overrides(args))
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
    print(f"wrote {out}/ (plan: {out}/{PLAN_MD})")
    print(build.plan["summary"])
    return EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    from compiler.data.assets import fetch_all
    from runtime.contract.assets import AssetError, load_catalog

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
