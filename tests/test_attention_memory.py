"""The attention terms of the memory estimate: sliding-window layers, eager scores, sdpa's masks and
soft-capping. Figures by hand, and the s x s tensors that transformers' own attention keeps for
backward, measured on tiny models with autograd's saved-tensor hooks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compiler.diagnostics import RecipeError
from compiler.estimation.attention import AttentionFacts, attention_bytes, attention_facts, layer_bytes
from compiler.estimation.catalog import load_model_facts, model_catalog
from compiler.estimation.estimate import TrainSetup, train_memory
from compiler.estimation.params import architecture
from compiler.rules.validate import validate
from tests.conftest import base_recipe, write_json_recipe

GIB = 1024**3


def test_sliding_window_layers_of_the_catalog_by_hand() -> None:
    gemma2 = attention_facts(load_model_facts("gemma-2-2b").config, "gemma2", 26)
    assert (gemma2.local_layers, gemma2.sliding_window) == (13, 4096)  # layers 0, 2, ..., 24
    assert (gemma2.attn_softcap, gemma2.final_softcap) == (50.0, 30.0)
    gemma3 = attention_facts(load_model_facts("gemma-3-1b").config, "gemma3_text", 26)
    assert (gemma3.local_layers, gemma3.sliding_window) == (26 - 4, 512)  # global: layers 5, 11, 17, 23
    assert attention_facts(load_model_facts("mistral-7b").config, "mistral", 32).local_layers == 32
    assert attention_facts(load_model_facts("qwen2-7b").config, "qwen2", 28) == AttentionFacts()
    assert attention_facts(load_model_facts("llama-3.1-8b").config, "llama", 32) == AttentionFacts()


_ENTRIES = sorted(name for name, path in model_catalog().items() if name == path.stem and not name.startswith("chatglm"))


@pytest.mark.parametrize("name", _ENTRIES)
def test_sliding_window_layers_equal_transformers_layer_types(name: str) -> None:
    facts = load_model_facts(name)
    config = dict(facts.config)
    hf = AutoConfig.for_model(config.pop("model_type"), **config)
    types = getattr(hf, "layer_types", None)
    window = getattr(hf, "sliding_window", None)
    if not types:  # one window for every layer (Mistral, Phi-3), or none
        expected = facts.num_layers if config.get("sliding_window") and window else 0
    else:
        expected = sum(1 for t in types if t == "sliding_attention") if window else 0
    assert attention_facts(facts.config, facts.family, facts.num_layers).local_layers == expected


@pytest.mark.parametrize(("model_type", "extra"), [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1, "head_dim": 8}),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 3, "num_experts": 2}),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 16, "num_experts": 2, "head_dim": 8}),
    ("gemma3_text", {"sliding_window": 16, "sliding_window_pattern": 3}),
    ("gemma2", {"sliding_window": 16}),
    ("mixtral", {"sliding_window": 16}),
    ("phi3", {"sliding_window": 16}),
])
def test_sliding_window_layers_of_other_configs_equal_transformers(model_type: str, extra: dict) -> None:
    layers = 5
    config = {"model_type": model_type, "hidden_size": 32, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 64, **extra}
    hf = AutoConfig.for_model(**config)
    # transformers picks each layer's mask by config.layer_types; Mixtral and Phi-3 have none and
    # build one sliding-window mask for every layer from config.sliding_window
    types = getattr(hf, "layer_types", None)
    expected = sum(1 for t in types if t == "sliding_attention") if types else (layers if hf.sliding_window else 0)
    assert attention_facts(config, model_type, layers).local_layers == expected > 0


def test_eager_scores_of_gemma_2_2b_by_hand() -> None:
    att = attention_facts(load_model_facts("gemma-2-2b").config, "gemma2", 26)
    # 8 heads x 4096 x 4096 scores per layer, local layers too (eager masks the window, it does not
    # skip it): fp32 softmax 4 bytes + its bf16 copy 2 + soft-capping's tanh 2 = 8 bytes: 1 GiB a layer.
    per_layer = 8 * 4096 * 4096 * 8
    assert per_layer == GIB
    common = dict(layers=26, heads=8, seq_len=4096, sequences=1, working_bytes=2)
    assert attention_bytes(att, implementation="eager", **common) == 26 * GIB
    assert attention_bytes(att, implementation="eager", checkpointed=True, **common) == GIB
    assert attention_bytes(att, implementation="flash_attention_2", **common) == 0
    # fp32 weights: the softmax is the tensor the product with V keeps, 4 bytes, and tanh 4 more
    assert attention_bytes(att, implementation="eager", **{**common, "working_bytes": 4}) == 26 * GIB


def test_sdpa_keeps_a_mask_in_sliding_window_layers_once_the_sequence_reaches_the_window() -> None:
    att = attention_facts(load_model_facts("gemma-3-1b").config, "gemma3_text", 26)
    common = dict(layers=26, heads=4, sequences=2, implementation="sdpa", working_bytes=2)
    # 22 local layers x 2 sequences x a 1024 x 1024 bf16 mask
    assert attention_bytes(att, seq_len=1024, **common) == 22 * 2 * 1024 * 1024 * 2 == 92_274_688
    assert attention_bytes(att, seq_len=512, **common) == 22 * 2 * 512 * 512 * 2  # at the window: a mask
    assert attention_bytes(att, seq_len=511, **common) == 0  # below it: SDPA's causal kernel, no mask


def test_final_logit_softcapping_adds_one_fp32_logits_tensor() -> None:
    a = architecture(load_model_facts("gemma-2-2b"))
    setup = TrainSetup(total_parameters=10, trainable_parameters=10, micro_batch_size=2, seq_len=64,
                       supervised_per_example=16, precision="bf16", device="cuda", attention="eager")
    capped = train_memory(a, setup).logits_bytes
    uncapped = train_memory(replace(a, attention=replace(a.attention, final_softcap=None)), setup).logits_bytes
    # 2 x 16 supervised logits over 256,000 entries; fp32 logits, log-softmax, gradient, and tanh's output
    assert uncapped == 2 * 16 * 256_000 * 3 * 4
    assert capped - uncapped == 2 * 16 * 256_000 * 4


def _saved_square_bytes(model, ids: torch.Tensor, autocast: bool) -> int:
    """Bytes of the distinct [.., s, s] tensors autograd saves during a forward pass."""
    seq = ids.shape[1]
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 3 and t.shape[-2:] == (seq, seq):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.model(input_ids=ids)
    return sum(storages.values())


@pytest.mark.parametrize(("model_type", "extra", "implementation"), [
    ("gemma2", {}, "eager"),
    ("gemma3_text", {"sliding_window_pattern": 2}, "eager"),
    ("gemma3_text", {"sliding_window_pattern": 2}, "sdpa"),
    ("mistral", {}, "sdpa"),
    ("llama", {}, "eager"),
])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_terms_equal_what_transformers_keeps(model_type: str, extra: dict, implementation: str,
                                                       precision: str) -> None:
    batch, seq, layers = 2, 96, 4  # 96: no other dimension of the tiny model
    shape = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    config = {"model_type": model_type, **shape, **extra}
    if model_type != "llama":
        config["sliding_window"] = 8
    torch.manual_seed(0)
    hf = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(hf, attn_implementation=implementation).train()
    measured = _saved_square_bytes(model, torch.randint(0, 128, (batch, seq)), precision == "bf16")
    att = attention_facts(config, model_type, layers)
    planned = attention_bytes(att, layers=layers, heads=2, seq_len=seq, sequences=batch,
                              implementation=implementation, working_bytes=2 if precision == "bf16" else 4)
    assert planned == measured > 0


def test_layer_bytes_of_a_global_sdpa_layer_is_nothing() -> None:
    att = AttentionFacts(sliding_window=8, local_layers=1)
    assert layer_bytes(att, local=False, heads=4, seq_len=64, implementation="sdpa", working_bytes=2) == 0


def test_the_runtime_loss_soft_caps_the_logits_as_the_model_does() -> None:
    from runtime.core.losses import TokenLoss

    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.05)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 64, (2, 12))
    total, count = TokenLoss(model)(ids, torch.ones_like(ids), ids)
    reference = model(input_ids=ids, labels=ids).loss  # the model's forward soft-caps, then the mean
    assert torch.allclose(total / count, reference, atol=1e-6)
    uncapped = torch.nn.functional.cross_entropy(model.lm_head(model.model(input_ids=ids).last_hidden_state)[:, :-1]
                                                 .reshape(-1, 64), ids[:, 1:].reshape(-1))
    assert not torch.allclose(uncapped, reference, atol=1e-3)  # the cap changes the loss


def _gemma2_recipe(tmp_path: Path, **hardware: str) -> Path:
    recipe = base_recipe()
    recipe["model"] = {"init": "pretrained", "hub": "google/gemma-2-2b"}
    if hardware:
        recipe["hardware"] = hardware
    return write_json_recipe(tmp_path, recipe)


def test_sdpa_on_gemma_2_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as caught:
        validate(_gemma2_recipe(tmp_path))
    [problem] = [d for d in caught.value.diagnostics if "attn_logit_softcapping" in d.message]
    assert "(the default)" in problem.message and 'attention = "eager"' in problem.help
    validate(_gemma2_recipe(tmp_path, attention="eager"))  # no error



@pytest.mark.parametrize(("model_type", "implementation"), [
    ("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"), ("gemma2", "eager"), ("gemma3_text", "sdpa"),
])
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "bf16-weights"])
def test_a_packed_sequence_keeps_what_it_keeps_alone(model_type: str, implementation: str, half: bool) -> None:
    """Packed rows attending per sequence (runtime.core.segments) keep, for each sequence, the
    s x s terms of that sequence alone: the plan's terms at the sequence's length, which the
    plan's row-length figure bounds. No block-diagonal mask of the whole row survives the forward."""
    from runtime.core.data import IGNORE_INDEX, TrainRow
    from runtime.core.losses import TokenLoss
    from runtime.core.packing import collate_packed, pack_rows
    from runtime.core.segments import use_per_sequence

    layers, heads, width = 4, 2, 40
    config = {"model_type": model_type, "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 1, "head_dim": 16,
              "max_position_embeddings": 256, **({"sliding_window_pattern": 2} if model_type == "gemma3_text" else {})}
    if model_type != "llama":
        config["sliding_window"] = 8  # every sequence is longer than the window
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), attn_implementation=implementation)
    model = model.to(torch.bfloat16) if half else model  # a half-precision base under autocast, as LoRA holds it
    assert use_per_sequence(model)
    lengths = (22, 17, 15, 25)
    rows = [TrainRow(tuple(range(1, n + 1)), (IGNORE_INDEX,) + tuple(range(2, n + 1)), i)
            for i, n in enumerate(lengths)]
    batch = collate_packed(pack_rows(rows, width), pad_id=0)
    assert batch["input_ids"].shape == (2, width)  # 25 + 15 and 22 + 17 (and one token of padding)

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 3 and t.shape[-1] == t.shape[-2] > 1:  # no other dimension of the tiny model is 15-25
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            TokenLoss(model.train())(**batch)
    att = attention_facts(config, model_type, layers)
    alone = sum(attention_bytes(att, layers=layers, heads=heads, seq_len=n, sequences=1,
                                implementation=implementation, working_bytes=2) for n in lengths)
    assert sum(storages.values()) == alone
    assert (alone > 0) == (implementation == "eager" or model_type != "llama")
    row = attention_bytes(att, layers=layers, heads=heads, seq_len=width, sequences=2, implementation=implementation,
                          working_bytes=2)
    assert alone < row or alone == row == 0
