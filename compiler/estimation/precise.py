"""Precise memory: simulate one training step on fake tensors and measure its peak by category.

torch's `FakeTensorMode` runs the real model code (transformers, peft, the optimizer) with tensors
that have shapes, dtypes and devices but no storage, and `MemTracker` records every allocation
by category (parameters, gradients, optimizer state, activations, temporaries). This runs on a
CPU in seconds for models of any size and checks the analytical model in `compiler.estimation.estimate`,
which stays pure and never imports torch. Only architectures transformers implements (GPT-2,
Llama, Mistral, Qwen2) can be simulated.

The step mirrors the runtime: the language-model head is applied only to the supervised positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1024**3
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class PreciseMemory:
    """Peak bytes of one simulated training step, by MemTracker category."""

    parameters_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    temporary_bytes: int
    total_bytes: int
    forward_activations_bytes: int = 0  # activations alive at the end of the forward pass

    def as_gib(self) -> dict[str, float]:
        return {
            "parameters": round(self.parameters_bytes / GIB, 3),
            "gradients": round(self.gradients_bytes / GIB, 3),
            "optimizer": round(self.optimizer_bytes / GIB, 3),
            "activations": round(self.activations_bytes / GIB, 3),
            "temporary": round(self.temporary_bytes / GIB, 3),
            "total": round(self.total_bytes / GIB, 3),
        }


def simulate_step(
    config: dict[str, Any],
    *,
    micro_batch_size: int,
    seq_len: int,
    supervised_per_example: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    adapter: dict[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    attention: str = "sdpa",
    master_weights: bool = True,
    quantization: str = "none",
    cross_entropy: str = "full",
    chunk_positions: int = 1024,
) -> PreciseMemory:
    """Peak memory of one forward + backward + optimizer step of the model `config` describes.

    Mixed precision (bf16/fp16) keeps fp32 weights and runs the step under autocast, as the
    runtime does; `master_weights=False` instead stores the weights in the half-precision dtype and
    runs without autocast ("pure" bf16: LitGPT's bf16-true, torchtune). `adapter` is
    {"kind": "lora", "rank": r, "targets": [...] | "all-linear", "dropout": p} or None; its base
    model is frozen. `quantization` ("4bit", "8bit") simulates what bitsandbytes' quantized layers
    keep for the backward pass (each frozen linear layer keeps its input); their weights stay at
    the working width here, so only the activations of such a step are meaningful.
    `cross_entropy` = "chunked" scores `chunk_positions` positions at a time and recomputes each
    chunk's logits in backward, as the runtime's train.cross_entropy does.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    hf_config._attn_implementation = attention if attention != "flash_attention_2" else "sdpa"
    hf_config.use_cache = False
    pure = not master_weights and precision != "fp32"
    autocast_dtype = getattr(torch, _DTYPES[precision]) if precision != "fp32" and not pure else None
    # Built on the meta device, then given fake storage: peft moves adapter weights with
    # Module.to(), which fake parameters refuse (torch swaps them, and they hold weak references).
    with torch.device("meta"):
        weights_dtype = getattr(torch, _DTYPES[precision]) if pure else torch.float32
        model = AutoModelForCausalLM.from_config(hf_config, dtype=weights_dtype)
        if adapter and adapter.get("kind") == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(
                r=adapter.get("rank", 8), lora_alpha=adapter.get("alpha", 16),
                lora_dropout=adapter.get("dropout", 0.0), target_modules=adapter.get("targets", "all-linear"),
            ), autocast_adapter_dtype=False)  # adapters in the base model's dtype, as LitGPT and torchtune keep them
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        causal_lm = model.get_base_model() if adapter else model
        causal_lm.tie_weights()  # to_empty gives tied weights separate storage; tie them again
        if quantization != "none":
            _keep_inputs_of_frozen_linears(torch, causal_lm)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if adapter:
                # a frozen embedding would leave the checkpointed blocks without gradients
                causal_lm.enable_input_require_grads()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _optimizer(torch, optimizer, params)
        input_ids = torch.randint(0, hf_config.vocab_size, (micro_batch_size, seq_len))
        targets = torch.randint(0, hf_config.vocab_size, (micro_batch_size * supervised_per_example,))
        tracker = MemTracker()
        for p in model.parameters():
            if not p.requires_grad:  # MemTracker hooks every parameter's gradient; frozen ones refuse hooks
                tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
        tracker.track_external(model, opt)
        with tracker:
            for _ in range(2):  # the second step holds optimizer state from the first
                with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    hidden = causal_lm.base_model(input_ids=input_ids).last_hidden_state
                    # the supervised positions only: [batch * supervised, hidden]
                    selected = hidden[:, -supervised_per_example:].reshape(-1, hidden.shape[-1])
                    loss = _loss(torch, causal_lm.get_output_embeddings(), selected, targets, cross_entropy,
                                 chunk_positions)
                current = next(iter(tracker.get_tracker_snapshot("current").values()))
                forward_activations = {getattr(k, "value", k): v for k, v in current.items()}.get("Activation", 0)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    by_name = {getattr(k, "value", k): v for k, v in peak.items()}
    return PreciseMemory(
        parameters_bytes=by_name.get("Parameter", 0) + by_name.get("Buffer", 0),
        gradients_bytes=by_name.get("Gradient", 0),
        optimizer_bytes=by_name.get("Optstate", 0),
        activations_bytes=by_name.get("Activation", 0),
        temporary_bytes=by_name.get("Temp", 0) + by_name.get("Other", 0),
        total_bytes=by_name["Total"],
        forward_activations_bytes=forward_activations,
    )


def _loss(torch, head, selected, targets, cross_entropy: str, chunk_positions: int):
    """The mean cross-entropy as the runtime computes it (runtime.core.cross_entropy, which the
    compiler may not import): all positions at once, or chunks recomputed in backward."""
    def summed(h, t):  # the head as a function: MemTracker refuses a module entered again in backward
        logits = torch.nn.functional.linear(h, head.weight, head.bias)
        return torch.nn.functional.cross_entropy(logits.float(), t, reduction="sum")

    if cross_entropy != "chunked" or selected.shape[0] <= chunk_positions:
        return summed(selected, targets) / targets.shape[0]
    from torch.utils.checkpoint import checkpoint

    chunks = zip(selected.split(chunk_positions), targets.split(chunk_positions))
    return sum(checkpoint(summed, h, t, use_reentrant=False) for h, t in chunks) / targets.shape[0]


class _NoHook:
    """Stands in for the gradient hooks MemTracker would put on a frozen parameter."""

    def remove(self) -> None:
        pass


def _keep_inputs_of_frozen_linears(torch, model) -> None:
    """Make every frozen linear layer inside the blocks keep its input for the backward pass, as
    bitsandbytes' quantized layers do: MatMul4Bit and MatMul8bitLt store `ctx.tensors = (A, B)`
    although the input A is not needed when the weight is frozen (bitsandbytes/autograd/_functions.py).
    A frozen torch Linear keeps nothing."""

    class KeepInput(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias):
            ctx.save_for_backward(x, weight)
            return torch.nn.functional.linear(x, weight, bias)

        @staticmethod
        def backward(ctx, grad):
            _, weight = ctx.saved_tensors
            return grad @ weight, None, None

    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head and not module.weight.requires_grad:
            module.forward = (lambda m: lambda x: KeepInput.apply(x, m.weight, m.bias))(module)


def _optimizer(torch, name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-3)
    return torch.optim.AdamW(params, lr=1e-3)  # adamw_8bit needs bitsandbytes on a GPU; simulated as adamw
