"""`recipe hardware probe`: measure this machine and write a hardware file (the schema of
specs/hardware/*.toml) whose figures the time and memory estimates then use.

What it times, on the device training would use (cuda when there is one, else cpu):
  matmuls of a few sizes        the achieved dense GFLOP/s per precision: `peak_tflops`
  a large copy                  memory bandwidth (bytes read + written per second), which bounds
                                the optimizer step: `memory_bandwidth_gb_per_s`
  training steps of a tiny      GPT-2 steps at two batch sizes and two depths: what small batches
  GPT-2                         take beyond their FLOPs is the fixed cost of a micro-batch
                                (`step_overhead_s`) and of each block in it (`layer_overhead_s`),
                                less the optimizer step the bandwidth accounts for; the large
                                batch's rate over the matmul peak is `mfu`
  a fresh interpreter           importing what `python -m runtime.train` imports: its resident set
                                is `process_overhead_gib` on cpu; on cuda, the memory the CUDA
                                context takes beyond torch's allocations
torch and transformers are imported inside the command, as every heavy command does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from compiler.cli.common import EXIT_OK, EXIT_USER
from compiler.estimation.estimate import optimizer_step_seconds

MATMUL_SIZES = (256, 512, 1024)
COPY_BYTES = 256 * 1024**2
# The tiny model the training steps use: GPT-2's vocabulary (its head is most of the FLOPs of a
# small model, as in the examples), a narrow body.
TINY_GPT2 = {"n_embd": 64, "n_head": 2, "n_positions": 128, "vocab_size": 50257}
TINY_LAYERS = (2, 6)  # two depths: what a block adds to a micro-batch's fixed cost
SMALL_BATCH, LARGE_BATCH = (1, 8), (16, 64)  # (rows, tokens per row)
# what runtime.train imports, in a fresh interpreter: its peak resident set in GiB
# (the resident set now, not ru_maxrss: Linux carries the parent's high-water mark across fork and exec)
_IMPORT_RSS = ("import os, runtime.train, transformers; "
               "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1024**3)")


def _seconds(fn: Callable[[], None], sync: Callable[[], None], *, min_s: float = 0.2, rounds: int = 3) -> float:
    """The best of `rounds` mean times of `fn`, each round repeating it for at least `min_s`."""
    fn(), sync()  # warm-up: allocations, kernel selection
    best = float("inf")
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_s:
                break
        best = min(best, elapsed / calls)
    return best


def matmul_tflops(torch, device, dtype) -> float:
    """The best achieved TFLOP/s of square matmuls (2 n^3 FLOPs each) over MATMUL_SIZES."""
    sync = _sync(torch, device)
    rates = []
    for n in MATMUL_SIZES:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        rates.append(2 * n**3 / _seconds(lambda: a @ b, sync) / 1e12)
    return max(rates)


def copy_gb_per_s(torch, device) -> float:
    """Bytes read plus written per second by one large tensor copy, in GB/s."""
    src = torch.empty(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / _seconds(lambda: dst.copy_(src), _sync(torch, device)) / 1e9


def training_step_fit(torch, device, peak_tflops: float, bandwidth: float) -> tuple[float, float, float]:
    """(step_overhead_s, layer_overhead_s, mfu) from tiny GPT-2 training steps: time = a fixed cost
    per micro-batch + one per block + FLOPs / (peak x mfu) + the optimizer step, with FLOPs counted
    as the plan counts them (train_flops). A large batch gives the rate; small batches at two depths
    give the fixed costs, where FLOPs hardly matter."""
    small = _step_seconds(torch, device, TINY_LAYERS[0], SMALL_BATCH)
    deep = _step_seconds(torch, device, TINY_LAYERS[1], SMALL_BATCH)
    large = _step_seconds(torch, device, TINY_LAYERS[0], LARGE_BATCH)
    rate = (large[1] - small[1]) / max(1e-9, large[0] - small[0])  # FLOP/s beyond the fixed costs

    def fixed(point: tuple[float, int, int]) -> float:
        seconds, flops, params = point
        return seconds - flops / rate - optimizer_step_seconds(params, "adamw", bandwidth_gb_per_s=bandwidth)

    per_layer = max(0.0, (fixed(deep) - fixed(small)) / (TINY_LAYERS[1] - TINY_LAYERS[0]))
    per_step = max(0.0, fixed(small) - per_layer * TINY_LAYERS[0])
    return per_step, per_layer, rate / (peak_tflops * 1e12)


def _step_seconds(torch, device, layers: int, batch: tuple[int, int]) -> tuple[float, int, int]:
    """(seconds, plan FLOPs, parameters) of one AdamW training step of TINY_GPT2 with `layers` blocks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY_GPT2, n_layer=layers)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows, length = batch
    ids = torch.randint(0, TINY_GPT2["vocab_size"], (rows, length), device=device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _seconds(step, _sync(torch, device), min_s=0.5)
    return seconds, _tiny_flops(layers, rows * length, length), sum(p.numel() for p in model.parameters())


def _tiny_flops(layers: int, tokens: int, seq_len: int) -> int:
    """The plan's training FLOPs of TINY_GPT2 with `layers` blocks for `tokens` tokens, all supervised."""
    from compiler.estimation.catalog import facts_from_config
    from compiler.estimation.estimate import train_flops
    from compiler.estimation.params import architecture, parameters

    config = {"model_type": "gpt2", **TINY_GPT2, "n_layer": layers}
    arch = architecture(facts_from_config(config, "tiny-gpt2", "tiny-gpt2"))
    return train_flops(arch, parameters(arch).non_embedding, tokens=tokens, supervised_tokens=tokens,
                       mean_seq_len=seq_len)


def process_overhead_gib(torch, device) -> float:
    """On cpu, the peak resident set of a fresh interpreter that imports what training imports; on
    cuda, the device memory in use beyond torch's reservations once a context exists."""
    if device.type == "cuda":
        torch.ones(1, device=device)
        free, total = torch.cuda.mem_get_info(device)
        return (total - free - torch.cuda.memory_reserved(device)) / 1024**3
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _IMPORT_RSS], cwd=repo, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def _sync(torch, device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def probe(device_name: str) -> dict:
    """Every figure of the hardware file, measured on `device_name` ("cpu" or "cuda")."""
    import torch

    device = torch.device(device_name)
    fp32 = matmul_tflops(torch, device, torch.float32)
    bf16 = matmul_tflops(torch, device, torch.bfloat16)
    bandwidth = copy_gb_per_s(torch, device)
    overhead_s, layer_s, mfu = training_step_fit(torch, device, fp32, bandwidth)
    if mfu > 1.0:  # the model's matmuls outran the square ones (a busy machine, cache effects): its rate is the peak
        fp32, mfu = fp32 * mfu, 1.0
    memory = torch.cuda.get_device_properties(device).total_memory / 1024**3 if device.type == "cuda" else 0.0
    return {
        "device": device.type, "threads": torch.get_num_threads(), "memory_gib": round(memory, 1),
        "memory_bandwidth_gb_per_s": round(bandwidth, 1),
        "peak_tflops": {"fp32": round(fp32, 4), "bf16": round(bf16, 4)},
        "mfu": round(mfu, 3), "step_overhead_s": round(overhead_s, 5), "layer_overhead_s": round(layer_s, 5),
        "process_overhead_gib": round(process_overhead_gib(torch, device), 3),
    }


def hardware_toml(name: str, figures: dict, usd_per_hour: float) -> str:
    """The hardware file of `figures`, in the schema of specs/hardware/*.toml."""
    peak = ", ".join(f"{k} = {v}" for k, v in figures["peak_tflops"].items())
    return "\n".join([
        f"# Measured by `recipe hardware probe` on {figures['device']} ({figures['threads']} threads).",
        "# peak_tflops: the best achieved square-matmul rate (256-1024), not a datasheet figure;",
        "# mfu: tiny GPT-2 training steps' rate over that peak; step_overhead_s and layer_overhead_s: their",
        "# fixed cost per micro-batch and per block beside FLOPs and the optimizer step; process_overhead_gib: what a process holds",
        "# besides the step (interpreter, torch, tokenizer on cpu; the CUDA context on a GPU).",
        f'name = "{name}"',
        'vendor = "measured"',
        f"memory_gib = {figures['memory_gib']}",
        f"memory_bandwidth_gb_per_s = {figures['memory_bandwidth_gb_per_s']}",
        f"peak_tflops = {{ {peak} }}",
        "bf16_supported = true",
        'interconnect = "none"',
        f"mfu = {figures['mfu']}",
        f"step_overhead_s = {figures['step_overhead_s']}",
        f"layer_overhead_s = {figures['layer_overhead_s']}",
        f"process_overhead_gib = {figures['process_overhead_gib']}",
        f"usd_per_hour = {usd_per_hour}",
        "",
    ])


def cmd_hardware_probe(args: argparse.Namespace) -> int:
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device; use --device cpu", file=sys.stderr)
        return EXIT_USER
    figures = probe(device)
    print(json.dumps(figures, sort_keys=True), file=sys.stderr)
    text = hardware_toml(args.name or device, figures, args.usd_per_hour)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK
