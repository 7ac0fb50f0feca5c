"""How long measuring the data takes: the 4,200 VADER tweets repeated to 50,400 rows, read,
checked, templated, tokenized (batched fast tokenizer) and budgeted. Target: at most 5 s.

    .venv/bin/python benchmarks/token_profile.py [--copies 12]

Prints the time of the data preparation alone (what grows with the data), the whole compile
(tokenizer loading and writing the build included), and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compiler.data.assets import asset_path  # noqa: E402
from compiler.data.prepare import prepare_dataset  # noqa: E402
from compiler.data.tokenizer import tiktoken_encoder  # noqa: E402
from compiler.emission.build import compile_recipe, write_build  # noqa: E402
from compiler.rules.validate import validate  # noqa: E402
from runtime.contract.assets import load_catalog  # noqa: E402

TARGET_S = 5.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=12)
    parser.add_argument("--unique", action="store_true",
                        help="make every copy's texts distinct (a copy number is prefixed to each tweet), so no "
                        "text repeats and nothing can be encoded once for many rows")
    args = parser.parse_args()
    assets = load_catalog()
    tweets = asset_path(assets["vader-tweets"]).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lines = tweets.splitlines()
        copies = []
        for copy in range(args.copies):
            for line in lines:
                tweet_id, score, text = line.split("\t", 2)
                copies.append(f"{tweet_id}\t{score}\t{f'{copy} ' if args.unique else ''}{text}")
        (tmp / "tweets.tsv").write_text("\r\n".join(copies) + "\r\n", encoding="utf-8")
        recipe = (REPO / "specs" / "examples" / "tweet-sentiment.toml").read_text(encoding="utf-8")
        recipe = recipe.replace('source = { asset = "vader-tweets" }', 'source = { path = "tweets.tsv" }')
        path = tmp / "bench.toml"
        path.write_text(recipe, encoding="utf-8")
        loaded, _ = validate(path)
        encoder = tiktoken_encoder(assets["gpt2-bpe"], {"<|endoftext|>": 50256}, "<|endoftext|>")
        started = time.perf_counter()
        prepared = prepare_dataset(loaded, "tweets", assets, encoder, None, "label")
        prepare_s = time.perf_counter() - started
        started = time.perf_counter()
        build = compile_recipe(path)
        write_build(build, tmp / "build")
        compile_s = time.perf_counter() - started
    rows = len(prepared.split.train) + len(prepared.split.heldout)
    figures = {
        "rows": rows,
        "unique_texts": args.unique,
        "prepare_s": round(prepare_s, 2),
        "rows_per_s": round(rows / prepare_s),
        "compile_s": round(compile_s, 2),
        "budget": prepared.max_total_tokens,
        "truncated_examples": prepared.budget["truncated_examples"],
        "target_s": TARGET_S,
    }
    print(f"measured {rows:,} rows in {prepare_s:.2f} s ({figures['rows_per_s']:,} rows/s); "
          f"whole compile {compile_s:.2f} s; budget {prepared.max_total_tokens} tokens, "
          f"{figures['truncated_examples']} truncated")
    print(json.dumps(figures, sort_keys=True))
    return 0 if prepare_s <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
