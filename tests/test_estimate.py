"""Parameter counts and memory formulas, checked against transformers / peft models built on the
meta device (no weights are allocated) and against published figures."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from compiler.estimation.catalog import ModelFacts, load_model_facts, model_catalog
from compiler.estimation.estimate import TrainSetup, activation_bytes, quantized_matrix_bytes, train_memory
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
    assert bf16.weights_bytes == 4000  # fp32 master weights; autocast computes with bf16 copies of them
    # ... which the forward pass saves for backward: 2 bytes a weight, with the activations
    assert bf16.activations_bytes == activation_bytes(a, _setup(precision="bf16", device="cuda")) + 2000
    assert bf16.overhead_bytes > 0
    deepspeed = train_memory(a, _setup(precision="bf16", device="cuda", zero_stage=1))
    assert deepspeed.weights_bytes == 6000  # the engine's bf16 module + the fp32 master in its optimizer
    lora = train_memory(a, _setup(trainable_parameters=10, precision="bf16", device="cuda", quantization="4bit"))
    # 4-bit: half a byte per weight plus one fp32 absmax per block of 64 weights (4 / 64 byte); these
    # 990 frozen weights are fewer than the blocks' linear layers hold, so all of them are priced as
    # quantized; the 10 trainable ones are fp32 masters
    assert lora.weights_bytes == int(990 * (0.5 + 4 / 64)) + 10 * 4 == 596 and lora.optimizer_bytes == 80
    double = train_memory(a, _setup(trainable_parameters=10, precision="bf16", device="cuda", quantization="4bit",
                                    double_quantization=True))
    # QLoRA's double quantization: 8-bit absmax per 64 weights, one fp32 constant per 256 blocks
    assert double.weights_bytes == int(990 * (0.5 + 1 / 64 + 4 / (64 * 256))) + 10 * 4 == 550
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


def test_a_quantized_matrix_takes_what_bitsandbytes_allocates() -> None:
    st = _setup(quantization="4bit", double_quantization=True)
    # 64 x 64 in NF4: 4,096 / 2 packed bytes, 64 uint8 absmax (one per 64 weights), one fp32 absmax
    # of those (one per 256 blocks), the 256-value fp32 code of the nested quantization and its fp32
    # offset, and the 16-value fp32 NF4 code
    assert quantized_matrix_bytes(64, 64, st) == 2048 + 64 + 4 + 256 * 4 + 4 + 16 * 4
    # without double quantization: one fp32 absmax per 64 weights
    assert quantized_matrix_bytes(64, 64, replace(st, double_quantization=False)) == 2048 + 64 * 4 + 16 * 4
    # LLM.int8: a byte per weight and an fp32 scale per output row (128 rows here)
    assert quantized_matrix_bytes(64, 128, replace(st, quantization="8bit")) == 64 * 128 + 128 * 4


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


# Multimodal Gemma-3: the language model is planned from text_config; the SigLIP tower and the
# projector are counted apart (loaded with the weights, never trained or run on text).
_GEMMA3_MULTIMODAL = ["gemma-3-4b", "gemma-3-12b", "gemma-3-27b"]


def test_vision_tower_of_gemma_3_4b_counted_by_hand() -> None:
    from compiler.estimation.vision import vision_parameters

    # SigLIP so400m at 896 px, patch 14: conv 3*14*14*1152 + 1152 = 678,528; 64*64 positions x 1152 =
    # 4,718,592. Per layer: two LayerNorms 4*1152, q/k/v/out 4*(1152^2 + 1152) = 5,313,024, fc1
    # 1152*4304 + 4304 = 4,962,512, fc2 4304*1152 + 1152 = 4,959,360: 15,239,504, x 27 = 411,466,608.
    # Post-LayerNorm 2*1152. Projector: RMSNorm 1152 + 1152 x 2560 = 2,950,272.
    expected = 678_528 + 4_718_592 + 411_466_608 + 2_304 + 2_950_272
    assert vision_parameters(load_model_facts("gemma-3-4b").vision, 2560) == expected == 419_816_304


@pytest.mark.parametrize("name", _GEMMA3_MULTIMODAL)
def test_multimodal_gemma_3_text_and_vision_counts_equal_the_meta_model(name: str) -> None:
    import tomllib

    from compiler.estimation.catalog import model_catalog

    facts = load_model_facts(name)
    assert facts.family == "gemma3_text" and facts.vision is not None
    counts = parameters(architecture(facts))
    with torch.device("meta"):
        text_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**facts.config))
        full_config = tomllib.loads(model_catalog()[name].read_text())["config"]
        full = AutoModelForCausalLM.from_config(AutoConfig.for_model(**full_config))
    assert type(text_model).__name__ == "Gemma3ForCausalLM"
    assert counts.text == sum(p.numel() for p in text_model.parameters())
    tower = sum(p.numel() for n, p in full.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n)
    assert counts.vision == tower
    assert counts.total == sum(p.numel() for p in full.parameters()) == facts.parameters


def _tiny_gemma3_multimodal() -> ModelFacts:
    text = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 512}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
              "vision_use_head": False}
    from compiler.estimation.catalog import facts_from_config

    return facts_from_config({"model_type": "gemma3", "text_config": text, "vision_config": vision,
                              "mm_tokens_per_image": 4}, "tiny", "tiny")


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_on_a_multimodal_gemma_3_leaves_the_vision_tower_alone(targets) -> None:
    from peft import LoraConfig, get_peft_model

    from compiler.estimation.vision import VISION_MODULES

    facts = _tiny_gemma3_multimodal()
    config = AutoConfig.for_model("gemma3", text_config=facts.config, vision_config=facts.vision,
                                  mm_tokens_per_image=4)
    # By hand, q_proj/v_proj: q 64 -> 64, v 64 -> 32; rank 8: 8*(64+64) + 8*(64+32) = 1,792 per block.
    if targets != "all-linear":
        assert lora_parameters(architecture(facts), 8, targets) == 2 * 1_792
    for exclude, adapts_tower in ((VISION_MODULES, False), (None, True)):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets, exclude_modules=exclude))
        trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
        assert any("vision_tower" in n for n in trainable) == adapts_tower
        if not adapts_tower:
            assert lora_parameters(architecture(facts), 8, targets) == sum(trainable.values())


def test_full_fine_tuning_of_a_multimodal_gemma_3_trains_the_language_model() -> None:
    from compiler.estimation.params import active_parameters
    from compiler.estimation.stages import trainable_parameters
    from compiler.loading.recipe import FullAdapter

    a = architecture(load_model_facts("gemma-3-4b"))
    counts = parameters(a)
    assert trainable_parameters(a, FullAdapter(kind="full")) == counts.total - 419_816_304 == 3_880_263_168
    assert active_parameters(a) == 3_880_263_168  # FLOPs: a text token never reaches the tower


def test_active_parameters_of_a_mixture_without_formulas_from_its_meta_model() -> None:
    from compiler.estimation.catalog import facts_from_config
    from compiler.estimation.meta_model import meta_model
    from compiler.estimation.params import active_parameters

    config = {"model_type": "deepseek_v2", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
              "first_k_dense_replace": 1, "intermediate_size": 80, "moe_intermediate_size": 8,
              "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
              "qk_rope_head_dim": 4, "v_head_dim": 8, "tie_word_embeddings": False}
    facts = facts_from_config(config, "tiny-deepseek", "tiny-deepseek")
    assert facts.family == "generic"
    # By hand. Attention: q 32 -> 2 x (8 + 4) = 768, kv_a 32 -> 16 + 4 = 640, its norm 16, kv_b
    # 16 -> 2 x (8 + 8) = 512, o 16 -> 32 = 512: 2,448; two norms 64. Block 0 (dense): MLP
    # 3 x 32 x 80 = 7,680. Block 1: 4 routed experts of 3 x 32 x 8 = 768 each, the router 4 x 32,
    # one shared expert 768. Embeddings 100 x 32, the untied head the same, the final norm 32.
    block0 = 2_448 + 64 + 7_680
    block1 = 2_448 + 64 + 4 * 768 + 128 + 768
    total = 2 * 3_200 + 32 + block0 + block1
    a = architecture(facts, meta=meta_model(facts).count)
    assert parameters(a).total == total == 23_104
    assert a.meta.routed == ((4, 768),)
    assert active_parameters(a) == total - (4 - 2) * 768 == 21_568  # two of the four experts idle


def test_lora_on_mixtral_experts_counted_per_expert_by_hand() -> None:
    a = architecture(load_model_facts("mixtral-8x7b"))
    # 32 layers x 8 experts x rank 8 x [gate_up (4,096 in, 2 x 14,336 out) + down (14,336 in, 4,096 out)]
    expected = 32 * 8 * 8 * ((4096 + 2 * 14336) + (14336 + 4096))
    assert lora_parameters(a, 8, ["q_proj"], ["gate_up_proj", "down_proj"]) == (
        lora_parameters(a, 8, ["q_proj"]) + expected)
    assert expected == 104_857_600


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b"])
@pytest.mark.parametrize("experts", [["gate_up_proj", "down_proj"], ["down_proj"]])
def test_lora_on_routed_experts_equals_peft(name: str, experts: list[str]) -> None:
    from peft import LoraConfig, get_peft_model

    from compiler.estimation.params import all_linear_names

    facts = _two_blocks(name)
    a = architecture(facts)
    resolved = list(all_linear_names(a))
    model = get_peft_model(_meta(facts), LoraConfig(r=8, target_modules=resolved, target_parameters=experts))
    assert lora_parameters(a, 8, "all-linear", experts) == _trainable(model)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("gate.weight"))  # the router


def test_lora_on_routed_experts_of_a_family_without_formulas_equals_peft() -> None:
    from peft import LoraConfig, get_peft_model

    from compiler.estimation.catalog import facts_from_config
    from compiler.estimation.meta_model import build_meta_model, meta_model

    config = {"model_type": "deepseek_v2", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 3,
              "first_k_dense_replace": 1, "intermediate_size": 80, "moe_intermediate_size": 8,
              "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
              "qk_rope_head_dim": 4, "v_head_dim": 8}
    facts = facts_from_config(config, "tiny-deepseek", "tiny-deepseek")
    a = architecture(facts, meta=meta_model(facts).count)
    # by hand: 2 sparse blocks x 4 experts x rank 4 x [gate_up 32 in, 16 out + down 8 in, 32 out]
    assert lora_parameters(a, 4, ["q_proj"], ["gate_up_proj", "down_proj"]) - lora_parameters(a, 4, ["q_proj"]) \
        == 2 * 4 * 4 * ((32 + 16) + (8 + 32)) == 2_816
    peft_model = get_peft_model(build_meta_model(facts), LoraConfig(r=4, target_modules=["q_proj"],
                                                                     target_parameters=["gate_up_proj", "down_proj"]))
    assert lora_parameters(a, 4, ["q_proj"], ["gate_up_proj", "down_proj"]) == _trainable(peft_model)


def test_full_fine_tuning_of_a_multimodal_gemma_3_leaves_the_tower_frozen_in_the_runtime() -> None:
    from compiler.estimation.params import Architecture
    from compiler.estimation.stages import trainable_parameters
    from compiler.estimation.vision import VISION_MODULES
    from compiler.loading.recipe import FullAdapter
    from runtime.contract.config import AdapterSpec
    from runtime.core.model import apply_adapter, count_parameters

    facts = _tiny_gemma3_multimodal()
    config = AutoConfig.for_model("gemma3", text_config=facts.config, vision_config=facts.vision,
                                  mm_tokens_per_image=4)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    trained = apply_adapter(model, AdapterSpec(kind="full", params={"exclude_modules": VISION_MODULES}))
    a: Architecture = architecture(facts)
    assert count_parameters(trained)[1] == trainable_parameters(a, FullAdapter(kind="full")) == parameters(a).text
