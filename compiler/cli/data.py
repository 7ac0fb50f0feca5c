"""The data verbs: `recipe data check FILE` and `recipe inspect data RECIPE`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compiler.cli.common import EXIT_OK, EXIT_USER, overrides
from compiler.diagnostics import RecipeError


def cmd_data_check(args: argparse.Namespace) -> int:
    from compiler.data import billing
    from compiler.data.assets import fetch_all
    from compiler.data.file_report import check_file
    from compiler.views.data_check import render_text
    from runtime.contract.assets import AssetError, load_catalog

    path = Path(args.file)
    if not path.is_file():
        raise RecipeError.single(f"{args.file} not found")
    try:
        ranks = fetch_all(["cl100k-base"], load_catalog())["cl100k-base"]
    except AssetError as exc:
        raise RecipeError.single(str(exc)) from None
    encoding = billing.cl100k_encoding(ranks)
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


def cmd_inspect_data(args: argparse.Namespace) -> int:
    from compiler.emission.build import compile_recipe
    from compiler.views.inspect import render_rows

    build = compile_recipe(Path(args.recipe), overrides(args))
    sys.stdout.write(render_rows(build, args.data, args.rows, args.split))
    return EXIT_OK
