"""Exact parameter counts from architecture facts, total and trainable per adapter.

Pure functions of a frozen `Architecture`: no files, no torch. The tests compare every formula
with transformers' own models built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.estimation.catalog import ModelFacts


@dataclass(frozen=True)
class Architecture:
    family: str  # gpt2, llama, mistral, qwen2, chatglm
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied_embeddings: bool
    qkv_bias: bool
    positions: int  # learned position embeddings (GPT-2); rotary families have none

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of one of K or V: grouped-query and multi-query attention make it narrower than Q."""
        return self.kv_heads * self.head_dim


def architecture(facts: ModelFacts, vocab_size: int | None = None, n_positions: int | None = None) -> Architecture:
    """The shape facts of `facts`; `vocab_size` / `n_positions` override them (a scratch model sized
    from its tokenizer and token budget)."""
    c = facts.config
    h = facts.hidden_size
    if facts.family == "gpt2":
        intermediate = c.get("n_inner") or 4 * h
    elif facts.family == "chatglm":
        intermediate = c["ffn_hidden_size"]
    else:
        intermediate = c["intermediate_size"]
    tied = c.get("tie_word_embeddings", facts.family == "gpt2")
    qkv_bias = {"gpt2": True, "qwen2": True, "chatglm": bool(c.get("add_qkv_bias"))}.get(
        facts.family, bool(c.get("attention_bias", False))
    )
    return Architecture(
        family=facts.family,
        vocab_size=vocab_size or facts.vocab_size,
        hidden=h,
        layers=facts.num_layers,
        heads=facts.num_heads,
        kv_heads=facts.num_kv_heads,
        head_dim=facts.head_dim,
        intermediate=int(intermediate),
        tied_embeddings=bool(tied),
        qkv_bias=qkv_bias,
        positions=(n_positions or facts.max_positions) if facts.family == "gpt2" else 0,
    )


def linear_shapes(a: Architecture) -> list[tuple[str, int, int, bool]]:
    """(module name, in features, out features, has bias) of every linear layer in one block."""
    h, q, kv, i = a.hidden, a.q_width, a.kv_width, a.intermediate
    if a.family == "gpt2":
        return [("c_attn", h, 3 * h, True), ("c_proj", h, h, True), ("c_fc", h, i, True), ("c_proj", i, h, True)]
    if a.family == "chatglm":
        return [("query_key_value", h, q + 2 * kv, a.qkv_bias), ("dense", q, h, False),
                ("dense_h_to_4h", h, 2 * i, False), ("dense_4h_to_h", i, h, False)]
    return [("q_proj", h, q, a.qkv_bias), ("k_proj", h, kv, a.qkv_bias), ("v_proj", h, kv, a.qkv_bias),
            ("o_proj", q, h, False), ("gate_proj", h, i, False), ("up_proj", h, i, False), ("down_proj", i, h, False)]


def _norm_params(a: Architecture) -> int:
    """One normalisation layer: LayerNorm (weight + bias) for GPT-2, RMSNorm (weight) otherwise."""
    return 2 * a.hidden if a.family == "gpt2" else a.hidden


def block_parameters(a: Architecture) -> int:
    linears = sum(i * o + (o if bias else 0) for _, i, o, bias in linear_shapes(a))
    return linears + 2 * _norm_params(a)


@dataclass(frozen=True)
class ParameterCount:
    total: int
    embedding: int  # token (+ position) embeddings, and an untied output layer
    per_layer: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def parameters(a: Architecture) -> ParameterCount:
    """Every parameter of the model, counting tied input/output embeddings once."""
    embedding = a.vocab_size * a.hidden + a.positions * a.hidden
    if not a.tied_embeddings:
        embedding += a.vocab_size * a.hidden  # the LM head
    per_layer = block_parameters(a)
    total = embedding + a.layers * per_layer + _norm_params(a)  # + final norm
    return ParameterCount(total=total, embedding=embedding, per_layer=per_layer)


def lora_parameters(a: Architecture, rank: int, targets: list[str] | str) -> int:
    """Adapter weights: A (rank x in) and B (out x rank) for each targeted linear in every block."""
    chosen = [(i, o) for name, i, o, _ in linear_shapes(a) if targets == "all-linear" or name in targets]
    return a.layers * sum(rank * (i + o) for i, o in chosen)


def prefix_parameters(a: Architecture, virtual_tokens: int, projection: bool, projection_hidden: int | None) -> int:
    """P-tuning v2 / prefix tuning: a key and a value prefix per layer, each kv_width wide.

    Without projection the prefix is one embedding table (virtual_tokens x layers*2*kv_width).
    With projection (peft's PrefixEncoder, whose token width is kv_width for grouped-query models):
    an embedding (virtual_tokens x kv_width), then Linear(kv_width, p) -> tanh ->
    Linear(p, layers*2*kv_width), both with bias; p defaults to kv_width.
    """
    token = a.kv_width
    out_width = a.layers * 2 * token
    if not projection:
        return virtual_tokens * out_width
    p = projection_hidden or token
    return virtual_tokens * token + (token * p + p) + (p * out_width + out_width)


def freeze_parameters(a: Architecture, trainable_layers: int | list[int], train_embeddings: bool) -> int:
    """The last N blocks (or the listed ones) train, plus the embeddings when asked."""
    n = trainable_layers if isinstance(trainable_layers, int) else len(set(trainable_layers))
    total = min(n, a.layers) * block_parameters(a)
    if train_embeddings:
        total += parameters(a).embedding
    return total
