"""Architecture and hardware facts: the data files under specs/models and specs/hardware.

A recipe names a catalog entry (or a local config.json) instead of downloading a checkpoint, so a
70B recipe can be planned on a laptop. Only the standard library is used: `recipe validate` reads
these files.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from compiler.estimation.families import FAMILIES, family_of, text_config
from compiler.estimation.vision import vision_config
from runtime.contract.paths import specs_dir

class CatalogError(Exception):
    """A catalog file or config.json that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class ModelFacts:
    """What planning needs to know about an architecture, read from its config.json fields."""

    name: str
    family: str
    config: dict[str, Any]
    hub: str | None = None
    parameters: int | None = None  # published total, when the catalog records it
    chat_template: str | None = None
    vision: dict[str, Any] | None = None  # a multimodal checkpoint's vision_config (its tower is not trained)

    def _get(self, *keys: str, default: Any = None) -> Any:
        for key in keys:
            if key in self.config:
                return self.config[key]
        return default

    @property
    def hidden_size(self) -> int:
        return int(self._get("hidden_size", "n_embd"))

    @property
    def num_layers(self) -> int:
        return int(self._get("num_hidden_layers", "num_layers", "n_layer"))

    @property
    def num_heads(self) -> int:
        return int(self._get("num_attention_heads", "n_head"))

    @property
    def num_kv_heads(self) -> int:
        if self.family == "chatglm":
            return int(self.config["multi_query_group_num"]) if self.config.get("multi_query_attention") else self.num_heads
        return int(self._get("num_key_value_heads", default=self.num_heads) or self.num_heads)

    @property
    def head_dim(self) -> int:
        explicit = self._get("head_dim", "kv_channels")
        return int(explicit) if explicit else self.hidden_size // self.num_heads

    @property
    def vocab_size(self) -> int:
        return int(self._get("padded_vocab_size", "vocab_size"))

    @property
    def max_positions(self) -> int:
        return int(self._get("max_position_embeddings", "seq_length", "n_positions", "max_seq_len", default=0) or 0)

    @property
    def modelled(self) -> bool:
        """True when the closed-form estimator knows this family; else planned from the meta model."""
        return self.family in FAMILIES

    @property
    def linear_modules(self) -> tuple[str, ...]:
        return FAMILIES[self.family].linear_modules if self.modelled else ()

    @property
    def block_submodules(self) -> tuple[str, ...]:
        return FAMILIES[self.family].block_submodules if self.modelled else ()


@cache
def model_catalog() -> dict[str, Path]:
    """Catalog entry name (and alias) -> its file under specs/models."""
    out: dict[str, Path] = {}
    for path in sorted((specs_dir() / "models").glob("*.toml")):
        out[path.stem] = path
        try:
            aliases = tomllib.loads(path.read_text(encoding="utf-8")).get("aliases", [])
        except tomllib.TOMLDecodeError as exc:
            raise CatalogError(f"{path.name}: invalid TOML: {exc}") from None
        for alias in aliases:
            out.setdefault(alias, path)
    return out


@cache
def load_model_facts(name: str) -> ModelFacts:
    """The catalog entry `name` (or alias)."""
    path = model_catalog()[name]
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    config = dict(raw["config"])
    return ModelFacts(
        name=name,
        family=raw["family"],
        config=text_config(config),
        hub=raw.get("hub"),
        parameters=raw.get("parameters"),
        chat_template=raw.get("chat_template") or None,
        vision=vision_config(config),
    )


def catalog_name_for_hub(hub: str) -> str | None:
    """The catalog entry whose name, alias or hub repository matches a hub name, if any."""
    wanted = hub.rsplit("/", 1)[-1].lower()
    names = model_catalog()
    if wanted in names:
        return wanted
    for name, path in names.items():
        if name == path.stem and load_model_facts(name).hub and load_model_facts(name).hub.lower() == hub.lower():
            return name
    return None


def facts_from_config_json(path: Path, shown: str | None = None) -> ModelFacts:
    """Architecture facts from a Hugging Face config.json; raises CatalogError naming the problem.
    `shown` is how messages name the file (as the user wrote it)."""
    shown = shown or str(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"cannot read {shown}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{shown} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(config, dict):
        raise CatalogError(f"{shown} must hold a JSON object")
    return facts_from_config(config, path.parent.name or path.stem, shown)


def facts_from_config(config: dict[str, Any], name: str, shown: str, hub: str | None = None) -> ModelFacts:
    """Architecture facts of a config.json's contents. A model_type without formulas is accepted
    here (the generic family); compile builds it on the meta device and refuses what transformers
    does not implement."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CatalogError(f"{shown} has no model_type; it is not a Hugging Face model config.json")
    text = text_config(config)
    return ModelFacts(name=name, family=family_of(text), config=text, hub=hub, vision=vision_config(config))


@dataclass(frozen=True)
class Accelerator:
    """One device model from specs/hardware (a GPU, or `cpu`)."""

    name: str
    memory_gib: float
    peak_tflops: dict[str, float]
    bf16_supported: bool
    usd_per_hour: float
    mfu: float = 0.40
    memory_bandwidth_gb_per_s: float = 0.0
    # what a process holds besides the training step (the CUDA context, or on CPU the interpreter,
    # torch, the tokenizer and the data); None: the estimator's CUDA default on a GPU
    process_overhead_gib: float | None = None
    # fixed time per micro-batch, and per block in it, beside the FLOPs (`recipe hardware probe`)
    step_overhead_s: float = 0.0
    layer_overhead_s: float = 0.0


@cache
def hardware_catalog() -> dict[str, Path]:
    return {p.stem: p for p in sorted((specs_dir() / "hardware").glob("*.toml"))}


@cache
def load_accelerator(name: str) -> Accelerator:
    """The catalog entry `name` (a file stem under specs/hardware)."""
    return accelerator_from_file(hardware_catalog()[name])


def accelerator_from_file(path: Path) -> Accelerator:
    """A hardware file's figures (specs/hardware/*.toml, or one `recipe hardware probe` wrote)."""
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    return Accelerator(
        name=raw["name"],
        memory_gib=float(raw["memory_gib"]),
        peak_tflops={k: float(v) for k, v in raw["peak_tflops"].items()},
        bf16_supported=bool(raw.get("bf16_supported", True)),
        usd_per_hour=float(raw["usd_per_hour"]),
        mfu=float(raw.get("mfu", 0.40)),
        memory_bandwidth_gb_per_s=float(raw.get("memory_bandwidth_gb_per_s", 0.0)),
        process_overhead_gib=float(raw["process_overhead_gib"]) if "process_overhead_gib" in raw else None,
        step_overhead_s=float(raw.get("step_overhead_s", 0.0)),
        layer_overhead_s=float(raw.get("layer_overhead_s", 0.0)),
    )


# Catalog families whose block structure the calibrated activation coefficients describe.
_ACTIVATION_FAMILY = {"gpt2": "gpt2"}  # every other family: the Llama-block fits


@cache
def activation_coefficients(family: str) -> dict[str, dict[str, float]]:
    """{key: coefficients} from specs/estimates/activations.toml, keyed by precision and mode
    ("bf16", "bf16_pure", ...); fp16 uses the bf16 fits (the same widths)."""
    raw = tomllib.loads((specs_dir() / "estimates" / "activations.toml").read_text(encoding="utf-8"))
    fits = raw.get(_ACTIVATION_FAMILY.get(family, "llama"), {})
    out = {key: dict(values) for key, values in fits.items()}
    for key in list(out):
        if key.startswith("bf16"):
            out.setdefault("fp16" + key[len("bf16"):], out[key])
    return out
