"""The tokenizer rebuilt from GGUF metadata matches transformers' GGUF route, and is written atomically.

Tests on a tiny GGUF written here need nothing from the network. Tests on the
pinned SmolLM2 file compare against `AutoTokenizer.from_pretrained(dir,
gguf_file=...)`; they carry the `network` marker only when that file is not yet
in the cache and would be downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFWriter
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from compiler.data import gguf_tokenizer
from compiler.data.assets import asset_path
from compiler.data.gguf_tokenizer import (
    GgufTokenizerFacts,
    build_hf_tokenizer,
    read_gguf_tokenizer,
    write_tokenizer_dir,
)
from compiler.data.tokenizer_convert import bytes_to_unicode
from runtime.contract.assets import AssetError, load_catalog

SMOLLM2 = load_catalog()["smollm2-135m-instruct-gguf"]


def _smollm2_cached() -> bool:
    try:
        asset_path(SMOLLM2, fetch=False)
    except AssetError:
        return False
    return True


def needs_smollm2(test):
    """Mark a test that uses the pinned file: `network` only when the file must be downloaded."""
    return test if _smollm2_cached() else pytest.mark.network(test)

# --- a tiny GGUF, written here --------------------------------------------------------------

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
TINY_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _tiny_tokens() -> list[str]:
    """Special tokens first (ids 0-2, as in SmolLM2), then the 256 bytes, then each merge's result."""
    tokens = [*TINY_SPECIALS, *sorted(bytes_to_unicode().values())]
    tokens += [merge.replace(" ", "") for merge in TINY_MERGES]
    return tokens


def _write_tiny_gguf(path: Path, *, add_bos: bool = False, model: str = "gpt2", pre: str = "smollm") -> Path:
    tokens = _tiny_tokens()
    writer = GGUFWriter(path, "llama")
    writer.add_context_length(256)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in TINY_SPECIALS else 1 for t in tokens])
    writer.add_token_merges(TINY_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(TINY_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return _write_tiny_gguf(tmp_path / "tiny.gguf")


def test_reads_tiny_gguf_facts(tiny_gguf):
    facts = read_gguf_tokenizer(tiny_gguf)
    assert isinstance(facts, GgufTokenizerFacts)
    assert (facts.model, facts.pre, facts.architecture, facts.context_length) == ("gpt2", "smollm", "llama", 256)
    assert list(facts.tokens) == _tiny_tokens()
    assert list(facts.merges) == TINY_MERGES
    assert facts.token_types[:4] == (3, 3, 3, 1)
    assert (facts.bos_token_id, facts.eos_token_id, facts.pad_token_id, facts.unk_token_id) == (1, 2, 2, 0)
    assert (facts.add_bos, facts.add_eos) == (False, False)
    assert facts.chat_template == TINY_TEMPLATE


def _assert_reader_matches_stock(path: Path) -> None:
    fast, stock = gguf_tokenizer._MetadataReader(path), GGUFReader(path)
    assert list(fast.fields) == list(stock.fields)
    for name, field in stock.fields.items():
        other = fast.fields[name]
        assert (other.offset, other.types, other.data) == (field.offset, field.types, field.data), name
        assert len(other.parts) == len(field.parts), name
        for a, b in zip(other.parts, field.parts):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    assert [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in fast.tensors] == [
        (t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in stock.tensors
    ]


def test_fast_reader_matches_stock_reader_on_tiny_gguf(tiny_gguf):
    _assert_reader_matches_stock(tiny_gguf)


def test_tiny_tokenizer_encodes_and_keeps_special_tokens_whole(tiny_gguf):
    facts = read_gguf_tokenizer(tiny_gguf)
    tokenizer = build_hf_tokenizer(facts)
    ids = tokenizer.encode("hello world<|im_end|>").ids
    assert [facts.tokens[i] for i in ids] == ["hello", "Ġworld", "<|im_end|>"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == "hello world<|im_end|>"


def test_add_bos_flag_reaches_both_tokenizers(tmp_path):
    path = _write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True)
    assert build_hf_tokenizer(read_gguf_tokenizer(path)).encode("hello").ids[0] == 1
    loaded = AutoTokenizer.from_pretrained(write_tokenizer_dir(path, tmp_path / "tok"))
    assert loaded("hello").input_ids[0] == 1
    assert AutoTokenizer.from_pretrained(tmp_path / "tok")("hello", add_special_tokens=False).input_ids[0] != 1


@pytest.mark.parametrize(("model", "pre", "message"), [("llama", "default", "'llama'"), ("gpt2", "qwen2", "'qwen2'")])
def test_rejects_tokenizers_it_cannot_reproduce(tmp_path, model, pre, message):
    path = _write_tiny_gguf(tmp_path / "other.gguf", model=model, pre=pre)
    with pytest.raises(ValueError, match=message):
        build_hf_tokenizer(read_gguf_tokenizer(path))


def test_write_gives_a_folder_transformers_loads(tiny_gguf, tmp_path):
    out = write_tokenizer_dir(tiny_gguf, tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert [config[k] for k in ("bos_token", "eos_token", "pad_token")] == ["<|im_start|>", "<|im_end|>", "<|im_end|>"]
    assert config["model_max_length"] == 256
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.chat_template == TINY_TEMPLATE
    assert loaded.decode(loaded("hello world").input_ids) == "hello world"


def _old_folder(parent: Path) -> Path:
    old = parent / "tok"
    old.mkdir()
    (old / "tokenizer.json").write_text("old tokenizer")
    (old / "stale.txt").write_text("from an earlier version")
    return old


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_write_replaces_an_existing_folder_and_leaves_no_temp_folders(tiny_gguf, tmp_path):
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    old = _old_folder(out_parent)
    write_tokenizer_dir(tiny_gguf, old)
    assert sorted(p.name for p in old.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    Tokenizer.from_file(str(old / "tokenizer.json"))
    assert [p.name for p in out_parent.iterdir()] == ["tok"]


def test_failure_while_writing_leaves_the_old_folder_untouched(tiny_gguf, tmp_path, monkeypatch):
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    old = _old_folder(out_parent)
    before = _snapshot(old)
    real_write = gguf_tokenizer._write_file

    def write_then_fail(path: Path, text: str) -> None:
        if path.name == "tokenizer_config.json":
            raise OSError("disk full")
        real_write(path, text)

    monkeypatch.setattr(gguf_tokenizer, "_write_file", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_tokenizer_dir(tiny_gguf, old)
    assert _snapshot(old) == before
    assert [p.name for p in out_parent.iterdir()] == ["tok"]


def test_failure_while_renaming_into_place_restores_the_old_folder(tiny_gguf, tmp_path, monkeypatch):
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    old = _old_folder(out_parent)
    before = _snapshot(old)
    real_rename = os.rename

    def rename_but_not_the_new_folder(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".tok.partial-"):
            raise OSError("rename failed")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(gguf_tokenizer.os, "rename", rename_but_not_the_new_folder)
    with pytest.raises(OSError, match="rename failed"):
        write_tokenizer_dir(tiny_gguf, old)
    monkeypatch.undo()
    assert _snapshot(old) == before
    assert [p.name for p in out_parent.iterdir()] == ["tok"]


# --- the pinned SmolLM2 file against transformers' GGUF route --------------------------------

STRINGS = [
    "Hello world!",
    "hello",
    " Hello",
    "   three leading spaces",
    "\tleading tab",
    "trailing spaces   ",
    "",
    " ",
    "\n\n\n",
    "Café, naïve, résumé, Ångström, façade",
    "Größe: Straße, über",
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "你好，世界！这是一个测试。",
    "こんにちは世界、カタカナとひらがな",
    "안녕하세요 세계",
    "Emoji: 😀🎉👍🏽 and 👨‍👩‍👧‍👦 family, flags 🇫🇷🇯🇵",
    "12345678",
    "3.14159 and 2,718,281 and 1e-10",
    "Call 555-0100 at 09:45 on 2024-01-31.",
    "def f(x):\n\treturn x ** 2  # square\n",
    'if (a && b) { printf("%d\\n", a); }\n',
    "    indented code\n        deeper\n",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "text before<|endoftext|>text after",
    "<|im_start|><|im_end|><|endoftext|>",
    "not special: <|im_start and im_end|>",
    "It's, we'll, they've, I'd, you're, don't",
    "ALL CAPS SHOUTING!!! ??? ...",
    "https://example.com/path?q=1&r=two#frag",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "mixed\r\nline\rendings\n",
    "<repo_name>recipe<file_sep>compiler/gguf_tokenizer.py",
]


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    return asset_path(SMOLLM2)


@pytest.fixture(scope="module")
def reference(smollm2_path):
    """transformers' own tokenizer for the GGUF file (~9 s to build, so once per module)."""
    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def written(smollm2_path, tmp_path_factory) -> Path:
    return write_tokenizer_dir(smollm2_path, tmp_path_factory.mktemp("smollm2") / "tokenizer")


@pytest.fixture(scope="module")
def ours(written) -> Tokenizer:
    """Our tokenizer as read back from the written tokenizer.json."""
    return Tokenizer.from_file(str(written / "tokenizer.json"))


@pytest.fixture(scope="module")
def loaded(written):
    """transformers loading the written folder, the way the runtime will."""
    return AutoTokenizer.from_pretrained(written)


@needs_smollm2
def test_smollm2_facts(smollm2_path):
    facts = read_gguf_tokenizer(smollm2_path)
    assert (facts.model, facts.pre, facts.architecture, facts.context_length) == ("gpt2", "smollm", "llama", 8192)
    assert len(facts.tokens) == len(facts.token_types) == 49152
    assert len(facts.merges) == 48900
    assert [facts.token(i) for i in (facts.bos_token_id, facts.eos_token_id, facts.pad_token_id)] == [
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    ]
    assert facts.token(facts.unk_token_id) == "<|endoftext|>"
    assert (facts.add_bos, facts.add_eos) == (False, False)


@needs_smollm2
def test_fast_reader_matches_stock_reader_on_smollm2(smollm2_path):
    _assert_reader_matches_stock(smollm2_path)


@needs_smollm2
def test_backend_json_equals_reference(ours, reference):
    assert json.loads(ours.to_str()) == json.loads(reference.backend_tokenizer.to_str())


@needs_smollm2
def test_hello_world_ids(ours, reference):
    assert ours.encode("Hello world!").ids == reference("Hello world!").input_ids == [19556, 905, 17]


@needs_smollm2
@pytest.mark.parametrize("text", STRINGS)
def test_ids_match_reference_and_round_trip(ours, loaded, reference, text):
    expected = reference(text).input_ids
    assert ours.encode(text).ids == expected
    assert loaded(text).input_ids == expected
    assert ours.decode(expected, skip_special_tokens=False) == text
    assert loaded.decode(expected) == reference.decode(expected) == text


@needs_smollm2
def test_special_tokens_and_config_match_reference(loaded, reference):
    assert loaded.special_tokens_map == reference.special_tokens_map
    assert loaded.all_special_ids == reference.all_special_ids
    assert loaded.model_max_length == 8192


@needs_smollm2
def test_chat_template_string_matches_reference(smollm2_path, loaded, reference):
    assert read_gguf_tokenizer(smollm2_path).chat_template == reference.chat_template
    assert loaded.chat_template == reference.chat_template


CONVERSATIONS = {
    "three_messages": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi! Can you help me with Python?"},
        {"role": "assistant", "content": "Of course. What do you need?"},
        {"role": "user", "content": "How do I reverse a list?\nI tried `x.reverse`."},
        {"role": "assistant", "content": "Use `x.reverse()` (in place) or `x[::-1]` (a copy)."},
        {"role": "user", "content": "Merci ! 🎉 Et en Français ?"},
    ],
}


@needs_smollm2
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_renders_like_reference(loaded, reference, name):
    messages = CONVERSATIONS[name]
    rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert loaded(rendered).input_ids == reference(rendered).input_ids
