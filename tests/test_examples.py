"""Every example recipe validates and compiles here, and its plan says what the workflow needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler.emission.build import compile_recipe
from compiler.loading.overrides import parse_override
from tests.conftest import REPO, run_cli

EXAMPLES = REPO / "specs" / "examples"


def _generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_seed_chat", EXAMPLES / "data" / "build_seed_chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.stem)
def test_every_example_validates_from_the_command_line(path: Path) -> None:
    result = run_cli("validate", str(path.relative_to(REPO)))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_chatglm3_ptuning_compiles_offline_with_the_published_trainable_count() -> None:
    build = compile_recipe(EXAMPLES / "chatglm3-ptuning.toml")
    stage = build.plan["stages"][0]
    assert stage["params"]["trainable"] == 1_835_008  # BRIEF workflow 3
    assert stage["steps"] == 1000 and stage["global_batch_size"] == 16
    assert build.plan["model"]["parameters"]["total"] == 6_243_584_000
    runtime = json.loads(build.files["runtime.json"])
    assert runtime["model"]["trust_remote_code"] is True
    assert runtime["stages"][0]["adapter"] == {"kind": "prefix", "params": {
        "num_virtual_tokens": 128, "projection": False, "projection_hidden_size": None}}
    assert runtime["tokenizer"] == {"file": None, "hub": "THUDM/chatglm3-6b", "eos_token": None, "pad_token": None}
    assert runtime["data"]["seed-tasks"]["tokenized"] is False
    assert "not measured" in build.files["plan.md"].decode()


def test_qwen2_lora_compiles_offline_with_grouped_query_lora_shapes() -> None:
    build = compile_recipe(EXAMPLES / "qwen2-7b-lora.toml")
    stage = build.plan["stages"][0]
    assert stage["params"]["trainable"] == 10_092_544  # r32 on q_proj (3584->3584), v_proj (3584->512)
    assert stage["global_batch_size"] == 16
    assert build.plan["model"]["architecture_from"] == "qwen2-7b-instruct"


def test_smollm2_chat_sft_measures_with_the_checkpoints_own_tokenizer() -> None:
    build = compile_recipe(EXAMPLES / "smollm2-chat-sft.toml")
    data = build.plan["data"]["chat"]
    assert data["tokens"]["measured"] and data["loss"] == "assistant"
    assert data["rows"] == 175
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(build.files["tokenizer/tokenizer.json"].decode())
    first = json.loads(build.files["data/chat/train.jsonl"].decode().splitlines()[0])
    ids, labels = first["input_ids"], first["labels"]
    assert len(ids) == len(labels) <= data["tokens"]["max_total_tokens"]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    supervised = tokenizer.decode([t for t, l in zip(ids, labels) if l != -100], skip_special_tokens=False)
    # the system and user turns carry no loss; the assistant turn (and its end marker) does
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert supervised.endswith("<|im_end|>\n") and "<|im_start|>" not in supervised
    assert supervised.removesuffix("<|im_end|>\n") in text


def test_rlhf_chain_compiles_with_each_stage_reading_the_one_before() -> None:
    build = compile_recipe(EXAMPLES / "tweet-rlhf.toml")
    stages = {s["name"]: s for s in build.plan["stages"]}
    assert [s["kind"] for s in build.plan["stages"]] == ["sft", "reward", "ppo"]
    assert stages["reward"]["from"] == "sft" and stages["ppo"]["from"] == "sft"
    runtime = json.loads(build.files["runtime.json"])
    ppo = runtime["stages"][2]["params"]
    assert (ppo["reward_model"], ppo["kl_coef"], ppo["clip_eps"], ppo["value_clip"], ppo["ptx_coef"]) == (
        "reward", 0.1, 0.2, 0.4, 0.5)
    assert runtime["stages"][2]["max_steps"] == 16 and ppo["rollout_batch_size"] == 8  # 16 rollout batches
    assert runtime["stages"][1]["params"]["objective"] == "regression"


def test_dpo_pairs_are_cut_from_the_human_scores() -> None:
    """Each tweet becomes a pair: chosen = the label its score gives (the SFT data's label for the same
    row), rejected = the other label."""
    from tokenizers import Tokenizer

    build = compile_recipe(EXAMPLES / "tweet-dpo.toml")
    runtime = json.loads(build.files["runtime.json"])
    assert [(s["name"], s["kind"], s["start"]) for s in runtime["stages"]] == [("sft", "sft", "base"),
                                                                                ("dpo", "dpo", "sft")]
    tokenizer = Tokenizer.from_str(build.files["tokenizer/tokenizer.json"].decode())
    labelled = {r["line"]: r for r in map(json.loads, build.files["data/tweets/train.jsonl"].decode().splitlines())}
    pairs = [json.loads(line) for line in build.files["data/pairs/train.jsonl"].decode().splitlines()]
    assert len(pairs) == len(labelled) == 1080  # 1,200 rows, 10% held out, none dropped
    opposite = {" positive": " negative", " negative": " positive"}
    for pair in pairs:
        chosen, rejected = tokenizer.decode(pair["completion"][:-1]), tokenizer.decode(pair["rejected"][:-1])
        assert opposite[chosen] == rejected
        assert pair["completion"] == labelled[pair["line"]]["completion"]
        assert pair["rejected_prompt"] == pair["prompt"]


def test_overrides_are_typed_validated_and_shown_in_the_plan() -> None:
    recipe = EXAMPLES / "tweet-sentiment.toml"
    build = compile_recipe(recipe, [parse_override("train.learning_rate=1e-4"),
                                    parse_override("stages.sft.epochs=2")])
    runtime = json.loads(build.files["runtime.json"])
    assert runtime["stages"][0]["learning_rate"] == 1e-4 and runtime["stages"][0]["epochs"] == 2
    assert build.plan["overrides"] == ["train.learning_rate=1e-4", "stages.sft.epochs=2"]
    assert "--set train.learning_rate=1e-4" in build.files["plan.md"].decode()


def test_a_bad_override_points_at_the_command_line() -> None:
    result = run_cli("validate", "specs/examples/tweet-sentiment.toml", "--set", "train.learning_rate=fast",
                     "--set", "hardware.precision=fp8")
    assert result.returncode == 1
    assert result.stderr == (
        'error: hardware.precision = "fp8" is not one of: fp32, bf16, fp16\n'
        "  --> command line\n"
        "   | --set hardware.precision=fp8\n"
        "\n"
        'error: train.learning_rate = "fast": should be a valid number\n'
        "  --> command line\n"
        "   | --set train.learning_rate=fast\n"
        "\n"
        "2 errors\n"
    )


def test_override_of_a_missing_stage_is_an_error() -> None:
    result = run_cli("validate", "specs/examples/tweet-sentiment.toml", "--set", "stages.dpo.beta=0.2")
    assert result.returncode == 1
    assert "no element named \"dpo\"" in result.stderr and "names: sft" in result.stderr


def test_committed_chat_data_equals_its_generator(tmp_path: Path) -> None:
    from compiler.data.assets import fetch_all
    from runtime.contract.assets import load_catalog

    seed_tasks = fetch_all(["seed-tasks"], load_catalog())["seed-tasks"]
    committed = (EXAMPLES / "data" / "seed-tasks-chat.jsonl").read_text(encoding="utf-8")
    generator = _generator()
    assert committed == generator.render(generator.chat_records(seed_tasks))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.stem)
def test_toml_and_json_spellings_of_a_recipe_mean_the_same(path: Path, tmp_path: Path) -> None:
    import tomllib

    from compiler.loading.loader import load_recipe

    (tmp_path / "data").symlink_to(EXAMPLES / "data")
    as_json = tmp_path / f"{path.stem}.json"
    as_json.write_text(json.dumps(tomllib.loads(path.read_text(encoding="utf-8")), indent=2))
    assert load_recipe(as_json).recipe == load_recipe(path).recipe


def test_run_refuses_by_name_what_the_runtime_does_not_train_yet(tmp_path: Path) -> None:
    build = tmp_path / "build"
    compiled = run_cli("compile", "specs/examples/tweet-rlhf.toml", "--out", str(build), "--set", "train.packing=true",
                       "--set", "hardware.zero_stage=1")
    assert compiled.returncode == 0, compiled.stderr
    result = run_cli("run", str(build))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot execute it yet" in result.stderr
    for stage in ("reward", "ppo"):  # every stage that cannot pack is named, with the way out
        assert f'stage "{stage}" asks for packing, which packs pretrain and sft sequences; a {stage} stage ' \
            "compares or scores whole rows (set packing = false for it)" in result.stderr
    assert 'stage "sft" asks for packing' not in result.stderr  # sft packs
    assert 'stage "ppo" is ppo, which runs on one process or DistributedDataParallel' in result.stderr
    assert not (build / "model").exists() and not (build / "metrics.jsonl").exists()
