"""`recipe chat`: commands on their own, then the loop driven through stdin on tiny builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.chat import GENERATION_DEFAULTS, Session
from tests.conftest import REPO, base_recipe, run_cli, write_json_recipe


def test_conf_takes_typed_literals_and_never_evaluates() -> None:
    s = Session()
    assert s.command(":conf temperature=0.2") == ("(temperature = 0.2)", False)
    assert s.conf["temperature"] == 0.2
    assert s.command(":conf max_new_tokens=7")[0] == "(max_new_tokens = 7)"
    assert s.command(":conf top_p=1")[0] == "(top_p = 1.0)"  # an int literal where a float is expected
    for bad in ('__import__("os").system("touch pwned")', "open('x')", "1+1", "[].__class__"):
        message, leave = s.command(f":conf temperature={bad}")
        assert message.startswith("error:") and "not a literal" in message and not leave
    assert s.command(":conf max_new_tokens=True")[0] == "error: max_new_tokens takes a int, got 'True'"
    assert s.command(":conf do_sample='yes'")[0].startswith("error: do_sample takes a bool")
    assert s.command(":conf temperature=-1")[0] == "error: temperature must not be negative"
    assert s.command(":conf colour=3")[0].startswith("error: use :conf key=value")
    assert s.conf["temperature"] == 0.2 and s.conf["max_new_tokens"] == 7
    assert s.command(":reset-conf")[0] == "(settings reset)" and s.conf == GENERATION_DEFAULTS
    assert not Path("pwned").exists()


def test_history_seed_help_and_exit() -> None:
    s = Session()
    assert s.command(":history")[0] == "(no history)"
    s.history += [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert s.command(":history")[0] == "user: hi\nassistant: hello"
    assert s.command(":clear")[0] == "(history cleared)" and s.history == []
    assert s.command(":seed 42")[0] == "(seed 42)" and s.seed == 42
    assert s.command(":seed x")[0].startswith("error: :seed takes an integer")
    assert ":conf key=value" in s.command(":help")[0]
    assert s.command(":nope")[0] == "error: unknown command :nope (try :help)"
    assert s.command(":exit") == ("", True)


@pytest.fixture(scope="module")
def chat_build(tmp_path_factory) -> Path:
    """A compiled (untrained) chat build: a tiny Llama with the GPT-2 vocabulary and the ChatML template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=50256,
                                 eos_token_id=50256)).save_pretrained(tmp / "llama")
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(12)]
    (tmp / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = base_recipe(name="chat")
    recipe["model"] = {"init": "pretrained", "path": str(tmp / "llama")}
    recipe["data"] = {"chat": {"source": {"path": str(tmp / "chat.jsonl")}, "format": "openai-chat",
                               "split": {"heldout_fraction": 0.25, "seed": 1}}}
    recipe["template"] = {"chat": "chatml", "loss": "assistant"}
    recipe["tokens"] = {"max_total": "auto", "coverage": 1.0}
    del recipe["eval"]
    path = write_json_recipe(tmp, recipe)
    result = run_cli("compile", str(path), "--out", str(tmp / "build"), cwd=tmp)
    assert result.returncode == 0, result.stderr
    return tmp / "build"


def _chat(build: Path, stdin: str, *args: str) -> subprocess.CompletedProcess:
    # from the directory the build was compiled in: a model.path is relative to it
    return subprocess.run([sys.executable, "-m", "compiler.cli", "chat", str(build), *args], input=stdin,
                          capture_output=True, text=True, cwd=build.parent, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO)))


def test_chat_loop_answers_keeps_history_and_rejects_code(chat_build: Path) -> None:
    script = "\n".join([
        ":conf max_new_tokens=4",
        "first message",
        ":history",
        ':conf temperature=__import__("os")',
        "second message",
        ":history",
        ":conf do_sample=True",
        ":seed 5",
        ":clear",
        "same question",
        ":clear",
        ":seed 5",
        "same question",
        ":exit",
        "never read",
    ]) + "\n"
    result = _chat(chat_build, script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "(max_new_tokens = 4)"
    first_reply = lines[1]
    # :history shows both turns of the first exchange, the reply as generated
    assert lines[2] == "user: first message" and lines[3] == f"assistant: {first_reply.strip()}"
    assert lines[4].startswith("error:") and "not a literal" in lines[4]
    second = lines.index("user: second message")
    assert lines[second - 2] == "user: first message"  # history kept across turns
    # sampling with the same seed and the same (cleared) history gives the same reply
    replies = [lines[i + 1] for i, line in enumerate(lines) if line in ("(history cleared)", "(seed 5)")
               and i + 1 < len(lines) and not lines[i + 1].startswith("(")]
    assert len(replies) == 2 and replies[0] == replies[1]


def test_chat_with_a_prompt_template_and_one_shot_prompt(tmp_path: Path) -> None:
    recipe = base_recipe(name="oneshot")
    del recipe["eval"]
    path = write_json_recipe(tmp_path, recipe)
    assert run_cli("compile", str(path), "--out", str(tmp_path / "b"), cwd=tmp_path).returncode == 0
    n_positions = json.loads((tmp_path / "b" / "runtime.json").read_text())["model"]["n_positions"]
    result = _chat(tmp_path / "b", "", "--prompt", "what a lovely day")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and "error" not in result.stdout
    # the prompt template is filled with the message; a message past the context is refused, not crashed on
    long = _chat(tmp_path / "b", "", "--prompt", "word " * 50)
    assert long.returncode == 0, long.stderr
    assert f"the model's context is {n_positions}; :clear to start over" in long.stdout


def test_chat_refuses_a_directory_that_is_not_a_build(tmp_path: Path) -> None:
    result = _chat(tmp_path, "")
    assert result.returncode == 1 and "not a build directory" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_language_model_eval_equals_an_independent_loss(chat_build: Path, tmp_path: Path) -> None:
    """Held-out loss over the assistant tokens, recomputed with transformers' own loss per row."""
    import torch
    from transformers import AutoModelForCausalLM

    from runtime.contract.config import load_runtime_config
    from runtime.core.data import read_training_rows

    recipe = json.loads((chat_build.parent / "recipe.json").read_text())
    recipe["name"] = "chat-eval"
    recipe["eval"] = {"kind": "language_model", "samples": 2, "max_new_tokens": 4}
    recipe["train"] = {"max_steps": 3, "micro_batch_size": 4, "learning_rate": 1e-3}
    path = write_json_recipe(chat_build.parent, recipe, name="chat-eval.json")
    build = chat_build.parent / "chat-eval"
    assert run_cli("compile", str(path), "--out", str(build), cwd=chat_build.parent).returncode == 0
    ran = run_cli("run", str(build), cwd=chat_build.parent)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    report = json.loads((build / "eval.json").read_text())
    assert "held-out loss" in ran.stdout and len(report["samples"]) == 2
    assert (build / "eval.md").read_text().startswith("# Eval: chat-eval")

    config = load_runtime_config(build)
    model = AutoModelForCausalLM.from_pretrained(build / "model").eval()
    rows = read_training_rows(build / config.data["chat"].heldout)
    total = count = 0.0
    with torch.no_grad():
        for row in rows:
            labels = torch.tensor([row.labels])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=torch.tensor([row.input_ids]), labels=labels).loss) * n
            count += n
    assert report["n"] == len(rows) == 3 and report["supervised_tokens"] == count
    assert report["loss"] == pytest.approx(total / count, abs=1e-4)
