"""`recipe inspect data`: the loss-mask sanity check, token by token.

For each of the first rows of a data set, every token id, its text, and the label the loss sees:
the same id for supervised tokens, -100 for prompt (or non-assistant) tokens, as the ChatGLM3
fine-tuning guide prints before training.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer

from compiler.diagnostics import RecipeError
from compiler.emission.build import Build
from runtime.contract.layout import RUNTIME_CONFIG_FILE, TOKENIZER_FILE

IGNORE = -100


def records(build: Build, data: str, split: str) -> list[dict]:
    runtime = json.loads(build.files[RUNTIME_CONFIG_FILE])
    spec = runtime["data"][data]
    return [json.loads(line) for line in build.files[spec[split]].decode().splitlines()]


def ids_and_labels(record: dict) -> tuple[list[int], list[int]]:
    if "input_ids" in record:
        return record["input_ids"], record["labels"]
    prompt, completion = record["prompt"], record["completion"]
    return prompt + completion, [IGNORE] * len(prompt) + completion


def render_rows(build: Build, data: str | None, n_rows: int, split: str = "train") -> str:
    runtime = json.loads(build.files[RUNTIME_CONFIG_FILE])
    name = data or runtime["stages"][0]["data"]
    if name not in runtime["data"]:
        raise RecipeError.single(f"no data set {json.dumps(name)}; data sets: {', '.join(runtime['data'])}")
    if not runtime["data"][name]["tokenized"]:
        raise RecipeError.single(f"data set {json.dumps(name)} was not tokenized at compile time (its tokenizer "
                                 "is not available here), so there are no labels to show")
    tokenizer = Tokenizer.from_str(build.files[TOKENIZER_FILE].decode())
    out = []
    for record in records(build, name, split)[:n_rows]:
        ids, labels = ids_and_labels(record)
        supervised = sum(1 for label in labels if label != IGNORE)
        out.append(f"row at line {record['line']}: {len(ids)} tokens, {supervised} supervised")
        out.append(f"{'position':>8}  {'input_id':>8}  {'label':>8}  token")
        for i, (token_id, label) in enumerate(zip(ids, labels)):
            text = json.dumps(tokenizer.decode([token_id], skip_special_tokens=False), ensure_ascii=False)
            out.append(f"{i:>8}  {token_id:>8}  {label:>8}  {text}")
        out.append("")
    return "\n".join(out)
