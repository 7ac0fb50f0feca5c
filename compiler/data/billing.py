"""What fine-tuning a hosted model on a chat data set costs, the way OpenAI's data checker counts it.

Token counts use the cl100k_base encoding (pinned asset `cl100k-base`, read by tiktoken):
each message costs 3 tokens plus its encoded values (role, content, and name, which costs 1
more), and every conversation 3 more for the reply priming. An example is billed at most
`token_limit` tokens (longer ones are truncated by the service). Epochs follow the checker's
heuristic: 3, raised so that examples x epochs reaches 100, lowered so it stays under 25,000,
and kept within [1, 25]. The price is per 1,000 training tokens ($0.008 by default).

The arithmetic is pure; `cl100k_encoding` is the only function that reads a file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
DEFAULT_TOKEN_LIMIT = 4096
DEFAULT_USD_PER_1K_TOKENS = 0.008
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES = 100, 25_000
MIN_DEFAULT_EPOCHS, MAX_DEFAULT_EPOCHS = 1, 25

# The cl100k_base split pattern, as tiktoken 0.14 defines it (tiktoken_ext/openai_public.py).
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
CL100K_SPECIAL_TOKENS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                         "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}


def cl100k_encoding(ranks_path: Path):
    """tiktoken's cl100k_base built from the pinned ranks file (no network)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    return tiktoken.Encoding(name="cl100k_base", pat_str=CL100K_PATTERN,
                             mergeable_ranks=load_tiktoken_bpe(str(ranks_path)),
                             special_tokens=CL100K_SPECIAL_TOKENS)


@dataclass(frozen=True)
class ConversationTokens:
    total: int
    assistant: int
    messages: int


def count_conversation(messages: Sequence[dict[str, Any]], encode) -> ConversationTokens:
    """Tokens of one conversation; `encode(text) -> list[int]`. Special-token text counts as text."""
    total = REPLY_PRIMING_TOKENS
    assistant = 0
    for message in messages:
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if not isinstance(value, str):
                continue
            total += len(encode(value))
            if key == "name":
                total += TOKENS_PER_NAME
        if message.get("role") == "assistant" and isinstance(message.get("content"), str):
            assistant += len(encode(message["content"]))
    return ConversationTokens(total=total, assistant=assistant, messages=len(messages))


def default_epochs(n_examples: int) -> int:
    """The checker's epochs heuristic."""
    epochs = TARGET_EPOCHS
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        epochs = min(MAX_DEFAULT_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
    elif n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        epochs = max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return epochs


def billing_tokens(lengths: Sequence[int], token_limit: int = DEFAULT_TOKEN_LIMIT) -> int:
    return sum(min(token_limit, n) for n in lengths)


def cost_usd(billing: int, epochs: int, usd_per_1k_tokens: float = DEFAULT_USD_PER_1K_TOKENS) -> float:
    """Training tokens x epochs at the price per 1,000 tokens, rounded to cents' hundredths."""
    return round(billing * epochs / 1000 * usd_per_1k_tokens, 4)
