"""GRPO: advantages, loss and KL worked by hand; the loss checked against trl's GRPOTrainer; each
reward function on hand-made completions; a toy chain that learns a known token; exact resume."""

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

from runtime.stages.grpo_math import STD_EPS, group_advantages, grpo_loss, k3_kl
from runtime.stages.rewards import Completion, Reward, read_label, total_rewards
from tests.conftest import REPO, run_cli, write_json_recipe

# ---------------------------------------------------------------------------------------------
# the arithmetic by hand


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages, flat = group_advantages(rewards, 4, "group")
    std = math.sqrt(4 * 0.25 / 3)  # Bessel's correction: sum of squared deviations / (n - 1)
    a = 0.5 / (std + STD_EPS)
    torch.testing.assert_close(advantages, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    assert flat.tolist() == [False, True]
    plain, _ = group_advantages(rewards, 4, "none")  # Dr. GRPO: the mean is subtracted, nothing divided
    torch.testing.assert_close(plain, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))


def test_k3_kl_by_hand() -> None:
    logps, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -2.0, 0.0])
    # d = ref - pi: -0.5, 0, 0.5 -> exp(d) - d - 1
    expected = torch.tensor([math.exp(-0.5) + 0.5 - 1, 0.0, math.exp(0.5) - 0.5 - 1])
    torch.testing.assert_close(k3_kl(logps, ref), expected)
    assert (k3_kl(logps, ref) >= 0).all()


def test_grpo_loss_by_hand() -> None:
    """Two completions, the second one token long; ratios 1.5 and 0.6 hit the clips (0.2 below,
    0.28 above), 1.1 does not."""
    logps = torch.log(torch.tensor([[1.5, 1.1], [0.6, 1.0]]))
    old = torch.zeros(2, 2)
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = grpo_loss(logps, old, advantages, mask, clip_eps=0.2, clip_eps_high=0.28)
    # -min(r A, clip(r) A): row 1 (A = 1): -min(1.5, 1.28) = -1.28, -min(1.1, 1.1) = -1.1;
    # row 2 (A = -2): -min(-1.2, -1.6) = 1.6 (the clipped 0.8 x -2)
    assert float(loss) == pytest.approx((-1.28 - 1.1 + 1.6) / 3, rel=1e-6)
    assert float(stats["clipfrac"]) == pytest.approx(2 / 3)
    sequence, _ = grpo_loss(logps, old, advantages, mask, clip_eps=0.2, clip_eps_high=0.28, aggregation="sequence")
    assert float(sequence) == pytest.approx(((-1.28 - 1.1) / 2 + 1.6) / 2, rel=1e-6)
    # with the KL term: ref = log 1 = 0 everywhere, so k3 = exp(-log r) + log r - 1 per token
    ref = torch.zeros(2, 2)
    with_kl, stats = grpo_loss(logps, old, advantages, mask, clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.5,
                               ref_logps=ref)
    k = [1 / r + math.log(r) - 1 for r in (1.5, 1.1, 0.6)]
    assert float(with_kl) == pytest.approx((-1.28 - 1.1 + 1.6 + 0.5 * sum(k)) / 3, rel=1e-6)
    assert float(stats["kl"]) == pytest.approx(sum(k) / 3, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# against trl


@pytest.mark.parametrize(("loss_type", "beta", "aggregation"),
                         [("grpo", 0.0, "sequence"), ("bnpo", 0.0, "token"), ("grpo", 0.1, "sequence"),
                          ("bnpo", 0.1, "token")])
def test_grpo_loss_equals_trl(tmp_path: Path, loss_type: str, beta: float, aggregation: str) -> None:
    """trl's GRPOTrainer._compute_loss and ours on the same tiny model, prompts, completions,
    advantages (ours, from the rewards), old and reference log-probabilities."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from compiler.data.assets import asset_path
    from compiler.data.tokenizer_convert import tiktoken_to_tokenizer_json
    from runtime.contract.assets import load_catalog
    from runtime.core.data import IGNORE_INDEX
    from runtime.stages.ppo import PolicyLogps

    tokenizer_json = tmp_path / "tokenizer.json"
    tokenizer_json.write_text(tiktoken_to_tokenizer_json(asset_path(load_catalog()["gpt2-bpe"]),
                                                         special_tokens={"<|endoftext|>": 50256}))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "policy")  # trl loads its reference copy by path
    reference = GPT2LMHeadModel(config).eval()
    prompts = torch.tensor([[5, 6, 7], [5, 6, 7], [9, 3, 4], [9, 3, 4]])  # 2 groups of 2, no prompt padding
    completions = [[11, 12, 13], [14], [15, 16], [17, 18, 19]]
    rewards = torch.tensor([1.0, 0.0, 0.2, 0.9])
    advantages, _ = group_advantages(rewards, 2, "group")
    width = max(map(len, completions))
    completion_ids = torch.tensor([c + [0] * (width - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type,
                      num_generations=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                      bf16=False,  # trl defaults to bf16 autocast; compare in float32
                      use_bias_correction_kl=False)  # the plain k3 penalty of DeepSeekMath (trl's default
    # since DeepSeek-V3.2 multiplies it by the importance ratio)
    data = Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}])
    trainer = GRPOTrainer(model=str(tmp_path / "policy"), reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=args,
                          train_dataset=data, processing_class=tokenizer)
    policy = trainer.model.eval()  # eval: no gradient-accumulation normaliser
    input_ids = torch.cat([prompts, completion_ids], dim=1)
    attention = torch.cat([torch.ones_like(prompts), completion_mask], dim=1)
    with torch.no_grad():
        current = PolicyLogps(policy)(input_ids, attention, input_ids)[0]
        ref = PolicyLogps(reference)(input_ids, attention, input_ids)[0]
    p = prompts.shape[1]
    noise = 0.3 * torch.randn(4, width)  # old log-probabilities away from the current ones: clipping happens
    old_completion = current[:, p - 1 :] + noise
    inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old_completion,
              "ref_per_token_logps": ref[:, p - 1 :], "num_items_in_batch": completion_mask.sum()}
    with torch.no_grad():
        expected = float(trainer._compute_loss(policy, inputs))
        trl_logps = trainer._get_per_token_logps_and_entropies(policy, input_ids, attention, width)[0]

    labels = input_ids.clone()
    labels[:, :p] = IGNORE_INDEX
    labels[:, p:][completion_mask == 0] = IGNORE_INDEX
    with torch.no_grad():
        logps, mask = PolicyLogps(policy)(input_ids, attention, labels)
    old = torch.zeros_like(logps)
    old[:, p - 1 :] = old_completion
    ref_ours = torch.zeros_like(logps)
    ref_ours[:, p - 1 :] = ref[:, p - 1 :]
    ours, stats = grpo_loss(logps, old, advantages, mask, clip_eps=0.2, clip_eps_high=0.28, kl_coef=beta,
                            ref_logps=ref_ours, aggregation=aggregation)
    assert float(stats["clipfrac"]) > 0  # the case exercises the clip
    # trl scores completion tokens with its own chunked log-softmax: the same log-probabilities
    torch.testing.assert_close(trl_logps * completion_mask, logps[:, p - 1 :] * completion_mask, atol=1e-5, rtol=0)
    assert float(ours) == pytest.approx(expected, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# the reward functions


def _completions(*texts: str, label: str = "positive") -> list[Completion]:
    return [Completion(t, len(t.split()) + 1, {"label": label, "answer": "Paris"}) for t in texts]


def test_exact_match_with_strip_and_lower() -> None:
    c = _completions(" Paris ", "paris", "Paris, France")
    assert Reward({"kind": "exact_match", "field": "answer"}).score(c) == [1.0, 0.0, 0.0]
    assert Reward({"kind": "exact_match", "field": "answer", "lower": True}).score(c) == [1.0, 1.0, 0.0]
    assert Reward({"kind": "exact_match", "field": "answer", "strip": False}).score(c) == [0.0, 0.0, 0.0]


def test_label_set_reads_the_first_word_or_the_label_it_starts_with() -> None:
    c = _completions("Positive!", " positively so", "The tweet is positive", "neutral")
    labels = ["negative", "neutral", "positive"]
    assert Reward({"kind": "label_set", "field": "label", "labels": labels, "extract": "label_set"}).score(c) \
        == [1.0, 1.0, 0.0, 0.0]
    assert Reward({"kind": "label_set", "field": "label", "labels": labels, "extract": "first_word"}).score(c) \
        == [1.0, 0.0, 0.0, 0.0]
    assert read_label("  NEUTRAL.", "label_set", labels) == "neutral"
    assert read_label("", "first_word", labels) == ""


def test_regex_and_length_rewards_and_the_weighted_sum() -> None:
    c = _completions("positive", "positive because", "a b c d e f")
    fmt = Reward({"kind": "regex", "name": "format", "pattern": r"^\s*(positive|negative)\W*$", "weight": 0.5})
    length = Reward({"kind": "length", "max_tokens": 3, "weight": 0.1})
    assert fmt.score(c) == [1.0, 0.0, 0.0]
    assert length.score(c) == [0.0, 0.0, -4.0]  # 7 tokens, 3 allowed
    total, means = total_rewards([fmt, length], c)
    torch.testing.assert_close(total, torch.tensor([0.5, 0.0, -0.4]))
    assert means == pytest.approx({"format": 1 / 3, "length": -4 / 3})


def test_a_catastrophic_regex_is_bounded_by_its_timeout() -> None:
    """(a+)+$ backtracks exponentially on a run of a's that ends badly; the match gives up after
    timeout_s, scores 0 and is counted."""
    reward = Reward({"kind": "regex", "pattern": r"(a+)+$", "timeout_s": 0.05})
    started = time.perf_counter()
    assert reward.score(_completions("a" * 5000 + "!", "aaa")) == [0.0, 1.0]
    assert time.perf_counter() - started < 5.0
    assert reward.timeouts == 1


def test_reward_model_and_python_rewards() -> None:
    batch = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "attention_mask": torch.ones(2, 2)}
    scored = Reward({"kind": "reward_model", "stage": "rm"}, lambda b: b["input_ids"].sum(dim=1).float())
    assert scored.score(_completions("x", "y"), batch) == [3.0, 7.0]
    code = Reward({"kind": "python", "function": "tests.grpo_rewards:ends_with_label"})
    assert code.score(_completions("so positive", "negative", label="positive")) == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# recipes: validation, the plan


def _toy_prompts(folder: Path) -> None:
    import random

    rng = random.Random(0)
    words = ["great", "nice", "fine", "bad", "awful", "sad", "poor"]  # and "good", rarely: the rewarded word
    with open(folder / "prompts.jsonl", "w") as f:
        for _ in range(120):
            target = "good" if rng.random() < 0.1 else rng.choice(words)
            f.write(json.dumps({"user_input": f"The {rng.choice(['day', 'film', 'song', 'meal'])} was",
                                "target": target}) + "\n")


def _grpo_recipe(folder: Path, *, rewards: list[dict] | None = None, **top) -> Path:
    _toy_prompts(folder)
    recipe = {
        "name": "toy-grpo",
        "seed": 4,
        "model": {"init": "scratch", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 16, "dropout": 0.0},
        "tokenizer": {"asset": "gpt2-bpe", "special_tokens": {"<|endoftext|>": 50256}, "eos_token": "<|endoftext|>"},
        "data": {"prompts": {"source": {"path": "prompts.jsonl"}, "format": "columns",
                             "split": {"heldout_fraction": 0.2, "seed": 1},
                             "template": {"prompt": "{{ user_input }}", "completion": " {{ target }}"}}},
        "tokens": {"max_total": "auto"},
        "stages": [{"name": "sft", "kind": "sft", "max_steps": 40, "micro_batch_size": 8, "learning_rate": 1e-2},
                   {"name": "grpo", "kind": "grpo", "from": "sft", "max_steps": 16, "group_size": 8,
                    "rollout_batch_size": 2, "micro_batch_size": 16, "learning_rate": 1e-2, "lr_schedule": "constant",
                    "log_every_steps": 2, "save_every_steps": 8, "kl_coef": 0.02, "heldout_prompts": 16,
                    "generation": {"max_new_tokens": 3},
                    "rewards": rewards or [{"kind": "regex", "name": "good", "pattern": r"\bgood\b"}]}],
        "hardware": {"device": "cpu"},
        **top,
    }
    return write_json_recipe(folder, recipe, name="grpo.json")


def test_python_rewards_need_allow_code(tmp_path: Path) -> None:
    rewards = [{"kind": "python", "function": "tests.grpo_rewards:ends_with_label"}]
    refused = run_cli("validate", str(_grpo_recipe(tmp_path, rewards=rewards)), cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "runs Python code (tests.grpo_rewards:ends_with_label)" in refused.stderr
    assert "allow_code = true" in refused.stderr
    recipe = _grpo_recipe(tmp_path, rewards=rewards, allow_code=True)
    result = run_cli("compile", str(recipe), "--out", str(tmp_path / "build"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = [{"function": "tests.grpo_rewards:ends_with_label", "reward": "python", "stage": "grpo"}]
    assert json.loads((tmp_path / "build" / "plan.json").read_text())["code_to_run"] == listed
    assert json.loads((tmp_path / "build" / "manifest.json").read_text())["code_to_run"] == listed
    assert "tests.grpo_rewards:ends_with_label" in (tmp_path / "build" / "plan.md").read_text()


@pytest.mark.parametrize(("command", "reward", "message"), [
    ("validate", {"kind": "regex", "pattern": "(unclosed"}, "is not a valid regular expression"),
    ("validate", {"kind": "label_set", "field": "target"}, 'label_set reward on "target" needs its labels'),
    ("validate", {"kind": "reward_model", "stage": "rm"}, 'names stage "rm", which is not a stage'),
    ("compile", {"kind": "exact_match", "field": "answer"}, 'row has no field "answer"'),  # JSON rows: only the data tells
])
def test_bad_rewards_are_refused_by_name(tmp_path: Path, command: str, reward: dict, message: str) -> None:
    result = run_cli(command, str(_grpo_recipe(tmp_path, rewards=[reward])), "--out", str(tmp_path / "b"), cwd=tmp_path) \
        if command == "compile" else run_cli(command, str(_grpo_recipe(tmp_path, rewards=[reward])), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr


def test_the_plan_prices_generation_for_the_group(tmp_path: Path) -> None:
    """Tokens are the prompts' and completions' times group_size; a KL reference on full weights
    is a second copy of the model in memory."""
    plans = {}
    for group, kl in ((4, 0.0), (8, 0.0), (8, 0.1)):
        folder = tmp_path / f"g{group}-{kl}"
        folder.mkdir()
        recipe = _grpo_recipe(folder)
        data = json.loads(recipe.read_text())
        data["stages"][1].update(group_size=group, kl_coef=kl)
        recipe.write_text(json.dumps(data))
        result = run_cli("plan", str(recipe), "--json", cwd=folder)
        assert result.returncode == 0, result.stderr
        plans[(group, kl)] = json.loads(result.stdout)["stages"][1]
    assert plans[(8, 0.0)]["train_tokens"] == pytest.approx(2 * plans[(4, 0.0)]["train_tokens"], rel=0.01)
    assert plans[(8, 0.1)]["memory"]["peak_gib"] > plans[(8, 0.0)]["memory"]["peak_gib"]
    assert plans[(8, 0.1)]["compute"]["flops"] > plans[(8, 0.0)]["compute"]["flops"]


# ---------------------------------------------------------------------------------------------
# training


def _train(build: Path, background: bool = False):
    command = [sys.executable, "-m", "runtime.train", str(build)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    if background:
        return subprocess.Popen(command, cwd=build.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(command, cwd=build.parent, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grpo")
    build = folder / "build"
    result = run_cli("compile", str(_grpo_recipe(folder)), "--out", str(build), cwd=folder)
    assert result.returncode == 0, result.stderr
    trained = _train(build)
    assert trained.returncode == 0, trained.stderr
    return build


@pytest.mark.slow
def test_the_toy_chain_learns_the_rewarded_token(toy: Path) -> None:
    """SFT teaches a scratch model to end "The day was" with one of eight words, " good" in one row
    of ten; GRPO's reward is 1 when the completion says " good". Within 16 steps the sampled and
    the greedy held-out reward rise by set margins."""
    records = [r for r in map(json.loads, (toy / "metrics.jsonl").read_text().splitlines()) if r["stage"] == "grpo"]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert records[-1]["reward_mean"] >= 0.9 and records[-1]["reward_mean"] > records[0]["reward_mean"] + 0.3
    for r in records:
        assert set(r["rewards"]) == {"good"} and 0.0 <= r["zero_std_share"] <= 1.0
        assert r["kl"] >= 0.0 and 0.0 <= r["clipfrac"] <= 1.0 and 1.0 <= r["completion_tokens"] <= 3.0
    report = next(s for s in json.loads((toy / "train_report.json").read_text())["stages"] if s["stage"] == "grpo")
    before, after = report["heldout"]["before"], report["heldout"]["after"]
    assert before["prompts"] == after["prompts"] == 16
    assert after["mean_reward"] > before["mean_reward"] + 0.5
    assert "| step | reward | good | zero-variance groups |" in (toy / "run_report.md").read_text()


@pytest.mark.slow
def test_a_killed_grpo_stage_resumes_to_the_same_weights(tmp_path: Path, toy: Path) -> None:
    """SIGKILL after the first checkpoint (step 8); the rerun resumes and ends bit-identical."""
    from safetensors.torch import load_file

    build = tmp_path / "build"
    result = run_cli("compile", str(_grpo_recipe(tmp_path)), "--out", str(build), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    process = _train(build, background=True)
    deadline = time.monotonic() + 600
    checkpoints = build / "checkpoints"
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoints.is_dir() and any("-grpo-step" in p.name and not p.name.startswith(".")
                                        and (p / "state.json").is_file() for p in checkpoints.iterdir()):
            break
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be interrupted"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    result = _train(build)
    assert result.returncode == 0, result.stderr
    assert 'stage "sft" already finished in this build; skipping it' in result.stderr
    assert 'resuming stage "grpo" at step 8' in result.stderr
    resumed = load_file(build / "model" / "model.safetensors")
    reference = load_file(toy / "model" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], atol=0, rtol=0)
