"""The analytical activation model against simulated training steps on fake tensors.

`compiler.estimation.precise` runs transformers' own model code under FakeTensorMode with MemTracker; the
calibrated coefficients in specs/estimates/activations.toml must reproduce what it measures for
configurations they were not fitted on (other widths, depths, batch sizes and lengths)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest

from compiler.estimation.catalog import ModelFacts, activation_coefficients
from compiler.estimation.estimate import ActivationCoefficients, TrainSetup, activation_bytes
from compiler.estimation.params import architecture
from compiler.estimation.precise import simulate_step

warnings.filterwarnings("ignore")

CONFIGS = {
    "llama": {"model_type": "llama", "hidden_size": 192, "intermediate_size": 520, "num_attention_heads": 6,
              "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 300,
              "max_position_embeddings": 4096, "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", "hidden_size": 160, "intermediate_size": 448, "num_attention_heads": 5,
              "num_key_value_heads": 1, "num_hidden_layers": 2, "vocab_size": 300,
              "max_position_embeddings": 4096, "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "n_embd": 192, "n_layer": 3, "n_head": 6, "vocab_size": 300, "n_positions": 1024,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0},
}


LORA = {"kind": "lora", "rank": 8, "targets": ["q_proj", "v_proj"]}
# How a step holds its weights: keyword arguments of simulate_step, and the TrainSetup fields that
# make the estimate choose the matching coefficients (a trainable count below the total is an adapter).
MODES = {
    "autocast": ({}, {}),
    "pure": ({"master_weights": False}, {"master_weights": False}),
    "lora": ({"master_weights": False, "adapter": LORA}, {"master_weights": False, "total_parameters": 2}),
    "qlora": ({"master_weights": False, "adapter": LORA, "quantization": "4bit"},
              {"master_weights": False, "total_parameters": 2, "quantization": "4bit"}),
    "lora_dropout": ({"master_weights": False, "adapter": {**LORA, "dropout": 0.1}},
                     {"master_weights": False, "total_parameters": 2, "lora_dropout_inputs": "q_and_v"}),
}
CASES = [(family, "fp32", "autocast") for family in sorted(CONFIGS)] + [
    (family, "bf16", mode) for family in sorted(CONFIGS) for mode in ("autocast", "pure")] + [
    (family, "bf16", mode) for family in ("llama", "qwen2") for mode in ("lora", "qlora", "lora_dropout")]


@pytest.mark.parametrize(("family", "precision", "mode"), CASES)
def test_calibrated_activations_match_a_simulated_step(family: str, precision: str, mode: str) -> None:
    config = CONFIGS[family]
    batch, seq = 3, 200
    simulated, estimated_fields = MODES[mode]
    measured = simulate_step(config, micro_batch_size=batch, seq_len=seq, supervised_per_example=1,
                             precision=precision, **simulated).forward_activations_bytes
    facts = ModelFacts(name="test", family=family, config=config)
    a = architecture(facts)
    if estimated_fields.get("lora_dropout_inputs") == "q_and_v":  # each wrapped layer drops its own input
        estimated_fields = {**estimated_fields, "lora_dropout_inputs": 2 * a.hidden}
    coefficients = {p: ActivationCoefficients(**v) for p, v in activation_coefficients(family).items()}
    setup = TrainSetup(**{"total_parameters": 1, "trainable_parameters": 1, **estimated_fields},
                       micro_batch_size=batch, seq_len=seq, supervised_per_example=1, precision=precision,
                       device="cpu", coefficients=coefficients)
    estimated = activation_bytes(a, setup)
    if precision != "fp32" and mode == "autocast":  # the simulation counts autocast's weight copies as
        from compiler.estimation.params import block_parameters  # activations; the plan counts them with the weights
        measured -= 2 * block_parameters(a) * a.layers
    # within 8%: the fit is exact on the configurations it was fitted on; these differ in width,
    # heads, depth, batch and length (the largest gap seen is fp32 llama, about 6%)
    assert abs(estimated - measured) / measured < 0.08, (estimated, measured)


@pytest.mark.parametrize(("precision", "master_weights", "residual_bytes"),
                         [("fp32", True, 4), ("bf16", True, 4), ("bf16", False, 2)])
def test_checkpointed_layers_keep_their_input_in_the_residual_streams_dtype(
        precision: str, master_weights: bool, residual_bytes: int) -> None:
    # under autocast the weights, and so the residual additions between blocks, stay fp32: 4 bytes per
    # hidden unit per token per layer; with half-precision weights, 2
    batch, seq, h = 2, 64, 192
    config = CONFIGS["llama"]
    simulated = [simulate_step({**config, "num_hidden_layers": n}, micro_batch_size=batch, seq_len=seq,
                               supervised_per_example=1, precision=precision, master_weights=master_weights,
                               gradient_checkpointing=True).forward_activations_bytes for n in (2, 4)]
    per_layer = (simulated[1] - simulated[0]) / 2  # (checkpointed blocks keep no autocast weight copies)
    assert per_layer == batch * seq * h * residual_bytes
    estimated = [activation_bytes(architecture(ModelFacts(name="t", family="llama", config={
        **config, "num_hidden_layers": n})), TrainSetup(
        total_parameters=1, trainable_parameters=1, micro_batch_size=batch, seq_len=seq, supervised_per_example=1,
        precision=precision, device="cpu", gradient_checkpointing=True, master_weights=master_weights,
        coefficients={p: ActivationCoefficients(**v) for p, v in activation_coefficients("llama").items()}))
        for n in (2, 4)]
    assert (estimated[1] - estimated[0]) / 2 == per_layer


def test_simulated_step_reports_parameters_and_optimizer_state_exactly() -> None:
    config = CONFIGS["llama"]
    result = simulate_step(config, micro_batch_size=1, seq_len=32, supervised_per_example=1)
    a = architecture(ModelFacts(name="test", family="llama", config=config))
    from compiler.estimation.params import parameters

    n = parameters(a).total
    # fp32 weights, plus the rotary inverse frequencies (a 16-value buffer, and its original copy)
    assert result.parameters_bytes == 4 * n + 2 * 16 * 4
    assert result.gradients_bytes == 4 * n  # one fp32 gradient per weight, all alive after backward
    assert result.optimizer_bytes >= 8 * n  # AdamW: two fp32 moments (plus step counters, temporaries)


def test_a_simulated_chunked_loss_saves_what_the_plans_logits_term_says() -> None:
    """The simulated peak of "full" minus that of "chunked" against the same difference of the
    plan's logits terms (3 fp32 values per logit over every supervised position, or one chunk)."""
    from compiler.estimation.estimate import logits_bytes

    config = {**CONFIGS["llama"], "vocab_size": 8192, "num_hidden_layers": 1}
    shape = dict(micro_batch_size=2, seq_len=1024, supervised_per_example=1024)
    full = simulate_step(config, **shape, cross_entropy="full")
    chunked = simulate_step(config, **shape, cross_entropy="chunked", chunk_positions=256)
    a = architecture(ModelFacts(name="test", family="llama", config=config))
    setup = TrainSetup(total_parameters=1, trainable_parameters=1, precision="fp32", device="cpu", **shape)
    planned = (logits_bytes(a, setup) - logits_bytes(a, replace(setup, cross_entropy="chunked",
                                                                  loss_chunk_positions=256)))
    simulated = full.total_bytes - chunked.total_bytes
    assert planned == (2048 - 256) * 8192 * 12
    assert simulated == pytest.approx(planned, rel=0.15)


def test_plan_precise_puts_a_simulated_step_beside_the_estimate(tmp_path) -> None:
    from tests.conftest import base_recipe, run_cli, write_json_recipe

    # a model big enough that weights, optimizer state and activations, not fixed costs, set the peak
    recipe = base_recipe(model={"n_embd": 128, "n_layer": 4, "n_head": 4}, train={"micro_batch_size": 64})
    path = write_json_recipe(tmp_path, recipe)
    result = run_cli("plan", str(path), "--precise", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    row = [line for line in result.stdout.splitlines() if line.startswith("| sft |")][-1]
    analytical, simulated = (float(x) for x in row.split("|")[2:4])
    assert abs(analytical - simulated) / simulated < 0.15
