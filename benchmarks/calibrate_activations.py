"""Fit the activation coefficients of the analytical memory model to simulated training steps.

    .venv/bin/python benchmarks/calibrate_activations.py [--write]

For each family, precision and way of holding the weights (MODES below: fp32 weights under
autocast, half-precision weights, LoRA over a frozen base, bitsandbytes-quantized base), small
models are stepped on fake tensors (`compiler.estimation.precise`:
FakeTensorMode + MemTracker, the real transformers code) at two depths; the growth per layer,
divided by the tokens in the batch, is the activation memory one layer saves per token. Varying
the hidden size, the MLP width, the key/value width and the sequence length one at a time gives
the coefficient of each. `--write` stores them in specs/estimates/activations.toml, which the
compiler reads. Prints every fit and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

from compiler.estimation.catalog import ModelFacts  # noqa: E402
from compiler.estimation.estimate import AUTOCAST_WEIGHT_COPY_BYTES  # noqa: E402
from compiler.estimation.params import architecture, block_parameters  # noqa: E402
from compiler.estimation.precise import simulate_step  # noqa: E402

BATCH = 2
OUT = REPO / "specs" / "estimates" / "activations.toml"


def _llama(h: int, inter: int, kv_heads: int, layers: int) -> dict:
    return {"model_type": "llama", "hidden_size": h, "intermediate_size": inter, "num_attention_heads": 4,
            "num_key_value_heads": kv_heads, "num_hidden_layers": layers, "vocab_size": 512,
            "max_position_embeddings": 8192, "tie_word_embeddings": True}


def _gpt2(h: int, layers: int, dropout: float) -> dict:
    return {"model_type": "gpt2", "n_embd": h, "n_layer": layers, "n_head": 4, "vocab_size": 512,
            "n_positions": 1024, "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout,
            "bos_token_id": 0, "eos_token_id": 0}


# The ways a step can hold its weights, each fitted separately (keys of activations.toml):
#   "<precision>"        fp32 weights; bf16/fp16 under autocast (the runtime's own full fine-tuning)
#   "<precision>_pure"   weights stored in the half-precision dtype, no autocast (DeepSpeed's bf16
#                        engine, LitGPT's bf16-true, torchtune): the residual stream is half precision
#   "..._lora"           LoRA (peft's default targets for these models, q_proj and v_proj, rank 8, no
#                        dropout) on a frozen half-precision base: a frozen linear keeps no input
#   "..._qlora"          the same with bitsandbytes-quantized base layers, which keep their inputs
MODES: dict[str, dict] = {
    "": {},
    "_pure": {"master_weights": False},
    "_pure_lora": {"master_weights": False, "adapter": {"kind": "lora", "rank": 8, "targets": ["q_proj", "v_proj"]}},
    "_pure_qlora": {"master_weights": False, "quantization": "4bit",
                    "adapter": {"kind": "lora", "rank": 8, "targets": ["q_proj", "v_proj"]}},
}


def _autocast_copies(make, precision: str, mode: dict) -> float:
    """Bytes of the half-precision weight copies autocast keeps per layer (0 without autocast)."""
    if precision == "fp32" or mode.get("master_weights") is False:
        return 0.0
    config = make(1)
    facts = ModelFacts(name="calibration", family=config["model_type"], config=config)
    return AUTOCAST_WEIGHT_COPY_BYTES * block_parameters(architecture(facts))


def _forward_activations(config: dict, seq_len: int, precision: str, mode: dict) -> int:
    return simulate_step(config, micro_batch_size=BATCH, seq_len=seq_len, supervised_per_example=1,
                         precision=precision, **mode).forward_activations_bytes


def outside_layers_token(make, seq_len: int, precision: str, per_layer: float, hidden: int, mode: dict) -> float:
    """Bytes per token and per hidden unit saved outside the blocks (embeddings, final norm, head input)."""
    measured = _forward_activations(make(2), seq_len, precision, mode) - 2 * _autocast_copies(make, precision, mode)
    return (measured / (BATCH * seq_len) - 2 * per_layer) / hidden


def per_layer_token(make, seq_len: int, precision: str, mode: dict) -> float:
    """Activation bytes one layer adds per token: (A(4 layers) - A(2 layers)) / 2 / tokens.

    Under bf16 autocast each layer's weights are also cast once and kept for the backward pass
    (2 bytes per parameter, not per token); that part is taken out first and modelled separately."""
    a2 = _forward_activations(make(2), seq_len, precision, mode)
    a4 = _forward_activations(make(4), seq_len, precision, mode)
    per_layer = (a4 - a2) / 2 - _autocast_copies(make, precision, mode)
    return per_layer / (BATCH * seq_len)


def fit_llama(precision: str, mode: dict) -> dict[str, float]:
    s = 128
    base = per_layer_token(lambda n: _llama(128, 256, 4, n), s, precision, mode)
    wider = per_layer_token(lambda n: _llama(256, 256, 4, n), s, precision, mode)  # h and kv width +128
    mlp = per_layer_token(lambda n: _llama(128, 512, 4, n), s, precision, mode)  # I +256
    gqa = per_layer_token(lambda n: _llama(128, 256, 1, n), s, precision, mode)  # kv width 128 -> 32
    longer = per_layer_token(lambda n: _llama(128, 256, 4, n), 2 * s, precision, mode)  # s +128
    per_intermediate = (mlp - base) / 256
    per_kv = (base - gqa) / 96
    per_hidden = (wider - base) / 128 - per_kv
    per_position = (longer - base) / s
    constant = base - per_hidden * 128 - per_intermediate * 256 - per_kv * 128 - per_position * s
    outside = outside_layers_token(lambda n: _llama(128, 256, 4, n), s, precision, base, 128, mode)
    fit = {"per_hidden": per_hidden, "per_intermediate": per_intermediate, "per_kv": per_kv,
           "per_position": per_position, "outside_per_hidden": outside, "residual_bytes": constant}
    if "adapter" in mode:  # LoRA dropout keeps each wrapped layer's dropped input and mask: q_proj, v_proj, 2 x 128
        dropped = per_layer_token(lambda n: _llama(128, 256, 4, n), s, precision,
                                  {**mode, "adapter": {**mode["adapter"], "dropout": 0.05}})
        fit["lora_dropout_per_input"] = (dropped - base) / (2 * 128)
    return fit


def fit_gpt2(precision: str, mode: dict) -> dict[str, float]:
    s = 128
    base = per_layer_token(lambda n: _gpt2(128, n, 0.0), s, precision, mode)
    wider = per_layer_token(lambda n: _gpt2(256, n, 0.0), s, precision, mode)
    longer = per_layer_token(lambda n: _gpt2(128, n, 0.0), 2 * s, precision, mode)
    dropped = per_layer_token(lambda n: _gpt2(128, n, 0.1), s, precision, mode)
    per_hidden = (wider - base) / 128  # the MLP (4h) is part of the hidden-size term for GPT-2
    per_position = (longer - base) / s
    outside = outside_layers_token(lambda n: _gpt2(128, n, 0.0), s, precision, base, 128, mode)
    return {"per_hidden": per_hidden, "per_intermediate": 0.0, "per_kv": 0.0, "per_position": per_position,
            "dropout_per_hidden": (dropped - base) / 128, "outside_per_hidden": outside,
            "residual_bytes": base - per_hidden * 128 - per_position * s}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help=f"write {OUT.relative_to(REPO)}")
    args = parser.parse_args()
    fits = {}
    for precision, suffix in (("fp32", ""), ("bf16", ""), ("bf16", "_pure"), ("bf16", "_pure_lora"),
                              ("bf16", "_pure_qlora")):
        key = precision + suffix
        fits[f"llama.{key}"] = fit_llama(precision, MODES[suffix])
        if "lora" not in suffix:  # GPT-2's Conv1D layers are not what LoRA and bitsandbytes target here
            fits[f"gpt2.{key}"] = fit_gpt2(precision, MODES[suffix])
        for family in ("llama", "gpt2"):
            if f"{family}.{key}" in fits:
                print(family, key, {k: round(v, 2) for k, v in fits[f"{family}.{key}"].items()})
    if args.write:
        lines = ["# Activation bytes saved per token and per layer, fitted by benchmarks/calibrate_activations.py",
                 "# from simulated training steps (FakeTensorMode + MemTracker, transformers' own code, SDPA",
                 "# attention, CPU kernels). Regenerate with: python benchmarks/calibrate_activations.py --write",
                 "# llama coefficients also serve mistral, qwen2 and chatglm (same block: RMSNorm, rotary, gated MLP).",
                 "# Keys: <precision> (fp32 weights, autocast), <precision>_pure (half-precision weights, no",
                 "# autocast), _pure_lora (LoRA on q_proj/v_proj over a frozen half-precision base), _pure_qlora",
                 "# (the same with bitsandbytes-style quantized layers, which keep their inputs for backward).", ""]
        for key, values in fits.items():
            lines.append(f"[{key}]")
            lines += [f"{name} = {round(value, 3)}" for name, value in values.items() if name != "residual_bytes"]
            lines.append("")
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text("\n".join(lines), encoding="utf-8")
        print(f"wrote {OUT}")
    print(json.dumps({k: {n: round(v, 3) for n, v in f.items()} for k, f in fits.items()}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
