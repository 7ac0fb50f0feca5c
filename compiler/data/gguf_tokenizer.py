"""Rebuild the Hugging Face tokenizer stored in a GGUF file's metadata, without transformers.

A GGUF file carries no `tokenizer.json`: llama.cpp keeps the vocabulary, the
merges, the token types, the special token ids and the chat template as
metadata keys (`tokenizer.ggml.*`, `tokenizer.chat_template`). This module
reads those keys and builds the same byte-level BPE tokenizer that
`transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)` builds
(transformers/integrations/gguf/gguf_tokenizer_mapping.py), using only the
`tokenizers` package, then writes it out as a tokenizer folder that
`AutoTokenizer.from_pretrained(folder)` loads in well under a second instead
of the ~9 s the GGUF route takes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from compiler.data.tokenizer_convert import bytes_to_unicode

# llama.cpp token types (llama_token_type / gguf TokenType).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizer names for which transformers keeps GPT-2's own ByteLevel regex. Other
# names (llama3, qwen2, gpt-4o, ...) need a different split regex that is not
# reproduced here; refusing them beats silently tokenizing differently. "smollm" is
# listed because transformers has no entry for it. (llama.cpp also splits off every
# digit for "smollm"; for SmolLM2 that changes nothing, as no token but the ten single
# digits contains an ASCII digit.)
_GPT2_REGEX_PRES = frozenset({"smollm", "gpt-2", "default"})

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


@dataclass(frozen=True)
class GgufTokenizerFacts:
    """What a GGUF file says about its tokenizer: enough to rebuild it and to template chats.

    `tokens`, `merges` and `token_types` are tuples so the value is truly immutable.
    Ids are None where the file does not set them.
    """

    model: str
    pre: str | None
    tokens: tuple[str, ...]
    merges: tuple[str, ...]
    token_types: tuple[int, ...]
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    chat_template: str | None
    add_bos: bool
    add_eos: bool
    architecture: str | None = None
    context_length: int | None = None

    def token(self, token_id: int | None) -> str | None:
        """The text of token `token_id`, or None for a missing id."""
        return None if token_id is None else self.tokens[token_id]


class _MetadataReader(GGUFReader):
    """`GGUFReader` with a faster `_get`; same fields, same memory map.

    The stock reader slices its `np.memmap` once per value: ~250,000 slices for a
    49k-token vocabulary, each paying the memmap subclass's `__array_finalize__`,
    which makes opening a 98 MB file take ~3.5 s. Slicing a plain ndarray view of
    the same mapping gives identical arrays (still backed by the file, nothing is
    copied) in about a third of the time. Overrides a private method of the
    pinned gguf==0.19.0; tests compare the fields with the stock reader's.
    """

    def _get(
        self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None
    ) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dtype = np.dtype(dtype)
        count = int(count)
        array = plain[offset : offset + dtype.itemsize * count].view(dtype)[:count]
        return array.view(array.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def _field(reader: GGUFReader, key: str) -> Any:
    """The decoded value of metadata key `key`, or None if the file lacks it."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


def read_gguf_tokenizer(path: Path) -> GgufTokenizerFacts:
    """Read the tokenizer metadata of the GGUF file at `path` (tensors are mapped, never read)."""
    reader = _MetadataReader(Path(path))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: GGUF file has no tokenizer.ggml.tokens; it carries no tokenizer")
    architecture = _field(reader, "general.architecture")
    context_length = _field(reader, f"{architecture}.context_length") if architecture else None
    return GgufTokenizerFacts(
        model=_field(reader, "tokenizer.ggml.model"),
        pre=_field(reader, "tokenizer.ggml.pre"),
        tokens=tuple(tokens),
        merges=tuple(_field(reader, "tokenizer.ggml.merges") or ()),
        token_types=tuple(int(t) for t in _field(reader, "tokenizer.ggml.token_type") or ()),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        unk_token_id=_field(reader, "tokenizer.ggml.unknown_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        # Absent flags read as False: that is what transformers does for "gpt2" vocabularies.
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token")),
        add_eos=bool(_field(reader, "tokenizer.ggml.add_eos_token")),
        architecture=architecture,
        context_length=None if context_length is None else int(context_length),
    )


def _byte_level_vocab(tokens: tuple[str, ...]) -> dict[str, int]:
    """Token text -> id, spelled in GPT-2's byte alphabet.

    Tokens already written in that alphabet stay as they are; any other token
    (llama.cpp stores a few as raw text) is respelled from its UTF-8 bytes, as
    transformers does. A repeated spelling keeps its last id, also as transformers does.
    """
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    return {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }


def _added_tokens(facts: GgufTokenizerFacts, vocab: dict[str, int]) -> list[AddedToken]:
    """Control tokens as special, user-defined ones as plain added tokens; both kept whole.

    A control token written outside the byte alphabet is a llama.cpp mislabel and
    is skipped, as transformers does. The bos/eos/unk/pad tokens are special in any
    case: transformers makes them so when it loads the folder.
    """
    alphabet = set(bytes_to_unicode().values())
    added: list[AddedToken] = []
    for token, token_type in zip(facts.tokens, facts.token_types):
        if token_type == TOKEN_TYPE_CONTROL and set(token) <= alphabet:
            added.append(AddedToken(token, special=True, normalized=False))
    named = (facts.bos_token_id, facts.eos_token_id, facts.unk_token_id, facts.pad_token_id)
    already = {t.content for t in added}
    for token_id in named:
        token = facts.token(token_id)
        if token is not None and token not in already:
            added.append(AddedToken(token, special=True, normalized=False))
            already.add(token)
    for token, token_type in zip(facts.tokens, facts.token_types):
        if token_type == TOKEN_TYPE_USER_DEFINED and token in vocab and token not in already:
            added.append(AddedToken(token, special=False, normalized=False))
    return added


def _post_processor(facts: GgufTokenizerFacts) -> processors.TemplateProcessing:
    """The template transformers builds from the add_bos/add_eos flags (both off for SmolLM2)."""
    bos, eos = facts.token(facts.bos_token_id), facts.token(facts.eos_token_id)
    add_bos, add_eos = facts.add_bos and bos is not None, facts.add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = [(bos, facts.bos_token_id)] if add_bos else []
    special += [(eos, facts.eos_token_id)] if add_eos else []
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def build_hf_tokenizer(facts: GgufTokenizerFacts) -> Tokenizer:
    """The byte-level BPE tokenizer transformers builds from these facts."""
    if facts.model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {facts.model!r} is not supported; only byte-level BPE ('gpt2') is")
    if facts.pre is not None and facts.pre not in _GPT2_REGEX_PRES:
        raise ValueError(
            f"GGUF pre-tokenizer {facts.pre!r} needs its own split regex, which is not implemented; "
            f"supported: {', '.join(sorted(_GPT2_REGEX_PRES))}"
        )
    vocab = _byte_level_vocab(facts.tokens)
    merges = [tuple(merge.split(" ")) for merge in facts.merges]
    bpe = models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(facts)
    added = _added_tokens(facts, vocab)
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])
    return tokenizer


def tokenizer_config(facts: GgufTokenizerFacts) -> dict[str, Any]:
    """The `tokenizer_config.json` that makes transformers load the folder as the GGUF route does."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": facts.token(facts.bos_token_id),
        "eos_token": facts.token(facts.eos_token_id),
        "pad_token": facts.token(facts.pad_token_id),
        "unk_token": facts.token(facts.unk_token_id),
        "add_bos_token": facts.add_bos,
        "add_eos_token": facts.add_eos,
        "chat_template": facts.chat_template,
    }
    # The GGUF route leaves model_max_length unset (a huge sentinel); the model's context is the real limit.
    if facts.context_length is not None:
        config["model_max_length"] = facts.context_length
    return config


def _write_file(path: Path, text: str) -> None:
    """Write `text` to `path` and flush it to disk, so a renamed folder never holds a torn file."""
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    """Delete a file or folder tree; a missing path is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _swap_into_place(new: Path, out_dir: Path) -> None:
    """Move the finished folder `new` to `out_dir`, replacing what was there.

    A non-empty folder cannot be renamed over, so the old one is renamed aside
    first and deleted last; if the second rename fails the old one is put back.
    Readers may find `out_dir` missing for the instant between the two renames,
    but never find it half written.
    """
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / out_dir.name)
    try:
        os.rename(new, out_dir)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and out_dir.is_dir():
            # A concurrent writer put its own complete folder there first; keep that one.
            _remove(new)
        else:
            if old is not None and not out_dir.exists():
                os.rename(old / out_dir.name, out_dir)
            raise
    finally:
        # Keep the renamed-aside folder only if putting it back failed: it is then the sole copy.
        if old is not None and out_dir.exists():
            _remove(old)


def write_tokenizer_dir(gguf_path: Path, out_dir: Path) -> Path:
    """Write `tokenizer.json` and `tokenizer_config.json` for the GGUF at `gguf_path` into `out_dir`.

    Everything is written into a temp folder beside `out_dir` and renamed into
    place only when complete, so `out_dir` is either the old folder or the new
    one, never a mix; on failure the old folder is left untouched. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    facts = read_gguf_tokenizer(Path(gguf_path))
    tokenizer = build_hf_tokenizer(facts)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        _write_file(staging / TOKENIZER_FILE, tokenizer.to_str())
        _write_file(staging / CONFIG_FILE, json.dumps(tokenizer_config(facts), indent=2, ensure_ascii=False) + "\n")
        os.chmod(staging, 0o755)  # mkdtemp makes it owner-only; a normal folder is readable by all
        _swap_into_place(staging, out_dir)
    except BaseException:
        _remove(staging)
        raise
    return out_dir
