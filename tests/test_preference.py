"""Reward, DPO and PPO: the arithmetic worked by hand, DPO checked against trl, and whole chains
on tiny models (losses fall, reward accuracy above chance, PPO's reward rises with bounded KL,
a killed chain resumes without redoing finished stages)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runtime.stages.dpo import dpo_loss
from runtime.stages.ppo_math import gae, policy_loss, token_rewards, value_loss, whiten
from runtime.stages.reward import ordering_metrics, pairwise_loss
from tests.conftest import REPO, run_cli, write_json_recipe

# ---------------------------------------------------------------------------------------------
# by hand


def test_dpo_losses_by_hand() -> None:
    # log-ratios: chosen -1.0 - (-2.0) = 1.0; rejected -3.0 - (-2.5) = -0.5; delta = 1.5; beta delta = 0.15
    args = [torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5])]
    losses, chosen_r, rejected_r = dpo_loss(*args, beta=0.1, loss_type="sigmoid")
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.15)))  # -log sigmoid(0.15) = log(1.860708) = 0.620957
    assert losses.item() == pytest.approx(0.620957, abs=1e-6)
    assert (chosen_r.item(), rejected_r.item()) == pytest.approx((0.1, -0.05))  # beta x log-ratio
    # conservative DPO, e = 0.1: 0.9 x 0.620957 + 0.1 x (-log sigmoid(-0.15) = 0.15 + 0.620957) = 0.635957
    smoothed, _, _ = dpo_loss(*args, beta=0.1, loss_type="sigmoid", label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.635957, abs=1e-6)
    hinge, _, _ = dpo_loss(*args, beta=0.1, loss_type="hinge")
    assert hinge.item() == pytest.approx(0.85)  # max(0, 1 - 0.15)
    # IPO with 2 chosen and 4 rejected tokens: 1.0 / 2 - (-0.5) / 4 = 0.625; (0.625 - 1 / 0.2)^2 = 19.140625
    ipo, _, _ = dpo_loss(*args, beta=0.1, loss_type="ipo", chosen_tokens=torch.tensor([2]),
                         rejected_tokens=torch.tensor([4]))
    assert ipo.item() == pytest.approx(19.140625)


def test_pairwise_reward_loss_and_ordering_by_hand() -> None:
    # -log sigmoid(2.0 - 0.5) = log(1 + e^-1.5) = 0.201413
    assert pairwise_loss(torch.tensor([2.0]), torch.tensor([0.5])).item() == pytest.approx(0.201413, abs=1e-6)
    # scores 1 < 2 < 3; rewards 0.3, 0.1, 0.5: pairs (2 over 1): 0.1 - 0.3 = -0.2 wrong; (3 over 1): +0.2;
    # (3 over 2): +0.4 -> accuracy 2/3, mean margin (−0.2 + 0.2 + 0.4) / 3
    out = ordering_metrics(torch.tensor([0.3, 0.1, 0.5], dtype=torch.float64), torch.tensor([1.0, 2.0, 3.0]))
    assert out == {"pairs": 3, "accuracy": round(2 / 3, 4), "mean_margin": round(0.4 / 3, 4)}


def test_kl_penalised_rewards_by_hand() -> None:
    # column 0 is the prompt; completion log-probs -1.0, -2.0, -0.5 against the reference's -1.5, -1.0, -0.5
    mask = torch.tensor([[0.0, 1, 1, 1]])
    rewards, kl = token_rewards(torch.tensor([[0.0, -1.0, -2.0, -0.5]]), torch.tensor([[0.0, -1.5, -1.0, -0.5]]),
                                torch.tensor([2.0]), mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.0, 0.5, -1.0, 0.0]]))
    # -0.1 x KL per token, plus the score 2.0 on the last completion token
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.05, 0.1, 2.0]]))


def test_gae_by_hand() -> None:
    mask = torch.tensor([[0.0, 1, 1, 1]])
    rewards = torch.tensor([[0.0, 0.1, -0.2, 1.0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3]])  # the prompt column's value must not leak in
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # t3: 1.0 + 0 - 0.3 = 0.7; t2: -0.2 + 0.3 - 0.4 = -0.3, A = -0.3 + 0.95 x 0.7 = 0.365;
    # t1: 0.1 + 0.4 - 0.5 = 0.0, A = 0.95 x 0.365 = 0.34675
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.34675, 0.365, 0.7]]))
    torch.testing.assert_close(returns, torch.tensor([[0.0, 0.84675, 0.765, 1.0]]))
    advantages, _ = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    # t3: 0.7; t2: -0.2 + 0.5 x 0.3 - 0.4 = -0.45, A = -0.45 + 0.5 x 0.7 = -0.1;
    # t1: 0.1 + 0.5 x 0.4 - 0.5 = -0.2, A = -0.2 + 0.5 x -0.1 = -0.25
    torch.testing.assert_close(advantages, torch.tensor([[0.0, -0.25, -0.1, 0.7]]))


def test_clipped_policy_and_value_losses_by_hand() -> None:
    mask = torch.ones(1, 3)
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.5]]))  # ratios 1.5, 0.5, 0.5
    advantages = torch.tensor([[1.0, 1.0, -2.0]])
    loss, clipfrac = policy_loss(new, old, advantages, mask, clip_eps=0.2)
    # max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2 (clipped); max(-0.5, -0.8) = -0.5; max(1.0, 1.6) = 1.6 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.6) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)
    # token 1: V 2.0 from 1.0, R 2.0: unclipped 0, clipped V 1.4 -> 0.36; token 2: V -0.1 from 0, R 1: 1.21 both
    vl = value_loss(torch.tensor([[2.0, -0.1]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 1.0]]),
                    torch.ones(1, 2), value_clip=0.4)
    assert vl.item() == pytest.approx(0.5 * (0.36 + 1.21) / 2)


def test_whitening_uses_only_masked_entries() -> None:
    out = whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1, 1, 0]]))
    # mean 2, variance (1 + 0 + 1) / 2 = 1
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# DPO against trl


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_equals_trl_on_the_same_model_and_batch(tmp_path: Path, loss_type: str) -> None:
    """trl's DPOTrainer tokenizes, collates and scores a batch; our DpoLoss on that batch agrees."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from compiler.data.assets import asset_path
    from compiler.data.tokenizer_convert import tiktoken_to_tokenizer_json
    from runtime.contract.assets import load_catalog
    from runtime.core.data import IGNORE_INDEX
    from runtime.stages.dpo import DpoLoss

    tokenizer_json = tmp_path / "tokenizer.json"
    ranks = asset_path(load_catalog()["gpt2-bpe"])
    tokenizer_json.write_text(tiktoken_to_tokenizer_json(ranks, special_tokens={"<|endoftext|>": 50256}))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    config = GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    policy, reference = GPT2LMHeadModel(config).eval(), GPT2LMHeadModel(config).eval()
    pairs = Dataset.from_list([{"prompt": "The day was", "chosen": " good", "rejected": " really bad"},
                               {"prompt": "The film", "chosen": " was great", "rejected": " awful"}])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=[loss_type], report_to=[],
                     per_device_train_batch_size=2, use_cpu=True)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=pairs, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        expected = float(trainer.compute_loss(policy, batch))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    ours = DpoLoss(policy, {"beta": 0.1, "loss_type": loss_type, "label_smoothing": 0.0}, reference)
    with torch.no_grad():
        total, pairs_n, _ = ours(batch["input_ids"], batch["attention_mask"], labels)
    assert int(pairs_n) == 2
    # equal up to float32 summation order (log-probabilities of ~-11 per token over a 50,257 vocab)
    assert float(total) / 2 == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# whole chains on tiny models

_GOOD = ["good", "great", "nice", "happy", "fine", "lovely"]
_BAD = ["bad", "awful", "sad", "poor", "ugly", "nasty"]
_TOPICS = ["day", "film", "song", "meal", "trip", "book", "game", "walk", "show", "class", "park", "town"]


def _toy_data(folder: Path) -> None:
    """A separable preference task: completions from the "good" words beat the "bad" ones."""
    import random

    rng = random.Random(0)
    with open(folder / "pairs.jsonl", "w") as f:
        for _ in range(160):
            f.write(json.dumps({"prompt": f"The {rng.choice(_TOPICS)} was", "chosen": " " + rng.choice(_GOOD),
                                "rejected": " " + rng.choice(_BAD)}) + "\n")
    with open(folder / "scored.jsonl", "w") as f:
        for _ in range(160):
            good = rng.random() < 0.5
            f.write(json.dumps({"user_input": f"The {rng.choice(_TOPICS)} was",
                                "completion": " " + rng.choice(_GOOD if good else _BAD),
                                "score": 1.0 if good else -1.0}) + "\n")
    with open(folder / "sft.jsonl", "w") as f:
        for _ in range(160):
            f.write(json.dumps({"user_input": f"The {rng.choice(_TOPICS)} was",
                                "completion": " " + rng.choice(_GOOD + _BAD)}) + "\n")
    with open(folder / "prompts.jsonl", "w") as f:
        for _ in range(80):
            f.write(json.dumps({"user_input": f"The {rng.choice(_TOPICS)} was"}) + "\n")


def _chain_recipe(folder: Path, *, model: dict | None = None, adapter: dict | None = None) -> Path:
    _toy_data(folder)
    split = {"heldout_fraction": 0.2, "seed": 1}
    completion = {"prompt": "{{ user_input }}", "completion": "{{ completion }}", "add_eos": True}
    recipe = {
        "name": "toy-rlhf",
        "seed": 3,
        "model": model or {"init": "scratch", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": "auto",
                           "dropout": 0.0},
        "tokenizer": {"asset": "gpt2-bpe", "special_tokens": {"<|endoftext|>": 50256}, "eos_token": "<|endoftext|>"},
        "data": {
            "sft": {"source": {"path": "sft.jsonl"}, "format": "completion", "split": split, "template": completion},
            "pairs": {"source": {"path": "pairs.jsonl"}, "format": "preference", "split": split,
                      "template": {"prompt": "{{ prompt }}", "completion": "{{ chosen }}", "add_eos": True}},
            "scored": {"source": {"path": "scored.jsonl"}, "format": "scored", "split": split, "template": completion},
            "prompts": {"source": {"path": "prompts.jsonl"}, "format": "prompt", "split": split,
                        "template": {"prompt": "{{ user_input }}", "completion": ""}},
        },
        "tokens": {"max_total": "auto"},
        "train": {"micro_batch_size": 8, "learning_rate": 3e-3, "log_every_steps": 2},
        "stages": [
            {"name": "sft", "kind": "sft", "data": "sft", "max_steps": 100, "learning_rate": 1e-2},
            {"name": "reward", "kind": "reward", "data": "pairs", "from": "sft", "max_steps": 30},
            {"name": "scores", "kind": "reward", "data": "scored", "from": "sft", "objective": "regression",
             "max_steps": 40},
            {"name": "dpo", "kind": "dpo", "data": "pairs", "from": "sft", "max_steps": 20, "learning_rate": 1e-3},
            {"name": "ppo", "kind": "ppo", "data": "prompts", "from": "sft", "reward_model": "reward",
             "max_steps": 16, "save_every_steps": 4, "rollout_batch_size": 8, "ppo_epochs": 2, "ptx_coef": 0.1,
             "ptx_data": "sft", "generation": {"max_new_tokens": 4}},
        ],
        "eval": {"kind": "language_model", "data": "sft", "stage": "ppo", "samples": 2},
        "hardware": {"device": "cpu"},
    }
    if adapter:
        recipe["adapter"] = adapter
    return write_json_recipe(folder, recipe, name="chain.json")


def _compile(recipe: Path, build: Path) -> None:
    result = run_cli("compile", str(recipe), "--out", str(build), cwd=recipe.parent)
    assert result.returncode == 0, result.stderr


def _train(build: Path, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, "-m", "runtime.train", str(build)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    if kwargs.pop("background", False):
        return subprocess.Popen(command, cwd=build.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(command, cwd=build.parent, env=env, capture_output=True, text=True, timeout=900)


def _metrics(build: Path, stage: str) -> list[dict]:
    lines = (build / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == stage]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chain")
    build = folder / "build"
    _compile(_chain_recipe(folder), build)
    result = _train(build)
    assert result.returncode == 0, result.stderr
    return build


def _reports(build: Path) -> dict[str, dict]:
    return {s["stage"]: s for s in json.loads((build / "train_report.json").read_text())["stages"]}


@pytest.mark.slow
def test_reward_models_learn_a_separable_preference(chain: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    reports = _reports(chain)
    pairwise = reports["reward"]
    assert pairwise["final_loss"] < pairwise["first_loss"] - 0.3
    assert pairwise["heldout"]["after"]["accuracy"] >= 0.9  # 32 held-out pairs, chance is 0.5
    assert pairwise["heldout"]["after"]["mean_margin"] > pairwise["heldout"]["before"]["mean_margin"] + 1.0
    regression = reports["scores"]
    assert regression["final_loss"] < regression["first_loss"] * 0.6, regression
    assert regression["heldout"]["after"]["accuracy"] >= 0.9
    assert regression["heldout"]["after"]["pearson"] > 0.8
    # the saved reward model is a plain transformers sequence classifier with one output
    model = AutoModelForSequenceClassification.from_pretrained(chain / "stages" / "reward" / "model")
    assert model.config.num_labels == 1 and model.config.pad_token_id == 50256


@pytest.mark.slow
def test_dpo_raises_the_preferred_completion(chain: Path) -> None:
    report = _reports(chain)["dpo"]
    losses = [r["loss"] for r in _metrics(chain, "dpo")]
    assert losses[0] == pytest.approx(math.log(2), abs=0.02)  # the policy starts as its reference
    assert losses[-1] < losses[0] - 0.02
    assert report["heldout"]["accuracy"] >= 0.9 and report["heldout"]["mean_margin"] > 0


@pytest.mark.slow
def test_ppo_raises_the_reward_with_bounded_kl(chain: Path) -> None:
    report = _reports(chain)["ppo"]
    records = _metrics(chain, "ppo")
    assert len(records) == 8  # 16 steps, logged every 2
    assert records[-1]["reward_mean"] > records[0]["reward_mean"] + 1.0
    assert report["heldout"]["after"]["mean_reward"] > report["heldout"]["before"]["mean_reward"]
    # the KL penalty keeps the policy near the SFT model: a few nats per 4-token completion at most
    assert all(abs(r["kl"]) < 5.0 for r in records)
    assert all(0.0 <= r["clipfrac"] <= 1.0 for r in records)
    assert (chain / "stages" / "ppo" / "critic" / "config.json").is_file()
    assert (chain / "model" / "config.json").is_file()  # the actor is the chain's output


@pytest.mark.slow
def test_the_ppo_policy_is_evaluated_as_a_language_model(chain: Path) -> None:
    """`recipe eval` loads the PPO actor (a LoRA-free full model here) on its SFT start and scores the
    held-out completions."""
    result = run_cli("eval", str(chain), cwd=chain.parent)
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((chain / "eval.json").read_text())
    assert evaluation["n"] == 32 and math.isfinite(evaluation["loss"])  # the 32 held-out SFT rows
    assert evaluation["perplexity"] == pytest.approx(math.exp(evaluation["loss"]), rel=1e-3)
    assert len(evaluation["samples"]) == 2


@pytest.mark.slow
def test_a_killed_chain_resumes_without_redoing_finished_stages(tmp_path: Path, chain: Path) -> None:
    """SIGKILL during PPO after its first checkpoint; the rerun skips the four finished stages and
    resumes PPO from the checkpoint, ending with the same weights as the uninterrupted chain."""
    from safetensors.torch import load_file

    build = tmp_path / "build"
    _compile(_chain_recipe(tmp_path), build)
    process = _train(build, background=True)
    deadline = time.monotonic() + 600
    checkpoints = build / "checkpoints"
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoints.is_dir() and any("-ppo-step" in p.name and not p.name.startswith(".") and
                                        (p / "state.json").is_file() for p in checkpoints.iterdir()):
            break
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be interrupted"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (build / "stages" / "ppo" / "done.json").exists()
    result = _train(build)
    assert result.returncode == 0, result.stderr
    for stage in ("sft", "reward", "scores", "dpo"):
        assert f'stage "{stage}" already finished in this build; skipping it' in result.stderr
    assert 'resuming stage "ppo" at step' in result.stderr
    resumed = load_file(build / "stages" / "ppo" / "model" / "model.safetensors")
    reference = load_file(chain / "stages" / "ppo" / "model" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], atol=0, rtol=0)


@pytest.mark.slow
def test_lora_chain_on_a_pretrained_llama(tmp_path: Path) -> None:
    """LoRA everywhere: the reward model trains its adapter and its new head (and saves both), the DPO
    reference is the adapter switched off, the PPO critic is a LoRA on the reward model."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny-llama")
    adapter = {"kind": "lora", "rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}
    recipe = _chain_recipe(tmp_path, model={"init": "pretrained", "path": str(tmp_path / "tiny-llama")},
                           adapter=adapter)
    spec = json.loads(recipe.read_text())
    spec["stages"] = [s for s in spec["stages"] if s["name"] != "scores"]
    for s in spec["stages"]:
        s["max_steps"] = 6
        s.pop("save_every_steps", None)
    recipe.write_text(json.dumps(spec))
    build = tmp_path / "build"
    _compile(recipe, build)
    result = _train(build)
    assert result.returncode == 0, result.stderr
    reports = _reports(build)
    lora = 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))  # per layer: q 4x32 + 32x4, v 4x32 + 4x16 (2 kv heads of 8)
    assert reports["sft"]["params_trainable"] == lora == 896
    assert reports["dpo"]["params_trainable"] == lora
    assert reports["reward"]["params_trainable"] == lora + 32  # plus the head: hidden 32 -> 1, no bias
    saved = load_file(build / "stages" / "reward" / "model" / "adapter_model.safetensors")
    assert any("score" in name for name in saved), sorted(saved)
    assert reports["dpo"]["first_loss"] == pytest.approx(math.log(2), abs=0.02)
    assert reports["ppo"]["heldout"]["after"]["prompts"] == 16


@pytest.mark.parametrize("evaluation, message", [
    ({"kind": "language_model", "data": "sft", "stage": "reward"},
     'eval would evaluate stage "reward", a reward model'),
    ({"kind": "language_model", "data": "prompts", "stage": "ppo"},
     'eval reads data set "prompts", whose rows are prompts only'),
])
def test_eval_refuses_a_reward_stage_and_prompt_only_data(tmp_path: Path, evaluation: dict, message: str) -> None:
    recipe = _chain_recipe(tmp_path)
    spec = json.loads(recipe.read_text())
    spec["eval"] = evaluation
    recipe.write_text(json.dumps(spec))
    result = run_cli("validate", str(recipe), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in result.stderr
    assert "= help: " in result.stderr
