"""The architecture and tokenizer files of a hub model, from where its weights are.

`model.hub` (+ `revision`) names a Hugging Face repository. Only its small files are fetched
(config.json, generation_config.json and the tokenizer files), through `huggingface_hub`, into
the standard Hugging Face cache, so `HF_HOME` / `HF_HUB_CACHE`, `HF_HUB_OFFLINE=1`, `HF_ENDPOINT`
and `HF_TOKEN` behave as they do for transformers. The token is read by `huggingface_hub` itself
and never passes through this module, so no artifact can hold it.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_FILE = "config.json"
OPTIONAL_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Seconds to wait for the hub's answer before giving up (a closed port answers at once).
TIMEOUT_S = 4.0


class HubError(Exception):
    """A hub model whose config.json could not be had; the message is one line naming the way out."""


def _where(repo: str, revision: str | None) -> str:
    return f"{repo}@{revision or 'main'}"


def cached_file(repo: str, revision: str | None, filename: str) -> Path | None:
    """`filename` of `repo` at `revision` when the Hugging Face cache holds it; no network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


def fetch_file(repo: str, revision: str | None, filename: str, required: bool) -> Path | None:
    """`filename` of `repo`, from the cache or the hub. A missing optional file is None; a
    required one that cannot be had raises HubError with the three ways out.

    The hub is first asked once for the file's metadata with a short timeout (huggingface_hub's
    own download retries a dead connection for a minute), so an unreachable hub fails fast."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if constants.HF_HUB_OFFLINE:
        return _unreachable(repo, revision, filename, required)
    try:
        get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=TIMEOUT_S)
        return Path(hf_hub_download(repo, filename, revision=revision, etag_timeout=TIMEOUT_S))
    except GatedRepoError:
        if not required:
            return None
        raise HubError(f"{_where(repo, revision)} is gated: accept its license on the hub, then set HF_TOKEN "
                       "(or give config = \"path/to/config.json\" in [model])") from None
    except RepositoryNotFoundError:
        if not required:
            return None
        raise HubError(f"the hub has no model {repo} (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        if not required:
            return None
        raise HubError(f"{repo} has no revision {revision!r}; give a branch, tag or commit hash it has") from None
    except LocalEntryNotFoundError:
        return _unreachable(repo, revision, filename, required)
    except EntryNotFoundError:
        if not required:
            return None
        raise HubError(f"{_where(repo, revision)} has no {filename}; it is not a transformers checkpoint") from None
    except HfHubHTTPError as exc:
        if not required:
            return None
        raise HubError(f"the hub refused {filename} of {_where(repo, revision)}: {str(exc).splitlines()[0]}") from None
    except Exception:  # connection refused, DNS failure, timeout: httpx and OS errors alike
        return _unreachable(repo, revision, filename, required)


def _unreachable(repo: str, revision: str | None, filename: str, required: bool) -> None:
    if not required:
        return None
    raise HubError(
        f"cannot reach the hub for {repo} (revision {revision or 'main'}) and its {filename} is not in the "
        "Hugging Face cache: connect to the network, or download it once and set HF_HUB_OFFLINE=1 with that "
        'warm cache, or give config = "path/to/config.json" in [model]'
    )


def hub_config(repo: str, revision: str | None) -> dict:
    """The parsed config.json of `repo` (cached, else fetched)."""
    path = fetch_file(repo, revision, CONFIG_FILE, required=True)
    assert path is not None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise HubError(f"the cached config.json of {_where(repo, revision)} cannot be read ({exc}); "
                       "delete it from the Hugging Face cache and fetch it again") from None
    if not isinstance(config, dict):
        raise HubError(f"the config.json of {_where(repo, revision)} is not a JSON object")
    return config


def hub_tokenizer_folder(repo: str, revision: str | None, network: bool) -> Path | None:
    """The snapshot folder holding `repo`'s tokenizer.json (with its tokenizer_config.json when the
    repository has one), or None when it has none or, without `network`, none is cached."""
    found: dict[str, Path] = {}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = fetch_file(repo, revision, name, required=False) if network else cached_file(repo, revision, name)
        if path is not None:
            found[name] = path
    if "tokenizer.json" not in found:
        return None
    if network:
        for name in ("generation_config.json", "special_tokens_map.json"):
            fetch_file(repo, revision, name, required=False)
    return found["tokenizer.json"].parent
