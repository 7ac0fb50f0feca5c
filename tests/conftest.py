"""Shared fixtures: a small valid recipe to derive failing cases from, and CLI helpers."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_TSV = Path(__file__).resolve().parent / "data" / "tiny.tsv"

_BASE = {
    "name": "tiny",
    "seed": 7,
    "model": {"init": "scratch", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": "auto", "dropout": 0.0},
    "tokenizer": {
        "asset": "gpt2-bpe",
        "special_tokens": {"<|endoftext|>": 50256},
        "eos_token": "<|endoftext|>",
    },
    "data": {
        "tweets": {
            "source": {"path": str(TINY_TSV)},
            "format": "columns",
            "file_format": "tsv",
            "columns": ["id", "score", "text"],
            "html_unescape": ["text"],
            "derive": [
                {"name": "label", "from": "score", "edges": [-0.5, 0.5], "labels": ["negative", "neutral", "positive"]}
            ],
            "split": {"heldout_fraction": 0.3, "seed": 1},
        }
    },
    "template": {
        "prompt": "Instruction: Classify the sentiment.\nInput: {{ text }}\nOutput:",
        "completion": " {{ label }}",
    },
    "tokens": {"max_total": "auto", "coverage": 1.0, "truncatable": ["text"]},
    "train": {"epochs": 1, "micro_batch_size": 4, "learning_rate": 1e-3},
    "stages": [{"name": "sft", "kind": "sft"}],
    "eval": {"label_field": "label"},
}


def base_recipe(**overrides) -> dict:
    """A deep copy of the small valid recipe, with top-level sections replaced or merged."""
    recipe = copy.deepcopy(_BASE)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_json_recipe(directory: Path, recipe: dict, name: str = "recipe.json") -> Path:
    path = directory / name
    path.write_text(json.dumps(recipe, indent=2))
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `recipe` entry point in a subprocess, as a user would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "compiler.cli", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    return write_json_recipe(tmp_path, base_recipe())


def save_tiny_llama(folder: Path, *, hidden: int, intermediate: int, layers: int) -> Path:
    """A small Llama with the GPT-2 vocabulary, grouped-query attention (4 heads, 2 key/value heads)
    and an untied output layer, seeded and saved in HF format (fp32) under `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50257, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=50256, eos_token_id=50256,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
