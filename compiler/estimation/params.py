"""Exact parameter counts from architecture facts, total and trainable per adapter.

Pure functions of a frozen `Architecture`: no files, no torch. The tests compare every formula
with transformers' own models built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.estimation.attention import AttentionFacts, attention_facts
from compiler.estimation.catalog import ModelFacts
from compiler.estimation.families import FAMILIES, all_linear_targets
from compiler.estimation.vision import vision_parameters


@dataclass(frozen=True)
class MetaCount:
    """Counts read off the model transformers builds on the meta device, for a family without
    formulas: the totals, and the shapes of one block's linear layers."""

    total: int
    embedding: int
    per_layer: int  # the first block's
    linears: tuple[tuple[str, int, int, bool], ...]  # the first block's nn.Linear layers
    all_linears: tuple[tuple[str, int, int, bool], ...]  # every block's, in order
    expert_tensors: bool  # the blocks hold 3-D expert tensors (a mixture of experts)
    routed: tuple[tuple[int, int], ...] = ()  # per sparse block: (routed experts, parameters of one)
    expert_shapes: tuple[tuple[str, int, int, int], ...] = ()  # every block's 3-D tensors: (name, experts, out, in)
    experts_per_token: int = 0  # the router's top-k, from the config (0: unknown)

    @property
    def idle_expert_parameters(self) -> int:
        """Routed-expert parameters a token does not pass through: all but the top-k of each
        sparse block (0 when the config gives no top-k: every parameter counted active)."""
        if not self.experts_per_token:
            return 0
        return sum(max(0, n - self.experts_per_token) * one for n, one in self.routed)


@dataclass(frozen=True)
class Architecture:
    family: str  # a key of compiler.estimation.families.FAMILIES, or "generic"
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
    norms_per_block: int = 2
    qk_norm: str = "none"  # none, head (over head_dim), full (over the q and kv widths)
    experts: int = 0  # routed experts per sparse layer (0: a dense model)
    experts_per_token: int = 0  # the router's top-k
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # width of the always-on shared expert (0: none)
    sparse_layers: int = 0  # blocks whose MLP is the mixture of experts
    meta: MetaCount | None = None  # set for the generic family: counts from the meta model
    vision: int = 0  # a multimodal checkpoint's vision tower and projector (loaded, never trained or run)
    attention: AttentionFacts = AttentionFacts()  # sliding-window layers and soft-capping

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of one of K or V: grouped-query and multi-query attention make it narrower than Q."""
        return self.kv_heads * self.head_dim

    @property
    def dense_layers(self) -> int:
        return self.layers - self.sparse_layers

    @property
    def active_intermediate(self) -> int:
        """MLP width one token passes through in a typical block (top-k experts plus the shared one)."""
        if self.sparse_layers:
            return self.experts_per_token * self.expert_intermediate + self.shared_intermediate
        return self.intermediate


def architecture(facts: ModelFacts, vocab_size: int | None = None, n_positions: int | None = None,
                 meta: MetaCount | None = None) -> Architecture:
    """The shape facts of `facts`; `vocab_size` / `n_positions` override them (a scratch model sized
    from its tokenizer and token budget); `meta` carries the meta model's counts (generic family)."""
    c = facts.config
    h = facts.hidden_size
    fam = FAMILIES.get(facts.family)
    if facts.family == "gpt2":
        intermediate = c.get("n_inner") or 4 * h
    elif facts.family == "chatglm":
        intermediate = c["ffn_hidden_size"]
    else:
        intermediate = c.get("intermediate_size") or 4 * h
    tied = c.get("tie_word_embeddings", fam.tied_default if fam else True)
    if fam is not None and fam.qkv_bias is not None:
        qkv_bias = fam.qkv_bias
    elif facts.family == "chatglm":
        qkv_bias = bool(c.get("add_qkv_bias"))
    else:
        qkv_bias = bool(c.get("attention_bias", False))
    experts = top_k = expert_i = shared_i = sparse = 0
    if fam is not None and fam.moe != "none" and meta is None:
        experts = int(c.get("num_local_experts") or c.get("num_experts"))
        top_k = int(c["num_experts_per_tok"])
        expert_i = int(c["intermediate_size"] if fam.moe == "mixtral" else c["moe_intermediate_size"])
        shared_i = int(c.get("shared_expert_intermediate_size", 0)) if fam.shared_expert else 0
        sparse = _sparse_layers(c, facts.num_layers) if fam.moe == "qwen" else facts.num_layers
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
        norms_per_block=fam.norms_per_block if fam else 2,
        qk_norm=fam.qk_norm if fam else "none",
        experts=experts,
        experts_per_token=top_k,
        expert_intermediate=expert_i,
        shared_intermediate=shared_i,
        sparse_layers=sparse,
        meta=meta,
        vision=vision_parameters(facts.vision, h) if facts.vision is not None else 0,
        attention=attention_facts(c, facts.family, facts.num_layers),
    )


def _sparse_layers(c: dict, layers: int) -> int:
    """Qwen-MoE blocks with experts: every decoder_sparse_step-th one not in mlp_only_layers."""
    step = int(c.get("decoder_sparse_step", 1) or 1)
    dense = set(c.get("mlp_only_layers") or ())
    return sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)


def linear_shapes(a: Architecture, sparse: bool | None = None) -> list[tuple[str, int, int, bool]]:
    """(module name, in features, out features, has bias) of every nn.Linear in one block: a
    mixture-of-experts block (`sparse`, the default when the model has one) holds its routed
    experts as 3-D tensors, so only attention and the shared expert are linear layers there."""
    if a.meta is not None:
        return list(a.meta.linears)
    h, q, kv, i = a.hidden, a.q_width, a.kv_width, a.intermediate
    if a.family == "gpt2":
        return [("c_attn", h, 3 * h, True), ("c_proj", h, h, True), ("c_fc", h, i, True), ("c_proj", i, h, True)]
    if a.family == "chatglm":
        return [("query_key_value", h, q + 2 * kv, a.qkv_bias), ("dense", q, h, False),
                ("dense_h_to_4h", h, 2 * i, False), ("dense_4h_to_h", i, h, False)]
    if a.family == "phi3":
        return [("qkv_proj", h, q + 2 * kv, False), ("o_proj", q, h, False),
                ("gate_up_proj", h, 2 * i, False), ("down_proj", i, h, False)]
    attention = [("q_proj", h, q, a.qkv_bias), ("k_proj", h, kv, a.qkv_bias), ("v_proj", h, kv, a.qkv_bias),
                 ("o_proj", q, h, False)]
    if sparse is None:
        sparse = a.sparse_layers > 0
    if sparse:
        s = a.shared_intermediate
        shared = [("gate_proj", h, s, False), ("up_proj", h, s, False), ("down_proj", s, h, False),
                  ("shared_expert_gate", h, 1, False)] if s else []
        return attention + shared
    return attention + [("gate_proj", h, i, False), ("up_proj", h, i, False), ("down_proj", i, h, False)]


def _norm_params(a: Architecture) -> int:
    """One normalisation layer: LayerNorm (weight + bias) for GPT-2, RMSNorm (weight) otherwise."""
    return 2 * a.hidden if a.family == "gpt2" else a.hidden


def _qk_norm_params(a: Architecture) -> int:
    if a.qk_norm == "head":
        return 2 * a.head_dim
    if a.qk_norm == "full":
        return a.q_width + a.kv_width
    return 0


def expert_parameters(a: Architecture) -> int:
    """One routed expert: gate, up and down projections."""
    return 3 * a.hidden * a.expert_intermediate


def block_parameters(a: Architecture, sparse: bool | None = None) -> int:
    """One block (by default a typical one: sparse when the model has experts)."""
    if a.meta is not None:
        return a.meta.per_layer
    if sparse is None:
        sparse = a.sparse_layers > 0
    linears = sum(i * o + (o if bias else 0) for _, i, o, bias in linear_shapes(a, sparse))
    experts = a.experts * expert_parameters(a) + a.experts * a.hidden if sparse else 0  # + the router
    return linears + experts + a.norms_per_block * _norm_params(a) + _qk_norm_params(a)


@dataclass(frozen=True)
class ParameterCount:
    total: int  # the vision tower's included
    embedding: int  # token (+ position) embeddings, and an untied output layer
    per_layer: int
    vision: int = 0  # the vision tower and projector of a multimodal checkpoint

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def text(self) -> int:
        """The language model's own parameters: what text-only training computes with."""
        return self.total - self.vision


def parameters(a: Architecture) -> ParameterCount:
    """Every parameter of the model, counting tied input/output embeddings once."""
    if a.meta is not None:
        return ParameterCount(total=a.meta.total + a.vision, embedding=a.meta.embedding, per_layer=a.meta.per_layer,
                              vision=a.vision)
    embedding = a.vocab_size * a.hidden + a.positions * a.hidden
    if not a.tied_embeddings:
        embedding += a.vocab_size * a.hidden  # the LM head
    per_layer = block_parameters(a)
    blocks = a.sparse_layers * block_parameters(a, True) + a.dense_layers * block_parameters(a, False)
    total = embedding + blocks + _norm_params(a) + a.vision  # + final norm
    return ParameterCount(total=total, embedding=embedding, per_layer=per_layer, vision=a.vision)


def active_parameters(a: Architecture) -> int:
    """Parameters one token passes through: all but the routed experts the router does not pick
    (and a vision tower, which a text token never reaches)."""
    if a.meta is not None:
        return parameters(a).text - a.meta.idle_expert_parameters
    idle = a.sparse_layers * (a.experts - a.experts_per_token) * expert_parameters(a)
    return parameters(a).text - idle


def routes_experts(a: Architecture) -> bool:
    """A mixture of experts whose active parameters are known (formulas, or the meta model's
    expert tensors and the config's top-k)."""
    return a.sparse_layers > 0 or (a.meta is not None and a.meta.idle_expert_parameters > 0)


def layer_kinds(a: Architecture) -> list[tuple[int, bool]]:
    """(number of blocks, sparse) for the dense and the mixture-of-experts blocks."""
    return [(n, sparse) for n, sparse in ((a.dense_layers, False), (a.sparse_layers, True)) if n]


def all_linear_names(a: Architecture) -> tuple[str, ...] | None:
    """The module names "all-linear" resolves to in a mixture of experts (its nn.Linear layers,
    not the router or the routed experts' 3-D tensors, which peft's own "all-linear" would also
    adapt); None for a dense model, where peft's "all-linear" means exactly its linear layers."""
    if a.meta is not None:
        return tuple(sorted({n for n, _, _, _ in a.meta.all_linears})) if a.meta.expert_tensors else None
    frozen = all_linear_targets(a.family)
    if frozen is None:
        return None
    return tuple(n for n in linear_names(a) if n in frozen)


def linear_names(a: Architecture) -> tuple[str, ...]:
    """Names of the nn.Linear layers the model's blocks hold (a mixture of experts whose every
    block is sparse has no dense gate/up/down projections)."""
    if a.meta is not None:
        return tuple(sorted({n for n, _, _, _ in a.meta.all_linears}))
    return tuple(dict.fromkeys(name for _, sparse in layer_kinds(a) for name, _, _, _ in linear_shapes(a, sparse)))


def block_linear_weights(a: Architecture) -> int:
    """Weight-matrix parameters of every block's nn.Linear layers (what bitsandbytes quantizes)."""
    if a.meta is not None:
        return sum(i * o for _, i, o, _ in a.meta.all_linears)
    return sum(n * sum(i * o for _, i, o, _ in linear_shapes(a, sparse)) for n, sparse in layer_kinds(a))


def expert_lora_parameters(a: Architecture, rank: int, expert_targets: list[str] | tuple[str, ...]) -> int:
    """LoRA on routed experts' 3-D tensors, one pair per expert (peft's ParamWrapper: A is
    rank*experts x in, B out x rank*experts). transformers stores an expert's gate and up
    projections as gate_up_proj, [experts, 2 x width, hidden], and down_proj as [experts, hidden, width]."""
    if a.meta is not None:
        return sum(n * rank * (i + o) for name, n, o, i in a.meta.expert_shapes if name in expert_targets)
    shapes = {"gate_up_proj": (a.hidden, 2 * a.expert_intermediate), "down_proj": (a.expert_intermediate, a.hidden)}
    return sum(a.sparse_layers * a.experts * rank * sum(shapes[name]) for name in expert_targets)


def lora_parameters(a: Architecture, rank: int, targets: list[str] | str,
                    expert_targets: list[str] | tuple[str, ...] = ()) -> int:
    """Adapter weights: A (rank x in) and B (out x rank) for each targeted linear in every block,
    and for each routed expert of the named expert tensors."""
    if expert_targets:
        return lora_parameters(a, rank, targets) + expert_lora_parameters(a, rank, expert_targets)
    if targets == "all-linear":
        targets = all_linear_names(a) or "all-linear"  # a mixture of experts: its gates stay frozen
    if a.meta is not None:
        return sum(rank * (i + o) for name, i, o, _ in a.meta.all_linears if targets == "all-linear" or name in targets)
    total = 0
    for n, sparse in layer_kinds(a):
        chosen = [(i, o) for name, i, o, _ in linear_shapes(a, sparse) if targets == "all-linear" or name in targets]
        total += n * sum(rank * (i + o) for i, o in chosen)
    return total


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
