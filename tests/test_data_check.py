"""`recipe data check`: error categories by hand, the epochs heuristic, and billing recounted with
tiktoken by the OpenAI cookbook's formula (written out here, not imported from the code)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from compiler.data.assets import asset_path
from compiler.data.billing import CL100K_PATTERN, CL100K_SPECIAL_TOKENS, cost_usd, default_epochs
from runtime.contract.assets import load_catalog
from tests.conftest import run_cli

FORMATS = Path(__file__).resolve().parent / "data" / "formats"


@pytest.fixture(scope="module")
def cl100k() -> tiktoken.Encoding:
    ranks = asset_path(load_catalog()["cl100k-base"])
    return tiktoken.Encoding(name="cl100k", pat_str=CL100K_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(ranks)),
                             special_tokens=CL100K_SPECIAL_TOKENS)


def _cookbook_tokens(messages: list[dict], enc: tiktoken.Encoding) -> int:
    n = 3
    for message in messages:
        n += 3
        for key, value in message.items():
            n += len(enc.encode(value))
            if key == "name":
                n += 1
    return n


def test_cl100k_from_the_pinned_asset_matches_known_ids(cl100k) -> None:
    # "hello world" is [15339, 1917] in cl100k_base (OpenAI's tokenizer page shows the same ids)
    assert cl100k.encode("hello world") == [15339, 1917]


def test_epochs_heuristic() -> None:
    assert default_epochs(100) == 3  # 300 examples seen: within [100, 25000]
    assert default_epochs(10) == 10  # raised to reach 100
    assert default_epochs(2) == 25  # ... but never above 25
    assert default_epochs(20_000) == 1  # lowered to stay under 25,000
    assert default_epochs(9_000) == 2


def test_one_hundred_thousand_tokens_at_three_epochs_cost_2_40() -> None:
    assert cost_usd(100_000, 3) == 2.40


def test_cli_bills_a_file_of_exactly_100k_tokens_at_2_40(tmp_path: Path, cl100k) -> None:
    # 100 examples of exactly 1,000 tokens: 3 (priming) + user (3 + 1 role + 988 content) + assistant (3 + 1 + 1)
    assert len(cl100k.encode(" a")) == 1 and len(cl100k.encode("a" + " a" * 987)) == 988
    example = {"messages": [{"role": "user", "content": "a" + " a" * 987}, {"role": "assistant", "content": "b"}]}
    assert _cookbook_tokens(example["messages"], cl100k) == 1000
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(example) + "\n" for _ in range(100)))
    result = run_cli("data", "check", str(path), "--format", "openai-chat", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_examples"] == 100 and report["errors"] == {}
    assert report["billing_tokens"] == 100_000 and report["epochs"] == 3
    assert report["cost_usd"] == 2.40
    assert report["warnings"] == {"missing_system_message": 100}


def test_price_epochs_and_limit_are_overridable(tmp_path: Path, cl100k) -> None:
    long_user = "a" + " a" * 5999  # 6,000 content tokens: over the 4,096 billing limit
    example = {"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(example) + "\n")
    result = run_cli("data", "check", str(path), "--format", "openai-chat", "--json", "--epochs", "2",
                     "--usd-per-1k-tokens", "0.01")
    report = json.loads(result.stdout)
    assert report["warnings"]["over_token_limit"] == 1
    assert report["billing_tokens"] == 4096 and report["epochs"] == 2
    assert report["cost_usd"] == round(4096 * 2 / 1000 * 0.01, 4)


def test_error_categories_counted_like_the_openai_checker() -> None:
    # openai-chat-bad.jsonl, line by line:
    #  1 fine (no system message: warning)      2 [1, 2]: data_type
    #  3 no messages: missing_messages_list     4 user without content: message_missing_key + missing_content;
    #                                              extra key: message_unrecognized_key
    #  5 role robot: unrecognized_role; content 5: missing_content; no user: warning
    #  6 no assistant: example_missing_assistant_message      7 {broken: invalid_json
    result = run_cli("data", "check", str(FORMATS / "openai-chat-bad.jsonl"), "--format", "openai-chat", "--json")
    assert result.returncode == 1  # format errors: exit 1
    report = json.loads(result.stdout)
    assert report["n_examples"] == 7
    assert report["errors"] == {
        "data_type": 1, "example_missing_assistant_message": 1, "invalid_json": 1, "message_missing_key": 1,
        "message_unrecognized_key": 1, "missing_content": 2, "missing_messages_list": 1, "unrecognized_role": 1,
    }
    assert report["warnings"] == {"missing_system_message": 3, "missing_user_message": 1}


def test_text_report_names_rows_and_categories() -> None:
    result = run_cli("data", "check", str(FORMATS / "openai-chat-bad.jsonl"), "--format", "openai-chat")
    assert "line 2: each line must be a JSON object, found an array [data_type]" in result.stdout
    assert "line 7: invalid JSON" in result.stdout and "[invalid_json]" in result.stdout
    assert "Traceback" not in result.stderr


def test_other_formats_are_billed_as_single_turn_conversations(cl100k) -> None:
    result = run_cli("data", "check", str(FORMATS / "completion.jsonl"), "--format", "completion", "--json")
    report = json.loads(result.stdout)
    expected = sum(_cookbook_tokens([{"role": "user", "content": u}, {"role": "assistant", "content": c}], cl100k)
                   for u, c in (("How are you?", "Fine, thanks."), ("Capital of France?", "Paris.")))
    assert report["billing_tokens"] == expected
    assert report["epochs"] == min(25, math.ceil(100 / 2))  # 2 examples: raised towards 100, capped at 25
