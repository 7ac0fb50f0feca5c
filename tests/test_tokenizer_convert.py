"""tiktoken ranks -> tokenizers JSON must encode exactly like tiktoken itself."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str
from tokenizers import Tokenizer

from compiler.data.assets import asset_path
from compiler.data.tokenizer_convert import (
    GPT2_PATTERN,
    last_merge,
    read_tiktoken_ranks,
    tiktoken_to_tokenizer_json,
)
from runtime.contract.assets import load_catalog

ENDOFTEXT = "<|endoftext|>"

TRICKY = [
    "Hello world!",
    "",
    " ",
    "   leading and trailing   ",
    "multiple     spaces\tand\t\ttabs",
    "windows\r\nline\r\nendings\r\n",
    "blank\n\n\nlines\n",
    "I'm sure you'll see they've said it's what we'd do",
    "SHOUTING: I'M, YOU'LL, 'quoted'",
    "numbers 0 12 345 6789 3.14159 1,000,000 -42 1e10",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &#39;x&#39; &quot;",
    "naïve café résumé façade Ångström",
    "日本語のテキスト 中文 한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🏳️‍🌈",
    "combining e\u0301 and zero\u200bwidth",
    "nbsp\u00a0here, ideographic\u3000space, NEL\x85, LS\u2028",
    "tabs\t\t\nmixed \t \n whitespace",
    "url https://example.com/a?b=c&d=e#f",
    "code: def f(x): return x**2  # comment",
    "@user #hashtag RT :) :-( <3 ...!!! ???",
]


def _write_ranks(path: Path, ranks: dict[bytes, int]) -> Path:
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tiny_ranks(tmp_path) -> Path:
    """256 single bytes plus a few merges, including 'abc' whose BPE split is (ab, c), not (a, bc)."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in [b"ab", b"bc", b"abc", b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"  "]:
        ranks[token] = len(ranks)
    return _write_ranks(tmp_path / "tiny.tiktoken", ranks)


def _tiktoken_reference(ranks_path: Path, special_tokens: dict[str, int]) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="reference",
        pat_str=r50k_pat_str,
        mergeable_ranks=read_tiktoken_ranks(ranks_path),
        special_tokens=special_tokens,
    )


def test_tiny_ranks_match_tiktoken(tiny_ranks):
    special = {ENDOFTEXT: 269}
    tokenizer = Tokenizer.from_str(tiktoken_to_tokenizer_json(tiny_ranks, special_tokens=special))
    reference = _tiktoken_reference(tiny_ranks, special)

    assert tokenizer.get_vocab_size() == 270
    assert tokenizer.encode("hello world").ids == [262, 267]
    for text in TRICKY + ["abc", "abcd", "abcabc xabcx", "hellohello", "  world"]:
        ids = tokenizer.encode(text).ids
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode(f"ab{ENDOFTEXT}c").ids == reference.encode(f"ab{ENDOFTEXT}c", allowed_special="all")


def test_merge_is_the_one_tiktoken_makes_last(tiny_ranks):
    ranks = read_tiktoken_ranks(tiny_ranks)
    assert last_merge(ranks, b"abc") == (b"ab", b"c")
    assert last_merge(ranks, b"hello") == (b"hell", b"o")


def test_output_is_deterministic_across_processes(tiny_ranks):
    special = {ENDOFTEXT: 269}
    first = tiktoken_to_tokenizer_json(tiny_ranks, special_tokens=special)
    assert tiktoken_to_tokenizer_json(tiny_ranks, special_tokens=special) == first
    # A fresh interpreter gets fresh hash seeds (Python's and the Rust library's).
    script = (
        "import sys; from pathlib import Path; from compiler.data.tokenizer_convert import tiktoken_to_tokenizer_json; "
        f"sys.stdout.write(tiktoken_to_tokenizer_json(Path({str(tiny_ranks)!r}), special_tokens={special!r}))"
    )
    other = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    assert other == first


def test_rejects_files_that_are_not_byte_level(tmp_path):
    ranks = _write_ranks(tmp_path / "partial.tiktoken", {b"a": 0, b"b": 1, b"ab": 2})
    with pytest.raises(ValueError, match="single bytes"):
        tiktoken_to_tokenizer_json(ranks, special_tokens={})


def test_rejects_special_id_that_collides(tiny_ranks):
    with pytest.raises(ValueError, match="already the id"):
        tiktoken_to_tokenizer_json(tiny_ranks, special_tokens={ENDOFTEXT: 5})


def test_rejects_possessive_interval_pattern(tiny_ranks):
    with pytest.raises(ValueError, match=r"\{1,3\}\+"):
        tiktoken_to_tokenizer_json(tiny_ranks, special_tokens={}, pattern=r"\p{N}{1,3}+|\s+")


@pytest.fixture(scope="module")
def gpt2() -> tuple[Tokenizer, tiktoken.Encoding, str]:
    ranks_path = asset_path(load_catalog()["gpt2-bpe"])
    special = {ENDOFTEXT: 50256}
    text = tiktoken_to_tokenizer_json(ranks_path, special_tokens=special, pattern=GPT2_PATTERN)
    return Tokenizer.from_str(text), _tiktoken_reference(ranks_path, special), text


@pytest.mark.network
def test_gpt2_known_ids(gpt2):
    tokenizer, _, _ = gpt2
    assert tokenizer.get_vocab_size() == 50257
    assert tokenizer.encode("Hello world!").ids == [15496, 995, 0]
    assert tokenizer.encode(ENDOFTEXT).ids == [50256]
    assert tokenizer.token_to_id(ENDOFTEXT) == 50256


@pytest.mark.network
def test_gpt2_conversion_is_byte_identical(gpt2):
    _, _, text = gpt2
    ranks_path = asset_path(load_catalog()["gpt2-bpe"])
    again = tiktoken_to_tokenizer_json(ranks_path, special_tokens={ENDOFTEXT: 50256})
    assert hashlib.sha256(again.encode()).hexdigest() == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.network
@pytest.mark.parametrize("text", TRICKY)
def test_gpt2_matches_tiktoken_on_tricky_strings(gpt2, text):
    tokenizer, reference, _ = gpt2
    ids = tokenizer.encode(text).ids
    assert ids == reference.encode(text)
    assert tokenizer.decode(ids) == text


@pytest.mark.network
def test_gpt2_matches_tiktoken_on_all_vader_tweets(gpt2):
    tokenizer, reference, _ = gpt2
    lines = asset_path(load_catalog()["vader-tweets"]).read_text(encoding="utf-8").splitlines()
    tweets = [line.split("\t", 2)[2] for line in lines]
    assert len(tweets) == 4200

    encoded = tokenizer.encode_batch(tweets)
    mismatches = [t for t, e in zip(tweets, encoded, strict=True) if e.ids != reference.encode(t)]
    assert mismatches == []
    assert [tokenizer.decode(e.ids) for e in encoded] == tweets
