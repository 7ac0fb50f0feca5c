"""The model catalog (specs/models) and the hardware catalog (specs/hardware) are well formed and
their numbers hold up: every published parameter count is reproduced from the stored config, by
building the model on the meta device (no memory, no weights) or, for ChatGLM, by an independent
formula; every LoRA target names a real projection module inside a decoder layer."""

from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "specs" / "models"
HARDWARE_DIR = REPO / "specs" / "hardware"

MODEL_KEYS = ["name", "hub", "aliases", "family", "parameters", "lora_targets", "chat_template", "license", "config"]
NATIVE_FAMILIES = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma2", "gemma3_text", "phi3", "olmo2",
                   "mixtral", "qwen3_moe", "qwen2_moe"}  # implemented by transformers itself
FAMILIES = NATIVE_FAMILIES | {"chatglm"}
CHAT_TEMPLATES = {"chatml", "llama3", "llama2", "chatglm3", "alpaca", ""}
CHATGLM_MODULES = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
HARDWARE_KEYS = [
    "name",
    "vendor",
    "memory_gib",
    "memory_bandwidth_gb_per_s",
    "peak_tflops",
    "bf16_supported",
    "interconnect",
    "mfu",
    "usd_per_hour",
]

MODEL_FILES = sorted(MODELS_DIR.glob("*.toml"))
HARDWARE_FILES = sorted(p for p in HARDWARE_DIR.glob("*.toml") if p.stem != "cpu")  # GPUs; cpu is tested below


def _load(path: Path) -> dict:
    with path.open("rb") as handle:
        return tomllib.load(handle)


def _family(path: Path) -> str:
    return _load(path)["family"]


NATIVE_MODEL_FILES = [path for path in MODEL_FILES if _family(path) in NATIVE_FAMILIES]
CHATGLM_MODEL_FILES = [path for path in MODEL_FILES if _family(path) == "chatglm"]


@lru_cache(maxsize=None)
def _meta_model(stem: str) -> torch.nn.Module:
    """The model described by specs/models/<stem>.toml, built without allocating any weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**_load(MODELS_DIR / f"{stem}.toml")["config"])
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _first_decoder_layer(model: torch.nn.Module, family: str) -> torch.nn.Module:
    if family == "gpt2":
        return model.transformer.h[0]
    if hasattr(model.model, "language_model"):  # a multimodal checkpoint: the language model's blocks
        return model.model.language_model.layers[0]
    return model.model.layers[0]


def _chatglm_parameter_count(config: dict) -> int:
    """ChatGLM2/3 (THUDM modeling_chatglm.py), counted from its config by hand."""
    hidden = config["hidden_size"]
    vocab = config["padded_vocab_size"]
    ffn = config["ffn_hidden_size"]
    assert config["multi_query_attention"] and config["rmsnorm"] and config["post_layer_norm"]
    assert config["add_qkv_bias"] and not config["add_bias_linear"] and not config["tie_word_embeddings"]
    qkv_width = hidden + 2 * config["kv_channels"] * config["multi_query_group_num"]
    per_layer = (
        hidden  # input_layernorm (RMSNorm: weight only)
        + hidden * qkv_width + qkv_width  # self_attention.query_key_value, with bias
        + hidden * hidden  # self_attention.dense, no bias
        + hidden  # post_attention_layernorm
        + hidden * 2 * ffn  # mlp.dense_h_to_4h (gate and up fused), no bias
        + ffn * hidden  # mlp.dense_4h_to_h, no bias
    )
    embedding = vocab * hidden  # embedding.word_embeddings
    final_norm = hidden  # encoder.final_layernorm
    output_layer = vocab * hidden  # untied; rotary embeddings hold no parameters
    return embedding + config["num_layers"] * per_layer + final_norm + output_layer


def test_catalogs_are_not_empty():
    assert len(MODEL_FILES) >= 16
    assert len(HARDWARE_FILES) >= 10
    assert CHATGLM_MODEL_FILES


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_model_entry_is_well_formed(path):
    entry = _load(path)
    assert list(entry) == MODEL_KEYS
    assert entry["name"] == path.stem
    assert entry["family"] in FAMILIES
    assert entry["chat_template"] in CHAT_TEMPLATES
    assert isinstance(entry["parameters"], int) and entry["parameters"] > 0
    assert entry["lora_targets"] and all(isinstance(t, str) and t for t in entry["lora_targets"])
    assert all(isinstance(a, str) and a != entry["name"] for a in entry["aliases"])
    assert "/" in entry["hub"] and entry["license"]
    config = entry["config"]
    assert config["architectures"] and config["model_type"]
    assert "transformers_version" not in config and "_name_or_path" not in config


def test_model_names_and_aliases_are_unique():
    names = [_load(path)["name"] for path in MODEL_FILES]
    aliases = [alias for path in MODEL_FILES for alias in _load(path)["aliases"]]
    everything = names + aliases
    assert len(everything) == len(set(everything))


@pytest.mark.parametrize("path", NATIVE_MODEL_FILES, ids=lambda p: p.stem)
def test_parameter_count_matches_published(path):
    entry = _load(path)
    model = _meta_model(path.stem)
    assert model.config.model_type == entry["config"]["model_type"]
    assert type(model).__name__ in entry["config"]["architectures"]
    # parameters() yields a tied embedding once, as the published counts do.
    assert sum(p.numel() for p in model.parameters()) == entry["parameters"]


@pytest.mark.parametrize("path", CHATGLM_MODEL_FILES, ids=lambda p: p.stem)
def test_chatglm_parameter_count_matches_published(path):
    entry = _load(path)
    assert _chatglm_parameter_count(entry["config"]) == entry["parameters"]


@pytest.mark.parametrize("path", NATIVE_MODEL_FILES, ids=lambda p: p.stem)
def test_lora_targets_name_linear_modules_of_a_decoder_layer(path):
    from transformers.pytorch_utils import Conv1D

    entry = _load(path)
    layer = _first_decoder_layer(_meta_model(path.stem), entry["family"])
    suffixes = {
        name.rsplit(".", 1)[-1]
        for name, module in layer.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D))
    }
    missing = set(entry["lora_targets"]) - suffixes
    assert not missing, f"not a Linear/Conv1D in the first decoder layer: {sorted(missing)}"


@pytest.mark.parametrize("path", CHATGLM_MODEL_FILES, ids=lambda p: p.stem)
def test_chatglm_lora_targets_are_known_modules(path):
    assert set(_load(path)["lora_targets"]) <= CHATGLM_MODULES


@pytest.mark.parametrize("path", HARDWARE_FILES, ids=lambda p: p.stem)
def test_hardware_entry_is_well_formed(path):
    entry = _load(path)
    assert list(entry) == HARDWARE_KEYS
    assert entry["name"] == path.stem
    assert entry["vendor"] == "nvidia"
    assert entry["memory_gib"] > 0
    assert entry["memory_bandwidth_gb_per_s"] > 0
    peak = entry["peak_tflops"]
    assert "fp32" in peak
    assert all(value > 0 for value in peak.values())
    assert ("bf16" in peak) == entry["bf16_supported"]
    assert entry["interconnect"] and isinstance(entry["interconnect"], str)
    assert entry["usd_per_hour"] > 0
    assert 0 < entry["mfu"] <= 1


# what `recipe hardware probe` measures besides the GPU files' keys, before the price
MEASURED_KEYS = ["step_overhead_s", "layer_overhead_s", "process_overhead_gib"]


def test_cpu_entry_describes_the_test_machine_class():
    entry = _load(HARDWARE_DIR / "cpu.toml")
    assert list(entry) == HARDWARE_KEYS[:-1] + MEASURED_KEYS + HARDWARE_KEYS[-1:]
    assert entry["memory_gib"] == 0  # host memory unknown: no verdict
    # measured, so at most the theoretical peak: 2 cores x 4 GHz (the boost clock's ceiling; the base is
    # 2.6 GHz) x 32 fp32 FLOP per cycle (two 8-wide FMA pipes) = 256 GFLOP/s
    assert 0 < entry["peak_tflops"]["fp32"] <= 2 * 4.0e9 * 32 / 1e12
    assert 0.1 < entry["process_overhead_gib"] < 2  # an interpreter with torch and transformers imported
