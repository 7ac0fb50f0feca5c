"""The token profile in the plan, recounted independently; labels are never cut silently."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from compiler.data.assets import asset_path
from compiler.emission.build import compile_recipe
from runtime.contract.assets import load_catalog
from tests.conftest import REPO, base_recipe, run_cli, write_json_recipe

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
STAGE_TOKEN_KEYS = {"n_positions", "train_examples", "eval_examples", "truncated_examples",
                    "label_truncated_examples", "dropped_examples", "total"}


@pytest.fixture(scope="module")
def gpt2() -> tiktoken.Encoding:
    ranks = asset_path(load_catalog()["gpt2-bpe"])
    return tiktoken.Encoding(name="gpt2-test", pat_str=GPT2_PAT, mergeable_ranks=load_tiktoken_bpe(str(ranks)),
                             special_tokens={"<|endoftext|>": 50256})


def _nearest_rank(ordered: list[int], q: float) -> int:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def test_tweet_profile_equals_an_independent_recount(gpt2) -> None:
    # Read the VADER file without the compiler: id, score, text; labels at +-0.5 (strict outer bins).
    totals, text_lengths = [], []
    raw = asset_path(load_catalog()["vader-tweets"]).read_text(encoding="utf-8")
    for line in raw.splitlines():
        _, score, text = line.rstrip("\r").split("\t")
        text = html.unescape(text)
        label = "negative" if float(score) < -0.5 else "positive" if float(score) > 0.5 else "neutral"
        prompt = ("Instruction: Classify the sentiment of the tweet as positive, negative or neutral.\n"
                  f"Input: {text}\nOutput:")
        totals.append(len(gpt2.encode(prompt)) + len(gpt2.encode(f" {label}")))
        text_lengths.append(len(gpt2.encode(text)))
    totals.sort()
    text_lengths.sort()
    plan = compile_recipe(REPO / "specs" / "examples" / "tweet-sentiment.toml").plan
    profile = plan["data"]["tweets"]["tokens"]
    expected = {"min": totals[0], "p50": _nearest_rank(totals, 0.5), "p90": _nearest_rank(totals, 0.9),
                "p95": _nearest_rank(totals, 0.95), "p99": _nearest_rank(totals, 0.99), "max": totals[-1]}
    assert {k: profile["before_truncation"]["total"][k] for k in expected} == expected
    assert profile["fields"]["text"]["max"] == text_lengths[-1]
    assert profile["fields"]["text"]["p90"] == _nearest_rank(text_lengths, 0.9)
    assert profile["before_truncation"]["total"]["mean"] == round(sum(totals) / len(totals), 2)
    # the histogram counts every example once, in doubling bins
    edges = [b["below"] for b in profile["histogram"]]
    counts = {edge: sum(1 for t in totals if (edge // 2 if edge > 8 else 0) <= t < edge) for edge in edges}
    assert {b["below"]: b["count"] for b in profile["histogram"]} == counts
    # budget: 99% coverage, rounded up to 8 on CPU; every longer example is truncated (tweet only)
    budget = math.ceil(_nearest_rank(totals, 0.99) / 8) * 8
    assert profile["max_total_tokens"] == budget
    assert profile["truncated_examples"] == sum(1 for t in totals if t > budget)
    stage = plan["stages"][0]["tokens"]
    assert set(stage) == STAGE_TOKEN_KEYS
    assert stage["total"] == expected and stage["n_positions"] == budget
    assert (stage["train_examples"], stage["eval_examples"]) == (3360, 840)
    assert (stage["label_truncated_examples"], stage["dropped_examples"]) == (0, 0)


def _long_label_recipe(tmp_path: Path, **tokens) -> Path:
    data = tmp_path / "rows.jsonl"
    rows = [{"user_input": "short question", "completion": "a short answer"},
            {"user_input": "q", "completion": "an answer that is much longer than the others, far too long for it"},
            {"user_input": "another question", "completion": "fine"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = base_recipe(
        template={"prompt": "Q: {{ user_input }}\nA:", "completion": " {{ completion }}"},
        tokens={"max_total": 12, "truncatable": ["user_input"], **tokens},
        eval=None,
    )
    recipe["data"] = {"qa": {"source": {"path": str(data)}, "format": "completion",
                             "split": {"heldout_fraction": 0.01}}}
    return write_json_recipe(tmp_path, recipe)


def test_a_recipe_whose_labels_would_be_cut_fails_naming_the_rows(tmp_path: Path) -> None:
    path = _long_label_recipe(tmp_path)
    result = run_cli("compile", str(path), "--out", str(tmp_path / "build"), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "1 rows would lose supervised tokens" in result.stderr
    assert "(rows at lines 2 of rows.jsonl)" in result.stderr
    assert not (tmp_path / "build").exists()
    # with the budget fixed, it compiles and nothing is cut
    fixed = json.loads(path.read_text())
    fixed["tokens"]["max_total"] = "auto"
    path.write_text(json.dumps(fixed))
    result = run_cli("compile", str(path), "--out", str(tmp_path / "build"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stage = json.loads((tmp_path / "build" / "plan.json").read_text())["stages"][0]["tokens"]
    assert (stage["label_truncated_examples"], stage["dropped_examples"]) == (0, 0)


def test_an_explicit_allowance_drops_or_truncates_and_counts(tmp_path: Path) -> None:
    path = _long_label_recipe(tmp_path, overflow="drop", overflow_allowed=1)
    plan = compile_recipe(path).plan
    assert plan["stages"][0]["tokens"]["dropped_examples"] == 1
    assert plan["stages"][0]["tokens"]["train_examples"] == 2
    path = _long_label_recipe(tmp_path, overflow="truncate", overflow_allowed=1)
    build = compile_recipe(path)
    tokens = build.plan["stages"][0]["tokens"]
    assert (tokens["label_truncated_examples"], tokens["dropped_examples"]) == (1, 0)
    for line in build.files["data/qa/train.jsonl"].decode().splitlines():
        record = json.loads(line)
        assert len(record["prompt"]) + len(record["completion"]) <= 12


def test_round_to_is_64_on_gpus(tmp_path: Path) -> None:
    recipe = base_recipe(hardware={"device": "cuda"})
    plan = compile_recipe(write_json_recipe(tmp_path, recipe)).plan
    assert plan["data"]["tweets"]["tokens"]["max_total_tokens"] == 64
    assert "multiple of 64" in plan["data"]["tweets"]["tokens"]["reason"]


def test_inspect_data_prints_prompt_tokens_as_ignored(tmp_path: Path, gpt2) -> None:
    path = write_json_recipe(tmp_path, base_recipe())
    result = run_cli("inspect", "data", str(path), "--rows", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("row at line ") and lines[0].endswith("1 supervised")
    table = [line.split(None, 3) for line in lines[2:] if line.strip()]
    labels = [int(cols[2]) for cols in table]
    ids = [int(cols[1]) for cols in table]
    assert labels[:-1] == [-100] * (len(labels) - 1)  # the prompt carries no loss
    assert labels[-1] == ids[-1] and gpt2.decode([ids[-1]]) in (" positive", " negative", " neutral")
    assert gpt2.decode(ids).startswith("Instruction: Classify the sentiment.\nInput: ")


def test_bad_rows_fail_with_categories_or_are_skipped_within_the_allowance(tmp_path: Path) -> None:
    data = tmp_path / "rows.tsv"
    data.write_text("1\t0.9\tgood\n2\tnot-a-number\tbad score\n3\t-0.9\tawful\n4\t0.1\tmeh\textra\n")
    recipe = base_recipe()
    recipe["data"]["tweets"]["source"] = {"path": str(data)}
    path = write_json_recipe(tmp_path, recipe)
    result = run_cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 0  # validate reads no data
    result = run_cli("compile", str(path), "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert result.returncode == 1
    assert "rows.tsv:2:1" in result.stderr and "[not_a_number]" in result.stderr
    assert "rows.tsv:4:1" in result.stderr and "[wrong_field_count]" in result.stderr
    assert "2 of 4 rows fail the checks (1 not_a_number, 1 wrong_field_count)" in result.stderr
    recipe["data"]["tweets"]["bad_rows"] = {"policy": "skip", "max_fraction": 0.5}
    plan = compile_recipe(write_json_recipe(tmp_path, recipe)).plan
    assert plan["data"]["tweets"]["checks"]["skipped_rows"] == 2
    assert plan["data"]["tweets"]["rows"] == 2
    assert any("left out 2 bad rows" in w for w in plan["warnings"])
    recipe["data"]["tweets"]["bad_rows"] = {"policy": "skip", "max_fraction": 0.25}
    result = run_cli("compile", str(write_json_recipe(tmp_path, recipe)), "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert result.returncode == 1 and "more than bad_rows.max_fraction = 0.25" in result.stderr
