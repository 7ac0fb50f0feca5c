"""`[eval] kind = "harness"`: lm-evaluation-harness on the trained model, offline, with a task of
our own in the harness's YAML format over the pinned tweets as multiple choice. The harness's
accuracy is checked against one computed here from the merged model with transformers alone."""

from __future__ import annotations

import csv
import html
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.contract import config as contract
from tests.conftest import REPO, TINY_TSV, base_recipe, run_cli, write_json_recipe

LABELS = ["negative", "neutral", "positive"]
PROMPT = "Instruction: Classify the sentiment.\nInput: {text}\nOutput:"
LIMIT = 5

TASK_YAML = """\
task: tweet_sentiment_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Instruction: Classify the sentiment.\\nInput: {{{{text}}}}\\nOutput:"
doc_to_choice: {labels}
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _tweets() -> list[dict]:
    """The pinned tweets with the recipe's derived label: score below -0.5, up to 0.5, above."""
    rows = []
    with open(TINY_TSV, encoding="utf-8") as f:
        for _, score, text in csv.reader(f, delimiter="\t"):
            value = float(score)
            gold = 0 if value < -0.5 else 1 if value <= 0.5 else 2
            rows.append({"text": html.unescape(text), "gold": gold})
    return rows


def _task_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "tweets.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _tweets()))
    (folder / "tweet_sentiment_mc.yaml").write_text(TASK_YAML.format(data=data, labels=json.dumps(LABELS)))
    return folder


def _accuracy_by_hand(model_dir: Path, rows: list[dict]) -> float:
    """The multiple-choice accuracy as the harness defines it: the choice (after a space) whose
    tokens have the highest summed log-probability after the prompt."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    correct = 0
    for row in rows:
        prompt = tokenizer.encode(PROMPT.format(text=row["text"]))
        scores = []
        for label in LABELS:
            choice = tokenizer.encode(" " + label)
            ids = torch.tensor([prompt + choice])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            scores.append(sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(choice)))
        correct += max(range(len(LABELS)), key=lambda i: scores[i]) == row["gold"]
    return correct / len(rows)


@pytest.mark.slow
def test_harness_eval_runs_a_local_task_on_the_trained_adapter(tmp_path: Path, monkeypatch) -> None:
    _task_dir(tmp_path)
    recipe = base_recipe(
        adapter={"kind": "lora", "rank": 4, "alpha": 8, "targets": ["c_attn"], "merge": True},
        eval={"kind": "harness", "tasks": ["tweet_sentiment_mc"], "task_dirs": ["tasks"], "num_fewshot": 0,
              "limit": LIMIT},
    )
    path = write_json_recipe(tmp_path, recipe)
    build = tmp_path / "build"
    compiled = run_cli("compile", str(path), "--out", str(build), cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    trained = subprocess.run([sys.executable, "-m", "runtime.train", str(build)], cwd=REPO, capture_output=True,
                             text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr

    # Offline: the model is handed over as an object, the task's data is a local file.
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "HF_DATASETS_CACHE": str(tmp_path / "datasets")}.items():
        monkeypatch.setenv(key, value)
    evaluated = run_cli("eval", str(build), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr

    report = json.loads((build / "eval.json").read_text())
    harness = report["harness"]
    assert harness["samples"] == {"tweet_sentiment_mc": LIMIT}
    assert (harness["num_fewshot"], harness["limit"], harness["lm_eval_version"]) == (0, LIMIT, "0.4.13")
    accuracy = harness["tasks"]["tweet_sentiment_mc"]["acc,none"]
    assert accuracy == pytest.approx(_accuracy_by_hand(build / "model-merged", _tweets()[:LIMIT]), abs=1e-9)
    assert report["loss"] > 0 and report["perplexity"] > 1  # our held-out loss beside the harness's figures
    assert f"harness: tweet_sentiment_mc acc {accuracy:.4f}; report:" in evaluated.stdout + evaluated.stderr
    md = (build / "eval.md").read_text()
    assert "## lm-evaluation-harness" in md and f"| tweet_sentiment_mc | {LIMIT} | acc | {accuracy:.4f} |" in md


def test_harness_keys_are_checked_by_name(tmp_path: Path) -> None:
    cases = [
        ({"kind": "harness"}, 'kind = "harness" needs tasks'),
        ({"label_field": "label", "limit": 20}, 'limit set the lm-evaluation-harness run of kind = "harness"'),
        ({"kind": "harness", "tasks": ["t"], "task_dirs": ["nowhere"]},
         'eval.task_dirs[0] = "nowhere" is not a folder (paths are relative to the recipe)'),
    ]
    for eval_section, message in cases:
        recipe = base_recipe()
        recipe["eval"] = eval_section
        checked = run_cli("validate", str(write_json_recipe(tmp_path, recipe)), cwd=tmp_path)
        assert checked.returncode == 1 and message in checked.stderr, checked.stderr
        assert "Traceback" not in checked.stderr
    recipe = base_recipe()
    recipe["eval"] = {"kind": "harness", "tasks": ["t"], "task_dirs": ["tasks"]}
    (tmp_path / "tasks").mkdir()
    assert run_cli("validate", str(write_json_recipe(tmp_path, recipe)), cwd=tmp_path).returncode == 0


def test_a_missing_harness_is_refused_with_the_install_hint(monkeypatch) -> None:
    golden = json.loads((REPO / "tests" / "golden" / "tweet-sentiment" / "runtime.json").read_text())
    harness = {**golden["eval"], "kind": "harness", "tasks": ["hellaswag"]}
    config = contract.RuntimeConfig.model_validate({**golden, "eval": harness})
    real = contract.importlib.util.find_spec
    monkeypatch.setattr(contract.importlib.util, "find_spec", lambda name: None if name == "lm_eval" else real(name))
    assert contract.unsupported(config) == [
        'eval.kind = "harness" runs lm-evaluation-harness, which is not installed: pip install "recipe[harness]" '
        '(or use kind = "language_model")']
