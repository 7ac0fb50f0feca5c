"""The tokenizer the compiler measures with; the same JSON file is shipped to the runtime.

Sources: tiktoken ranks (converted once, cached), a GGUF checkpoint's embedded tokenizer
(rebuilt once, cached), a local folder with tokenizer.json, or a hub repository's tokenizer files
(fetched into the Hugging Face cache). When none can be had, the compiler plans without
measuring and says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from compiler.data.assets import asset_path
from compiler.data.hub import hub_tokenizer_folder
from compiler.data.tokenizer_convert import tiktoken_to_tokenizer_json
from compiler.diagnostics import RecipeError
from compiler.estimation.catalog import catalog_name_for_hub
from compiler.loading.loader import LoadedRecipe
from compiler.loading.recipe import PretrainedModel
from compiler.rules.context import resolve_data_path, tokenizer_format
from runtime.contract.assets import AssetError, AssetSpec, cache_dir
from runtime.contract.files import write_atomic


@dataclass(frozen=True)
class Encoder:
    """A `tokenizers.Tokenizer` with the calls the budget needs, plus its chat facts."""

    tokenizer: Tokenizer
    json: str
    source: str  # what it was built from, for the plan
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Each distinct text is encoded once: labels, templates with few fields and duplicated
        # rows repeat, and the fast tokenizer's cost is per text. Equal texts share one list of
        # ids; callers must not modify the lists they get.
        unique = list(dict.fromkeys(texts))
        if len(unique) == len(texts):
            return [e.ids for e in self.tokenizer.encode_batch(unique, add_special_tokens=False)]
        encoded = dict(zip(unique, (e.ids for e in self.tokenizer.encode_batch(unique, add_special_tokens=False))))
        return [encoded[t] for t in texts]

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


def tiktoken_encoder(asset: AssetSpec, special_tokens: dict[str, int], eos_token: str | None) -> Encoder:
    """Convert the pinned tiktoken ranks file once, cache the tokenizer JSON, and load it."""
    ranks = asset_path(asset)
    key = hashlib.sha256(
        json.dumps({"ranks": asset.sha256, "special": special_tokens, "v": 1}, sort_keys=True).encode()
    ).hexdigest()[:16]
    cached = cache_dir() / "derived" / f"tokenizer-{key}.json"
    if cached.is_file():
        text = cached.read_text(encoding="utf-8")
    else:
        text = tiktoken_to_tokenizer_json(ranks, special_tokens=dict(special_tokens))
        write_atomic(cached, text.encode("utf-8"))
    return Encoder(tokenizer=Tokenizer.from_str(text), json=text, source=f"asset:{asset.name}", eos_token=eos_token)


def gguf_tokenizer_folder(asset: AssetSpec) -> Path:
    """A Hugging Face tokenizer folder rebuilt from a pinned GGUF checkpoint, once, in the cache."""
    from compiler.data.gguf_tokenizer import write_tokenizer_dir

    folder = cache_dir() / "derived" / f"tokenizer-gguf-{asset.sha256[:16]}"
    if not (folder / "tokenizer.json").is_file():
        write_tokenizer_dir(asset_path(asset), folder)
    return folder


def gguf_encoder(asset: AssetSpec) -> Encoder:
    """The tokenizer embedded in a pinned GGUF checkpoint."""
    return folder_encoder(gguf_tokenizer_folder(asset), f"asset:{asset.name}")


def folder_encoder(folder: Path, source: str) -> Encoder:
    """A Hugging Face tokenizer folder (tokenizer.json, optional tokenizer_config.json)."""
    text = (folder / "tokenizer.json").read_text(encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}

    def token(key: str) -> str | None:
        value = config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    return Encoder(
        tokenizer=Tokenizer.from_str(text),
        json=text,
        source=source,
        bos_token=token("bos_token"),
        eos_token=token("eos_token"),
        pad_token=token("pad_token"),
        chat_template=config.get("chat_template") if isinstance(config.get("chat_template"), str) else None,
    )


def _hub_encoder(repo: str, revision: str | None, network: bool) -> Encoder | None:
    folder = hub_tokenizer_folder(repo, revision, network)
    return folder_encoder(folder, f"hub:{repo}") if folder is not None else None


def recipe_encoder(loaded: LoadedRecipe, assets: dict[str, AssetSpec]) -> Encoder | None:
    """The tokenizer a recipe's data is measured with: [tokenizer], else the pretrained model's
    own; None when it is only on the hub (the compiler then plans without measuring)."""
    r = loaded.recipe
    tok = r.tokenizer
    try:
        if tok is not None and tok.asset is not None:
            spec = assets[tok.asset]
            if tokenizer_format(tok, {n: a.filename for n, a in assets.items()}) == "tiktoken":
                return tiktoken_encoder(spec, dict(tok.special_tokens), tok.eos_token)
            return gguf_encoder(spec)
        if tok is not None and tok.path is not None:
            return folder_encoder(resolve_data_path(loaded.path, tok.path), tok.path)
        if tok is not None and tok.hub is not None:
            return _hub_encoder(tok.hub, None, network=True)
        model = r.model
        if isinstance(model, PretrainedModel):
            if model.asset is not None and assets[model.asset].filename.endswith(".gguf"):
                return gguf_encoder(assets[model.asset])
            if model.path is not None:
                folder = resolve_data_path(loaded.path, model.path)
                if (folder / "tokenizer.json").is_file():
                    return folder_encoder(folder, model.path)
            if model.hub is not None:
                # The hub is asked only when the architecture came from it too; a catalog entry
                # plans offline and uses the tokenizer when the Hugging Face cache has it.
                from_hub = model.catalog is None and model.config is None and catalog_name_for_hub(model.hub) is None
                return _hub_encoder(model.hub, model.revision, network=from_hub)
        return None
    except AssetError as exc:
        raise RecipeError.single(str(exc), **loaded.where(("tokenizer",) if tok else ("model",))) from None
