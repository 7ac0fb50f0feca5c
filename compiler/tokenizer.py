"""The tokenizer the compiler measures with; the same JSON file is shipped to the runtime."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from compiler.assets import AssetSpec, asset_path, cache_dir
from compiler.recipe import TokenizerSection
from compiler.tokenizer_convert import tiktoken_to_tokenizer_json


@dataclass(frozen=True)
class Encoder:
    """A `tokenizers.Tokenizer` with the two calls the budget needs."""

    tokenizer: Tokenizer
    json: str

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        found = self.tokenizer.token_to_id(token)
        if found is None:
            raise KeyError(token)
        return found


def load_encoder(section: TokenizerSection, asset: AssetSpec) -> Encoder:
    """Convert the pinned tiktoken ranks file once, cache the tokenizer JSON, and load it."""
    ranks = asset_path(asset)
    key = hashlib.sha256(
        json.dumps({"ranks": asset.sha256, "special": section.special_tokens, "v": 1}, sort_keys=True).encode()
    ).hexdigest()[:16]
    cached = cache_dir() / "derived" / f"tokenizer-{key}.json"
    if cached.is_file():
        text = cached.read_text(encoding="utf-8")
    else:
        text = tiktoken_to_tokenizer_json(ranks, special_tokens=dict(section.special_tokens))
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, cached)
    return Encoder(tokenizer=Tokenizer.from_str(text), json=text)
