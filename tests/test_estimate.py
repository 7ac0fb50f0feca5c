"""Parameter counts and memory formulas, checked against transformers / peft models built on the
meta device (no weights are allocated) and against published figures."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from compiler.estimation.catalog import ModelFacts, load_model_facts, model_catalog
from compiler.estimation.estimate import TrainSetup, train_memory
from compiler.estimation.params import architecture, lora_parameters, parameters, prefix_parameters


def _gpt2_facts(n_embd: int, n_layer: int, n_head: int, n_positions: int) -> ModelFacts:
    config = {"model_type": "gpt2", "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head,
              "n_positions": n_positions, "vocab_size": 50257}
    return ModelFacts(name="scratch", family="gpt2", config=config)


@pytest.mark.parametrize(("n_embd", "n_layer", "n_head", "n_positions"),
                         [(128, 4, 4, 64), (512, 6, 8, 111), (768, 12, 12, 1024)])
def test_gpt2_parameters_equal_transformers(n_embd: int, n_layer: int, n_head: int, n_positions: int) -> None:
    config = GPT2Config(vocab_size=50257, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    expected = sum(p.numel() for p in model.parameters())  # the LM head shares the token embedding
    assert parameters(architecture(_gpt2_facts(n_embd, n_layer, n_head, n_positions))).total == expected


_MODELS = sorted(name for name, path in model_catalog().items() if name == path.stem)


@pytest.mark.parametrize("name", _MODELS)
def test_formula_equals_the_published_count_of_every_catalog_model(name: str) -> None:
    facts = load_model_facts(name)
    assert parameters(architecture(facts)).total == facts.parameters


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2-0.5b", "llama-3.1-8b", "gpt2"])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_trainable_count_equals_peft(name: str, targets) -> None:
    from peft import LoraConfig, get_peft_model

    facts = load_model_facts(name)
    if facts.family == "gpt2" and targets != "all-linear":
        targets = ["c_attn"]
    config = AutoConfig.for_model(**facts.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_parameters(architecture(facts), 16, targets) == trainable


def test_qwen2_7b_lora_r32_on_q_and_v_with_grouped_query_shapes() -> None:
    # q: 3584 -> 3584; v: 3584 -> 4 kv heads x 128 = 512. Per layer 32 x (3584 + 3584) + 32 x (3584 + 512).
    a = architecture(load_model_facts("qwen2-7b"))
    assert lora_parameters(a, 32, ["q_proj", "v_proj"]) == 28 * (32 * 7168 + 32 * 4096) == 10_092_544


def test_chatglm3_p_tuning_v2_matches_the_published_trainable_count() -> None:
    # ChatGLM3-6B P-Tuning v2 with pre_seq_len 128 reports 1,835,008 trainable parameters:
    # 128 virtual tokens x 28 layers x 2 (key, value) x 2 groups x 128 channels.
    a = architecture(load_model_facts("chatglm3-6b"))
    assert prefix_parameters(a, 128, projection=False, projection_hidden=None) == 1_835_008


def test_prefix_projection_equals_peft_prefix_encoder() -> None:
    from peft import PrefixTuningConfig, get_peft_model

    facts = load_model_facts("smollm2-135m")
    config = AutoConfig.for_model(**facts.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                                                              prefix_projection=True, encoder_hidden_size=64))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert prefix_parameters(architecture(facts), 20, projection=True, projection_hidden=64) == trainable


def _setup(**changes) -> TrainSetup:
    base = dict(total_parameters=1000, trainable_parameters=1000, micro_batch_size=4, seq_len=64,
                supervised_per_example=1, precision="fp32", device="cpu")
    return TrainSetup(**{**base, **changes})


def test_memory_breakdown_scales_as_documented() -> None:
    a = architecture(_gpt2_facts(64, 2, 2, 64))
    fp32 = train_memory(a, _setup())
    assert (fp32.weights_bytes, fp32.gradients_bytes, fp32.optimizer_bytes) == (4000, 4000, 8000)
    assert fp32.overhead_bytes == 0
    doubled = train_memory(a, _setup(micro_batch_size=8))
    assert doubled.activations_bytes == 2 * fp32.activations_bytes
    bf16 = train_memory(a, _setup(precision="bf16", device="cuda"))
    assert bf16.weights_bytes == 6000  # bf16 working copy + fp32 master
    assert bf16.overhead_bytes > 0
    lora = train_memory(a, _setup(trainable_parameters=10, precision="bf16", device="cuda", quantization="4bit"))
    # 4-bit: half a byte per weight plus one fp32 absmax per block of 64 weights (4 / 64 byte); the
    # 990 frozen weights all fit in the blocks' linear layers here, so all of them are quantized
    assert lora.weights_bytes == int(990 * (0.5 + 4 / 64)) + 10 * 6 == 616 and lora.optimizer_bytes == 80
    double = train_memory(a, _setup(trainable_parameters=10, precision="bf16", device="cuda", quantization="4bit",
                                    double_quantization=True))
    # QLoRA's double quantization: 8-bit absmax per 64 weights, one fp32 constant per 256 blocks
    assert double.weights_bytes == int(990 * (0.5 + 1 / 64 + 4 / (64 * 256))) + 10 * 6 == 570
    zero3 = train_memory(a, _setup(world_size=4, zero_stage=3))
    assert (zero3.weights_bytes, zero3.gradients_bytes, zero3.optimizer_bytes) == (1000, 1000, 2000)
    # two whole blocks are gathered at a time; a GPT-2 block of width 64: c_attn 64x192+192, attention
    # c_proj 64x64+64, c_fc 64x256+256, MLP c_proj 256x64+64, two LayerNorms 2x(64+64) = 49,984 fp32 weights
    assert zero3.gathered_bytes == 2 * 49_984 * 4
    assert zero3.peak_bytes == 1000 + 2 * 49_984 * 4 + 2000 + max(zero3.activations_bytes + zero3.logits_bytes, 1000)
    zero1 = train_memory(a, _setup(world_size=4, zero_stage=1))
    assert (zero1.weights_bytes, zero1.gradients_bytes, zero1.optimizer_bytes) == (4000, 4000, 2000)
    checkpointed = train_memory(a, _setup(gradient_checkpointing=True))
    assert checkpointed.activations_bytes < fp32.activations_bytes


def test_optimizer_in_backward_holds_one_gradient_at_a_time() -> None:
    # GPT-2 width 64 with a 50,257 vocabulary: the largest gradient is the embedding-sized output
    # matrix, 50,257 x 64 fp32 values; it is alive at the end of forward, with the activations
    a = architecture(_gpt2_facts(64, 2, 2, 64))
    n = 10_000_000
    stepped = train_memory(a, _setup(total_parameters=n, trainable_parameters=n, optimizer_in_backward=True))
    assert stepped.gradients_bytes == 50_257 * 64 * 4
    assert stepped.peak_bytes == 4 * n + 8 * n + stepped.activations_bytes + stepped.logits_bytes + 50_257 * 64 * 4


def test_offloaded_parameters_take_their_gradients_along() -> None:
    a = architecture(_gpt2_facts(64, 2, 2, 64))
    offloaded = train_memory(a, _setup(world_size=2, zero_stage=3, offload_optimizer=True, offload_params=True))
    assert (offloaded.weights_bytes, offloaded.gradients_bytes, offloaded.optimizer_bytes) == (0, 0, 0)
    assert offloaded.gathered_bytes == 2 * 49_984 * 4  # two GPT-2 blocks of width 64 (see above), fp32


@pytest.mark.parametrize(("loss", "bytes_per_logit"), [("fp32", 3 * 4), ("chunked_fp32", 2 + 4), ("half", 2 * 2)])
def test_logits_cost_what_the_loss_holds(loss: str, bytes_per_logit: int) -> None:
    # bf16: fp32 logits, log-softmax and gradient (12 B); bf16 logits + fp32 log-softmax per chunk (6 B);
    # bf16 logits and bf16 log-softmax (4 B). 4 sequences x 1 supervised position x 50,257 entries.
    a = architecture(_gpt2_facts(64, 2, 2, 64))
    m = train_memory(a, _setup(precision="bf16", loss_logits=loss))
    assert m.logits_bytes == 4 * 1 * 50_257 * bytes_per_logit


@pytest.mark.parametrize(("supervised", "mode", "positions"), [
    (512, "full", 2048), (512, "chunked", 1024), (200, "chunked", 800), (200, "full", 800)])
def test_the_chunked_loss_holds_one_chunk_of_logits(supervised: int, mode: str, positions: int) -> None:
    # 4 sequences x `supervised` positions; a chunk is 1,024 positions; 3 fp32 values per logit
    a = architecture(_gpt2_facts(64, 2, 2, 64))
    m = train_memory(a, _setup(supervised_per_example=supervised, cross_entropy=mode, loss_chunk_positions=1024))
    assert m.logits_bytes == positions * 50_257 * 12


def test_activation_coefficients_follow_how_the_weights_are_held() -> None:
    from compiler.estimation.estimate import coefficient_keys, half_precision_weights

    full = _setup(precision="bf16")
    assert not half_precision_weights(full) and coefficient_keys(full)[0] == "bf16"  # fp32 weights, autocast
    assert coefficient_keys(_setup(precision="bf16", master_weights=False))[0] == "bf16_pure"
    assert coefficient_keys(_setup(precision="bf16", zero_stage=2, world_size=2))[0] == "bf16_pure"  # DeepSpeed casts
    adapter = _setup(precision="bf16", trainable_parameters=10)
    assert coefficient_keys(adapter)[:2] == ["bf16_pure_lora", "bf16_pure"]
    qlora = _setup(precision="bf16", trainable_parameters=10, quantization="4bit")
    assert coefficient_keys(qlora)[0] == "bf16_pure_qlora"
    torchao = _setup(precision="bf16", trainable_parameters=10, quantization="4bit", quantized_keeps_inputs=False)
    assert coefficient_keys(torchao)[0] == "bf16_pure_lora"
    assert coefficient_keys(_setup())[0] == "fp32"


# One catalog model per family added for current decoders, two blocks each (the counts are per
# block, so two blocks check the repetition without building 30B-parameter graphs).
_FAMILY_MODELS = ["llama-3.2-1b", "qwen3-4b", "gemma-2-2b", "gemma-3-1b", "phi-4-mini", "olmo-2-7b", "smollm3-3b",
                  "mistral-nemo-12b", "mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b"]


def _two_blocks(name: str) -> ModelFacts:
    facts = load_model_facts(name)
    config = dict(facts.config, num_hidden_layers=2)
    if "max_window_layers" in config:
        config["max_window_layers"] = 2
    return ModelFacts(name=name, family=facts.family, config=config)


def _meta(facts: ModelFacts):
    config = dict(facts.config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", _FAMILY_MODELS)
def test_adapter_counts_of_current_families_equal_peft(name: str) -> None:
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    from compiler.estimation.params import all_linear_names, freeze_parameters

    facts = _two_blocks(name)
    a = architecture(facts)
    # "all-linear" as the runtime receives it: peft's own for a dense model, the resolved list for
    # a mixture of experts (router and routed experts frozen).
    resolved = list(all_linear_names(a) or ()) or "all-linear"
    pairs = ["qkv_proj"] if facts.family == "phi3" else ["q_proj", "v_proj"]
    for targets, sent in (("all-linear", resolved), (pairs, pairs)):
        model = get_peft_model(_meta(facts), LoraConfig(r=8, lora_alpha=16, target_modules=sent))
        assert lora_parameters(a, 8, targets) == _trainable(model), targets
    for projection in (False, True):
        hidden = 64 if projection else None
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16, prefix_projection=projection,
                                    encoder_hidden_size=hidden)
        assert prefix_parameters(a, 16, projection, hidden) == _trainable(get_peft_model(_meta(facts), config))
    last_block = sum(p.numel() for p in _meta(facts).model.layers[-1].parameters())
    assert freeze_parameters(a, 1, False) == last_block


# The model cards round these to 12.9B and 3.3B active.
@pytest.mark.parametrize(("name", "active"), [("mixtral-8x7b", 12_879_925_248),
                                                         ("qwen3-30b-a3b", 3_353_032_704)])
def test_active_parameters_of_mixtures_of_experts(name: str, active: int) -> None:
    from compiler.estimation.params import active_parameters, expert_parameters

    a = architecture(load_model_facts(name))
    # Independent: every parameter but the routed experts the router leaves idle.
    idle = a.layers * (a.experts - a.experts_per_token) * 3 * a.hidden * a.expert_intermediate
    assert active_parameters(a) == parameters(a).total - idle == active
    assert expert_parameters(a) == 3 * a.hidden * a.expert_intermediate
