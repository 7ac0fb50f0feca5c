"""Hub models resolved from where their weights are: a real Hugging Face cache layout (blobs,
refs/main, snapshots/<commit>/...) built in a temporary folder, read by the real resolution code
(huggingface_hub, HF_HUB_OFFLINE=1) in `recipe` subprocesses; the unreachable-hub error; and a
family without formulas planned from its meta model.

The config files are the published config.json of Qwen/Qwen3-0.6B and deepseek-ai/DeepSeek-V2-Lite
(tests/data/hub). The tokenizer is a small BPE trained here with ChatML special tokens: the point is
that compile measures with the tokenizer it finds in the cache, not which vocabulary it has.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

HUB_DATA = REPO / "tests" / "data" / "hub"
SEED_CHAT = REPO / "specs" / "examples" / "data" / "seed-tasks-chat.jsonl"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SECRET = "hf_not_a_real_token_but_secret_4242"
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rows = [json.loads(line) for line in SEED_CHAT.read_text(encoding="utf-8").splitlines()]
    tokenizer.train_from_iterator((m["content"] for r in rows for m in r["messages"]), trainer)
    return tokenizer.to_str()


def write_hub_cache(cache: Path, repo: str, files: dict[str, str]) -> Path:
    """The huggingface_hub cache layout for one model repository at COMMIT (refs/main points at it)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        blob = hashlib.sha256(text.encode()).hexdigest()
        (root / "blobs" / blob).write_text(text, encoding="utf-8")
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob)
    return snapshot


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(cache.parent), HF_HUB_CACHE=str(cache), PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), **extra)
    return env


def _recipe(directory: Path, hub: str, **model: object) -> Path:
    recipe = {
        "name": "hub-model",
        "model": {"init": "pretrained", "hub": hub, **model},
        "adapter": {"kind": "lora", "rank": 8, "targets": ["q_proj", "v_proj"]},
        "data": {"chat": {"source": {"path": str(SEED_CHAT)}, "format": "openai-chat",
                          "split": {"heldout_fraction": 0.1, "seed": 1}}},
        "template": {"chat": "tokenizer", "loss": "assistant"},
        "tokens": {"max_total": 4096},
        "train": {"epochs": 1, "micro_batch_size": 2, "grad_accum": 1, "learning_rate": 1e-4},
        "stages": [{"name": "sft", "kind": "sft"}],
        "hardware": {"device": "cuda", "gpu": "a100-sxm-80gb", "precision": "bf16"},
    }
    path = directory / "recipe.json"
    path.write_text(json.dumps(recipe, indent=2))
    return path


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compiler.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def qwen3_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "hf" / "hub"
    write_hub_cache(cache, "Qwen/Qwen3-0.6B", {
        "config.json": (HUB_DATA / "qwen3-0.6b.config.json").read_text(encoding="utf-8"),
        "generation_config.json": json.dumps({"bos_token_id": 151643, "eos_token_id": [151645, 151643]}),
        "tokenizer.json": _tokenizer_json(),
        "tokenizer_config.json": json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>",
                                             "pad_token": "<|endoftext|>", "bos_token": None}),
    })
    return cache


def test_hub_model_compiles_from_the_cache_with_its_tokenizer_and_exact_counts(qwen3_cache: Path, tmp_path: Path):
    recipe = _recipe(tmp_path, "Qwen/Qwen3-0.6B")
    env = _env(qwen3_cache, HF_HUB_OFFLINE="1", HF_TOKEN=SECRET)
    checked = _cli(env, "validate", str(recipe))
    assert checked.returncode == 0, checked.stderr
    out = tmp_path / "build"
    done = _cli(env, "compile", str(recipe), "--out", str(out))
    assert done.returncode == 0, done.stderr
    plan = json.loads((out / "plan.json").read_text())
    model = plan["model"]
    assert model["family"] == "qwen3"
    # By hand: embeddings 151,936 x 1,024 (tied); per block q 1,024x2,048, k and v 1,024x1,024 each,
    # o 2,048x1,024, MLP 3 x 1,024x3,072, two norms of 1,024 and q/k norms of 128 each: 15,730,944;
    # 28 blocks + the final norm.
    assert model["parameters"]["total"] == 151936 * 1024 + 28 * 15730944 + 1024 == 596049920
    assert model["counted_by"] == "formula, equal to the meta model"
    assert "generic_terms" not in model
    stage = plan["stages"][0]
    assert stage["tokens_measured"] is True  # the cached tokenizer measured the data: no "at most"
    assert plan["tokenizer"] == "hub:Qwen/Qwen3-0.6B"
    assert stage["params"]["trainable"] == 28 * 8 * ((1024 + 2048) + (1024 + 1024))
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_lora_target_is_checked_against_the_hub_models_modules(qwen3_cache: Path, tmp_path: Path):
    recipe = _recipe(tmp_path, "Qwen/Qwen3-0.6B")
    data = json.loads(recipe.read_text())
    data["adapter"]["targets"] = ["q_proj", "gate_up_proj"]
    recipe.write_text(json.dumps(data))
    done = _cli(_env(qwen3_cache, HF_HUB_OFFLINE="1"), "validate", str(recipe))
    assert done.returncode == 1
    assert '"gate_up_proj"' in done.stderr and "did you mean" in done.stderr and "Traceback" not in done.stderr


def test_unknown_architecture_is_planned_from_its_meta_model_with_generic_terms(tmp_path: Path):
    cache = tmp_path / "hf" / "hub"
    write_hub_cache(cache, "deepseek-ai/DeepSeek-V2-Lite",
                    {"config.json": (HUB_DATA / "deepseek-v2-lite.config.json").read_text(encoding="utf-8")})
    recipe = _recipe(tmp_path, "deepseek-ai/DeepSeek-V2-Lite")
    data = json.loads(recipe.read_text())
    data["adapter"]["targets"] = "all-linear"
    data["template"]["chat"] = "chatml"
    recipe.write_text(json.dumps(data))
    done = _cli(_env(cache, HF_HUB_OFFLINE="1"), "plan", str(recipe), "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    model = plan["model"]
    assert model["family"] == "generic"
    assert model["parameters"]["total"] == 15_706_484_224  # the Hub's published safetensors total
    assert model["counted_by"] == "meta model" and model["generic_terms"]
    # Active by hand: 27 blocks, the first dense (first_k_dense_replace = 1); each of the other 26
    # routes a token to 6 of its 64 experts, each expert 3 x 2,048 x 1,408 (gate, up, down).
    idle = 26 * (64 - 6) * 3 * 2048 * 1408
    assert model["parameters"]["active"] == 15_706_484_224 - idle == 2_661_150_208
    assert model["experts"] == {"routed": 64, "per_token": 6, "expert_parameters": 3 * 2048 * 1408,
                                "sparse_layers": 26}
    assert plan["stages"][0]["params"]["active"] == 2_661_150_208
    assert plan["stages"][0]["memory"]["peak_gib"] > 15_706_484_224 * 2 / 2**30  # bf16 weights at least
    # The routed experts are 3-D tensors: "all-linear" was resolved to the linear layers only.
    runtime = subprocess.run([sys.executable, "-m", "compiler.cli", "compile", str(recipe), "--out",
                              str(tmp_path / "b")], cwd=REPO, env=_env(cache, HF_HUB_OFFLINE="1"),
                             capture_output=True, text=True, timeout=300)
    assert runtime.returncode == 0, runtime.stderr
    targets = json.loads((tmp_path / "b" / "runtime.json").read_text())["stages"][0]["adapter"]["params"]["targets"]
    assert set(targets) == {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("offline", [False, True], ids=["unreachable", "offline"])
def test_unreachable_hub_and_no_cache_fails_fast_with_the_ways_out(tmp_path: Path, offline: bool):
    recipe = _recipe(tmp_path, "Qwen/Qwen3-0.6B", revision="v1")
    extra = {"HF_HUB_OFFLINE": "1"} if offline else {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    env = _env(tmp_path / "empty" / "hub", HF_TOKEN=SECRET, **extra)
    start = time.monotonic()
    done = _cli(env, "validate", str(recipe), timeout=60)
    elapsed = time.monotonic() - start
    assert done.returncode == 1, done.stderr
    assert elapsed < 5, elapsed
    assert "Traceback" not in done.stderr and SECRET not in done.stderr
    line = next(ln for ln in done.stderr.splitlines() if "Qwen/Qwen3-0.6B" in ln)
    assert "revision v1" in line and "network" in line and "HF_HUB_OFFLINE=1" in line and "config =" in line


def test_multimodal_gemma_3_from_the_hub_plans_its_language_model_and_counts_the_tower(tmp_path: Path):
    import tomllib

    cache = tmp_path / "hf" / "hub"
    config = tomllib.loads((REPO / "specs" / "models" / "gemma-3-4b.toml").read_text())["config"]
    write_hub_cache(cache, "someone/gemma-3-4b-finetune", {"config.json": json.dumps(config)})
    recipe = _recipe(tmp_path, "someone/gemma-3-4b-finetune")
    data = json.loads(recipe.read_text())
    data["template"]["chat"] = "chatml"
    recipe.write_text(json.dumps(data))
    done = _cli(_env(cache, HF_HUB_OFFLINE="1"), "plan", str(recipe), "--json")
    assert done.returncode == 0, done.stderr
    model = json.loads(done.stdout)["model"]
    assert model["family"] == "gemma3_text"
    assert model["counted_by"] == "formula, equal to the meta model"  # the language model's meta model
    assert model["parameters"]["vision"] == 419_816_304  # tests/test_estimate.py counts it by hand
    assert model["parameters"]["total"] == 3_880_263_168 + 419_816_304
