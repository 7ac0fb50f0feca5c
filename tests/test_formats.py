"""Every data format, from its fixture file to the token ids and labels in the build.

The expected ids come from tiktoken (the reference implementation of the GPT-2 BPE), run on text
written out by hand here: the prompt and completion as a reader would render the template, and
for chats each piece of the conversation with whether it carries loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from compiler.data.assets import asset_path
from compiler.emission.build import compile_recipe
from runtime.contract.assets import load_catalog
from tests.conftest import write_json_recipe

FORMATS = Path(__file__).resolve().parent / "data" / "formats"
SPECIAL = {"<|endoftext|>": 50256, "<|im_start|>": 50257, "<|im_end|>": 50258}
EOS = 50256
# tiktoken's GPT-2 pattern (tiktoken_ext/openai_public.py, r50k_base / gpt2)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    ranks = asset_path(load_catalog()["gpt2-bpe"])
    return tiktoken.Encoding(name="gpt2-test", pat_str=GPT2_PAT, mergeable_ranks=load_tiktoken_bpe(str(ranks)),
                             special_tokens=SPECIAL)


def _compile(tmp_path: Path, fmt: str, file: str, template: dict, stages: list | None = None,
             **data) -> dict[str, list[dict]]:
    recipe = {
        "name": "formats",
        "model": {"init": "scratch", "n_embd": 16, "n_layer": 1, "n_head": 1},
        "tokenizer": {"asset": "gpt2-bpe", "special_tokens": SPECIAL, "eos_token": "<|endoftext|>"},
        "data": {"d": {"source": {"path": str(FORMATS / file)}, "format": fmt,
                       "split": {"heldout_fraction": 0.01, "seed": 0}, **data}},
        "template": template,
        "stages": stages or [{"name": "s", "kind": "sft"}],
    }
    build = compile_recipe(write_json_recipe(tmp_path, recipe))
    lines = build.files["data/d/train.jsonl"].decode().splitlines()
    return {"records": [json.loads(line) for line in lines], "plan": build.plan}


def _by_line(records: list[dict]) -> dict[int, dict]:
    return {r["line"]: r for r in records}


def _chat(reference: tiktoken.Encoding, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, supervised in pieces:
        chunk = reference.encode(text, allowed_special="all")
        ids += chunk
        labels += chunk if supervised else [-100] * len(chunk)
    return ids, labels


def test_columns_tsv(tmp_path: Path, reference) -> None:
    out = _compile(tmp_path, "columns", "columns.tsv",
                   {"prompt": "Tweet: {{ text }}\nSentiment:", "completion": " {{ label }}"},
                   file_format="tsv", columns=["id", "score", "text"], html_unescape=["text"],
                   derive=[{"name": "label", "from": "score", "edges": [-0.5, 0.5],
                            "labels": ["negative", "neutral", "positive"]}])
    rows = _by_line(out["records"])
    assert rows[1]["prompt"] == reference.encode("Tweet: great day & sun\nSentiment:")
    assert rows[1]["completion"] == reference.encode(" positive")
    assert rows[2]["completion"] == reference.encode(" negative")


def test_instruction_with_and_without_input(tmp_path: Path, reference) -> None:
    template = {"prompt": "### Instruction:\n{{ instruction }}\n{% if input %}### Input:\n{{ input }}\n{% endif %}"
                          "### Response:\n", "completion": "{{ output }}", "add_eos": True}
    rows = _by_line(_compile(tmp_path, "instruction", "instruction.jsonl", template)["records"])
    assert rows[1]["prompt"] == reference.encode("### Instruction:\nAdd the numbers.\n### Input:\n2 and 3\n### Response:\n")
    assert rows[1]["completion"] == reference.encode("5") + [EOS]
    assert rows[2]["prompt"] == reference.encode("### Instruction:\nName a primary colour.\n### Response:\n")
    assert rows[2]["completion"] == reference.encode("Red") + [EOS]


def test_completion_pairs(tmp_path: Path, reference) -> None:
    template = {"prompt": "User: {{ user_input }}\nBot:", "completion": " {{ completion }}"}
    rows = _by_line(_compile(tmp_path, "completion", "completion.jsonl", template)["records"])
    assert rows[2]["prompt"] == reference.encode("User: Capital of France?\nBot:")
    assert rows[2]["completion"] == reference.encode(" Paris.")


def test_scored_completions_carry_their_score(tmp_path: Path, reference) -> None:
    template = {"prompt": "{{ user_input }}\n", "completion": "{{ completion }}"}
    stages = [{"name": "rm", "kind": "reward", "objective": "regression"}]
    rows = _by_line(_compile(tmp_path, "scored", "scored.jsonl", template, stages)["records"])
    assert rows[1]["completion"] == reference.encode("It was great!") and rows[1]["score"] == 2.5
    assert rows[2]["score"] == -1.0


def test_preference_pairs_keep_chosen_and_rejected(tmp_path: Path, reference) -> None:
    template = {"prompt": "Q: {{ prompt }}\nA:", "completion": " {{ chosen }}"}
    stages = [{"name": "dpo", "kind": "dpo"}]
    rows = _by_line(_compile(tmp_path, "preference", "preference.jsonl", template, stages)["records"])
    assert rows[2]["prompt"] == rows[2]["rejected_prompt"] == reference.encode("Q: Count to three.\nA:")
    assert rows[2]["completion"] == reference.encode(" 1, 2, 3")
    assert rows[2]["rejected"] == reference.encode(" 3, 2, 1")


def test_prompt_only(tmp_path: Path, reference) -> None:
    recipe_stages = [{"name": "sft", "kind": "sft", "data": "c"},
                     {"name": "rm", "kind": "reward", "data": "s", "objective": "regression", "from": "sft"},
                     {"name": "ppo", "kind": "ppo", "data": "d", "from": "sft", "reward_model": "rm"}]
    recipe = {
        "name": "prompts",
        "model": {"init": "scratch", "n_embd": 16, "n_layer": 1, "n_head": 1},
        "tokenizer": {"asset": "gpt2-bpe", "special_tokens": SPECIAL, "eos_token": "<|endoftext|>"},
        "data": {
            "d": {"source": {"path": str(FORMATS / "prompt.jsonl")}, "format": "prompt",
                  "split": {"heldout_fraction": 0.01}, "template": {"prompt": "Task: {{ user_input }}\n"}},
            "c": {"source": {"path": str(FORMATS / "completion.jsonl")}, "format": "completion"},
            "s": {"source": {"path": str(FORMATS / "scored.jsonl")}, "format": "scored"},
        },
        "template": {"prompt": "{{ user_input }}\n", "completion": "{{ completion }}"},
        "stages": recipe_stages,
    }
    build = compile_recipe(write_json_recipe(tmp_path, recipe))
    rows = _by_line([json.loads(x) for x in build.files["data/d/train.jsonl"].decode().splitlines()])
    assert rows[1]["prompt"] == reference.encode("Task: Write a haiku about rain.\n")
    assert rows[1]["completion"] == []


def test_openai_chat_multi_turn_assistant_only_loss(tmp_path: Path, reference) -> None:
    out = _compile(tmp_path, "openai-chat", "openai-chat.jsonl", {"chat": "chatml", "loss": "assistant"})
    rows = _by_line(out["records"])
    ids, labels = _chat(reference, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>\n", True),
        ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False),
        ("See you<|im_end|>\n", True),
    ])
    assert (rows[1]["input_ids"], rows[1]["labels"]) == (ids, labels)
    # piecewise encoding equals encoding the whole conversation at once
    whole = "".join(["<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
                     "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n",
                     "<|im_start|>assistant\nSee you<|im_end|>\n"])
    assert rows[1]["input_ids"] == reference.encode(whole, allowed_special="all")


def test_openai_chat_last_assistant_only(tmp_path: Path, reference) -> None:
    out = _compile(tmp_path, "openai-chat", "openai-chat.jsonl", {"chat": "chatml", "loss": "last_assistant"})
    rows = _by_line(out["records"])
    ids, labels = _chat(reference, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>\n", False),
        ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False),
        ("See you<|im_end|>\n", True),
    ])
    assert (rows[1]["input_ids"], rows[1]["labels"]) == (ids, labels)


def test_chatglm_conversations_from_a_json_array(tmp_path: Path, reference) -> None:
    out = _compile(tmp_path, "chatglm-chat", "chatglm-chat.json", {"chat": "chatglm3", "loss": "assistant"})
    rows = _by_line(out["records"])
    assert set(rows) == {2, 9}  # the line each conversation starts on
    ids, labels = _chat(reference, [
        ("[gMASK]sop<|system|>\n You are ChatGLM3.<|user|>\n Weather in Paris?<|assistant|>", False),
        ("\n Let me check.", True),
        ("<|observation|>\n 18C, cloudy<|assistant|>", False),  # a tool result is an observation turn
        ("\n It is 18C and cloudy.", True),
    ])
    assert (rows[2]["input_ids"], rows[2]["labels"]) == (ids, labels)


def test_sharegpt_from_value(tmp_path: Path, reference) -> None:
    out = _compile(tmp_path, "sharegpt", "sharegpt.jsonl", {"chat": "chatml", "loss": "assistant"})
    rows = _by_line(out["records"])
    ids, labels = _chat(reference, [
        ("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("Merci<|im_end|>\n", True),
    ])
    assert (rows[2]["input_ids"], rows[2]["labels"]) == (ids, labels)
    assert sum(1 for x in rows[1]["labels"] if x != -100) == len(reference.encode("9<|im_end|>\n16<|im_end|>\n",
                                                                                  allowed_special="all"))


def test_a_system_message_is_added_where_the_data_has_none(tmp_path: Path, reference) -> None:
    out = _compile(tmp_path, "sharegpt", "sharegpt.jsonl", {"chat": "chatml", "system": "Be exact."})
    rows = _by_line(out["records"])
    text = reference.decode(rows[1]["input_ids"])
    assert text.startswith("<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\nWhat is 3*3?")
    assert reference.decode(rows[2]["input_ids"]).startswith("<|im_start|>system\nAnswer in French.")


def test_templates_can_live_in_files_next_to_the_recipe(tmp_path: Path, reference) -> None:
    (tmp_path / "prompt.j2").write_text("User: {{ user_input }}\nBot:")
    (tmp_path / "completion.j2").write_text(" {{ completion }}")
    template = {"prompt_file": "prompt.j2", "completion_file": "completion.j2"}
    rows = _by_line(_compile(tmp_path, "completion", "completion.jsonl", template)["records"])
    assert rows[1]["prompt"] == reference.encode("User: How are you?\nBot:")
    assert rows[1]["completion"] == reference.encode(" Fine, thanks.")
