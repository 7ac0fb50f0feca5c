"""Convert a tiktoken ranks file into a Hugging Face `tokenizers` byte-level BPE tokenizer.

A tiktoken file lists every token as `base64(token_bytes) rank`; the rank is
both the token id and its merge priority. The `tokenizers` BPE model instead
wants a vocab (token string -> id) and an ordered list of merges. The token
strings use GPT-2's byte-to-unicode table, and each merge is recovered by
replaying tiktoken's own BPE on the token's bytes with only lower-ranked
tokens allowed: the last step of that replay is the merge that creates it.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other symbol runs, each
# optionally with one leading space, then whitespace (the last space before a word stays
# with the word).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character.

    Printable Latin-1 bytes map to themselves; the rest are shifted above U+0100
    so that no token string contains whitespace or control characters.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def read_tiktoken_ranks(ranks_path: Path) -> dict[bytes, int]:
    """Parse a tiktoken ranks file into token bytes -> rank, rejecting malformed or duplicate lines."""
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    with Path(ranks_path).open("rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error):
                raise ValueError(f"{ranks_path}:{line_number}: expected 'base64-token rank'") from None
            if token in ranks or rank in seen_ranks:
                raise ValueError(f"{ranks_path}:{line_number}: duplicate token or rank {rank}")
            ranks[token] = rank
            seen_ranks.add(rank)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{ranks_path}: not a byte-level BPE file; {len(missing)} single bytes have no rank")
    return ranks


def last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The pair tiktoken merges last when it builds `token` from single bytes.

    Replays tiktoken's BPE (always merge the adjacent pair whose concatenation
    has the lowest rank) using only tokens ranked below `token`; the two parts
    left at the end are the merge that produces it.
    """
    max_rank = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best_index, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_index, best_rank = i, rank
        if best_index < 0:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {max_rank}) cannot be built by merging two lower-ranked tokens")
    return parts[0], parts[1]


def tiktoken_to_tokenizer_json(
    ranks_path: Path, *, special_tokens: dict[str, int], pattern: str = GPT2_PATTERN
) -> str:
    """Build a `tokenizers` byte-level BPE tokenizer equivalent to tiktoken on `ranks_path`.

    `special_tokens` maps each special token's text to its id (for GPT-2:
    `{"<|endoftext|>": 50256}`). `pattern` is the pre-tokenizer regex. Returns
    the tokenizer's JSON; the same inputs always give the same bytes.
    """
    # tiktoken's regex engine reads `{1,3}+` as possessive; Oniguruma (used by `tokenizers`)
    # reads it as "repeat the interval", i.e. `+`, which silently changes how digits split.
    if re.search(r"\{\d+(,\d*)?\}\+", pattern):
        raise ValueError(
            "pattern uses a possessive interval like {1,3}+, which the tokenizers regex engine reads "
            "as an unbounded repeat; drop the trailing '+' (the match is the same at the end of an alternative)"
        )
    ranks = read_tiktoken_ranks(ranks_path)
    regular_ids = set(ranks.values())
    for text, token_id in special_tokens.items():
        if token_id in regular_ids:
            raise ValueError(f"special token {text!r} id {token_id} is already the id of a regular token")

    byte_to_char = bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    vocab.update(special_tokens)
    by_rank = sorted((rank, token) for token, rank in ranks.items() if len(token) > 1)
    merges = [tuple(map(as_text, last_merge(ranks, token))) for _, token in by_rank]

    # ignore_merges: tiktoken returns a whole pre-token as one id when it is in the vocab
    # before running any merges; matching that keeps ids identical even for tokens that
    # the merge order alone would not reach.
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=True)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        # The regex above already split the text; ByteLevel only maps bytes to characters.
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([
        AddedToken(text, special=True, normalized=False)
        for text, _ in sorted(special_tokens.items(), key=lambda item: item[1])
    ])  # fmt: skip
    return tokenizer.to_str()
