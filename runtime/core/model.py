"""Model construction: scratch or pretrained weights, the planned adapter, a scalar head.

Everything here is transformers + peft: a scratch GPT-2 is transformers' own implementation, a
pretrained model is whatever `AutoModelForCausalLM` loads, adapters are peft's (LoRA, prefix
tuning / P-tuning v2) or plain `requires_grad` switches (freeze), and a reward model or critic is
transformers' `AutoModelForSequenceClassification` with one output.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from runtime.contract.config import AdapterSpec, HardwareSpec, ModelSpec


class ModelLoadError(Exception):
    """The planned weights cannot be loaded; the message says which and how to fix it."""


def build_model(spec: ModelSpec) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 of the planned shape (transformers' own implementation)."""
    c = spec.config
    config = GPT2Config(
        vocab_size=spec.vocab_size,
        n_positions=spec.n_positions,
        n_embd=c["n_embd"],
        n_layer=c["n_layer"],
        n_head=c["n_head"],
        resid_pdrop=c["resid_pdrop"],
        embd_pdrop=c["embd_pdrop"],
        attn_pdrop=c["attn_pdrop"],
        bos_token_id=spec.eos_token_id,
        eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


# The dtype frozen weights are held in, by the build's precision: the working precision itself.
FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model(spec: ModelSpec, hardware: HardwareSpec, *, frozen: bool = False) -> PreTrainedModel:
    """The stage's starting model: scratch, or pretrained weights from a path, an asset or the hub.

    A model that trains whole (`frozen` false) stays fp32: mixed precision comes from autocast over
    fp32 master weights. The base of an adapter and a frozen reference (`frozen`) are held in the
    working precision (bf16, fp16), and quantized by bitsandbytes when the build asks for it
    (`model.quantization`): 2 bytes, or 4 or 8 bits, per frozen weight, as the plan counts them.
    `keep_fp32_masters` later gives whatever an adapter trains its fp32 copy."""
    dtype = FROZEN_DTYPES[hardware.precision] if frozen else torch.float32
    if spec.init == "scratch":
        model = build_model(spec).to(dtype)
    else:
        weights = spec.weights
        if weights is None:
            raise ModelLoadError("the build has a pretrained model without weights; recompile the recipe")
        source, kwargs = _weights_source(weights)
        if frozen and spec.quantization != "none":
            kwargs.update(quantized_loading(spec, hardware))
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, trust_remote_code=spec.trust_remote_code, dtype=dtype,
                attn_implementation=hardware.attention, **kwargs,
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load pretrained weights from {source}: {exc}") from exc
    model.config._attn_implementation = hardware.attention
    if hardware.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def quantized_loading(spec: ModelSpec, hardware: HardwareSpec) -> dict:
    """`from_pretrained` arguments that quantize the base as QLoRA does (Dettmers et al. 2023):
    4-bit NF4 with double quantization, computing in the working precision; or LLM.int8 8-bit.
    The weights are quantized as they load, on the device the run trains on. transformers keeps
    the output layer at the working width (`llm_int8_skip_modules` default)."""
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it; refused with the install hint if absent)
    except ImportError:
        raise ModelLoadError(f'model.quantization = "{spec.quantization}" needs bitsandbytes: '
                             "pip install 'recipe[qlora]'") from None
    from transformers import BitsAndBytesConfig

    if spec.quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=FROZEN_DTYPES[hardware.precision])
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    device = torch.cuda.current_device() if hardware.device == "cuda" else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


def is_quantized(model: nn.Module) -> bool:
    """Whether bitsandbytes quantized the model's base (its dtype can no longer be changed)."""
    return bool(getattr(hf_model(model), "is_quantized", False))


def hold_in_precision(model: PreTrainedModel, hardware: HardwareSpec, *, trains_whole: bool) -> PreTrainedModel:
    """`model` (an earlier stage's output) in the dtype `load_model` would give it: fp32 when it
    trains whole, the working precision when it is frozen or an adapter trains on top of it."""
    if is_quantized(model):
        return model
    return model.to(torch.float32 if trains_whole else FROZEN_DTYPES[hardware.precision])


def keep_fp32_masters(model: nn.Module) -> nn.Module:
    """Hold every trainable parameter in fp32: the master copy the optimizer updates, which
    autocast casts to the working precision as each layer computes. Frozen weights keep theirs."""
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def _weights_source(weights) -> tuple[str, dict]:
    if weights.path:
        path = Path(weights.path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model.path {weights.path} has no config.json (resolved from {os.getcwd()}); "
                "run from the directory you compiled in, or point model.path at a checkpoint folder"
            )
        return str(path), {}
    if weights.asset:
        return str(converted_asset(weights.asset)), {}
    kwargs = {"revision": weights.revision} if weights.revision else {}
    return weights.hub, kwargs


def converted_asset(name: str) -> Path:
    """A pinned GGUF checkpoint, dequantised once into a safetensors folder in the asset cache.

    Loading the GGUF through transformers takes tens of seconds; the converted folder reloads in
    about one. The conversion is written to a temporary folder and renamed, under the asset lock,
    so concurrent runs neither repeat nor corrupt it."""
    from runtime.contract.assets import AssetError, cache_dir, cached_asset, load_catalog

    catalog = load_catalog()
    if name not in catalog:
        raise ModelLoadError(f"unknown model asset {name!r}; known: {', '.join(sorted(catalog))}")
    spec = catalog[name]
    folder = cache_dir() / "derived" / f"model-gguf-{spec.sha256[:16]}"
    if (folder / "config.json").is_file():
        return folder
    try:
        gguf = cached_asset(spec)
    except AssetError as exc:
        raise ModelLoadError(str(exc)) from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights were dequantised on load; saving them is saving a plain fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)  # the saved weights are plain fp32 now
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first; its folder is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------
# adapters


def transformer_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The model's list of decoder blocks (`transformer.h` for GPT-2, `model.layers` for Llama; a
    multimodal checkpoint's language model, whose config is its text config)."""
    n = model.config.get_text_config().num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder blocks of {type(model).__name__}")


def compile_blocks(model: nn.Module) -> None:
    """`train.compile`: torch.compile each decoder block in place, not the whole model.

    One block's graph is compiled once and reused by every layer of the same shape, where a
    whole-model graph would break at every data-dependent branch of the loss and generation.
    `dynamic=True` marks the sequence length dynamic, so batches of other lengths reuse the graph
    instead of recompiling. Compiling in place (nn.Module.compile) keeps the parameter names, so
    checkpoints and saved stages are those of the uncompiled model."""
    for block in transformer_blocks(hf_model(model)):
        block.compile(dynamic=True)


def apply_adapter(model: PreTrainedModel, adapter: AdapterSpec, *, scalar: bool = False) -> nn.Module:
    """Make exactly the planned parameters trainable; returns the model to train (peft-wrapped or not).

    `scalar`: the model is a reward model or critic (a sequence-classification model with a
    one-output `score` head), whose head is always trained, whatever the adapter."""
    p = adapter.params
    if adapter.kind == "full":
        if p.get("exclude_modules"):  # a multimodal checkpoint's vision tower: loaded, not trained
            for name, module in model.named_modules():
                if re.fullmatch(p["exclude_modules"], name):
                    module.requires_grad_(False)
        return model
    if adapter.kind == "freeze":
        model.requires_grad_(False)
        blocks = transformer_blocks(model)
        chosen = p["trainable_layers"]
        indices = range(len(blocks) - chosen, len(blocks)) if isinstance(chosen, int) else sorted(set(chosen))
        for i in indices:
            block = blocks[i]
            if p.get("trainable_modules"):
                for name, module in block.named_modules():
                    if name.split(".")[-1] in p["trainable_modules"]:
                        module.requires_grad_(True)
            else:
                block.requires_grad_(True)
        if p.get("train_embeddings"):
            model.get_input_embeddings().requires_grad_(True)
            position = getattr(getattr(model, "transformer", None), "wpe", None)  # GPT-2 learned positions
            if position is not None:
                position.requires_grad_(True)
        if scalar:
            model.score.requires_grad_(True)
        return keep_fp32_masters(model)
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    if adapter.kind == "lora":
        # SEQ_CLS makes peft train and save the new `score` head along with the low-rank matrices.
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS if scalar else TaskType.CAUSAL_LM, r=p["rank"], lora_alpha=p["alpha"], lora_dropout=p["dropout"],
            target_modules=p["targets"], exclude_modules=p.get("exclude_modules"), bias=p["bias"], use_rslora=p["rslora"],
            # routed experts stored as 3-D tensors: one LoRA pair per expert (peft's ParamWrapper)
            target_parameters=p.get("expert_targets") or None,
            fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2 stores Conv1D weights transposed
        )
    elif adapter.kind == "prefix":
        if scalar:
            raise ValueError("prefix tuning trains language models only; give the reward or ppo stage a lora, "
                             "freeze or full adapter")
        config = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=p["num_virtual_tokens"],
            prefix_projection=p["projection"],
            encoder_hidden_size=p.get("projection_hidden_size") or model.config.hidden_size,
        )
    else:
        raise ValueError(f"unknown adapter kind {adapter.kind!r}")
    # Not peft's prepare_model_for_kbit_training for a quantized base: besides freezing it (which
    # get_peft_model does) it casts the embeddings, norms and output layer to fp32, doubling them
    # against the plan, and its input gradients serve reentrant checkpointing, which is not used.
    return keep_fp32_masters(get_peft_model(model, config))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return total, trainable


def hf_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---------------------------------------------------------------------------------------------
# scalar models: reward models and critics


def scalar_model(causal: PreTrainedModel, seed: int) -> PreTrainedModel:
    """A one-output sequence-classification model with `causal`'s decoder weights and a fresh head.

    The head starts as N(0, 1/sqrt(hidden + 1)), as in Stiennon et al. 2020 (the reward models of
    OpenAI's lm-human-preferences), seeded so every rank and every attempt starts the same."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    config.problem_type = "regression"
    config.architectures = None
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=config._attn_implementation,
                                                           dtype=causal.dtype)
    model.base_model.load_state_dict(causal.base_model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = model.score.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) / math.sqrt(config.hidden_size + 1))
        if getattr(model.score, "bias", None) is not None:
            model.score.bias.zero_()
    if getattr(causal, "is_activation_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def is_scalar(model: nn.Module) -> bool:
    """Whether `model` (or the transformers model in its peft wrapper) has a scalar `score` head."""
    return hasattr(hf_model(model), "score")
