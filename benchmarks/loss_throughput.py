"""`train.cross_entropy`: "chunked" against "full" on a large-vocabulary tiny model, on CPU.

    .venv/bin/python benchmarks/loss_throughput.py [--vocab 32768] [--rows 4] [--seq 2048] [--steps 3]

Each mode runs in a process of its own (a resident-set high-water mark cannot be lowered): a
Llama of 2 layers, width 256 and a `--vocab` vocabulary, every position of `--rows` x `--seq`
supervised, trained `--steps` steps through the runtime's TokenLoss. For each mode it prints the
peak resident set of a training step above the resident set before it (the high-water mark is
reset through /proc/self/clear_refs before the step), the step's tokens/s, the loss, and what the
plan's logits term (compiler.estimation.estimate.logits_bytes) predicts for the same shapes.
The default size peaks near 4 GiB, well inside a 24 GiB machine.

Prints one line per mode and, last, one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3


def _resident_kib(field: str) -> int:
    """VmRSS or VmHWM (the high-water mark) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(mode: str, vocab: int, rows: int, seq: int, steps: int) -> dict:
    """One mode's figures, in this process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from runtime.core.host_memory import set_host_memory_policy
    from runtime.core.losses import TokenLoss

    set_host_memory_policy("release")  # as the runtime does by default: freed logits leave the resident set
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq)
    model = LlamaForCausalLM(config).train()
    loss = TokenLoss(model, cross_entropy=mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = {"input_ids": torch.randint(0, vocab, (rows, seq)), "attention_mask": torch.ones(rows, seq, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    peaks, times, values = [], [], []
    for _ in range(steps + 1):  # the first step allocates the gradients and warms up; not counted
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        before = _resident_kib("VmRSS")
        started = time.perf_counter()
        total, count = loss(**batch)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated: the peak is the loss's
        times.append(time.perf_counter() - started)
        peaks.append((_resident_kib("VmHWM") - before) * 1024)
        values.append(float(total / count))
    tokens = rows * (seq - 1)
    return {"mode": mode, "step_peak_gib": round(max(peaks[1:]) / GIB, 3),
            "tokens_per_s": round(tokens * steps / sum(times[1:]), 1), "loss": round(values[1], 6)}


def predicted_gib(mode: str, vocab: int, rows: int, seq: int) -> float:
    """The plan's logits term for these shapes (fp32, every position supervised)."""
    from compiler.estimation.estimate import TrainSetup, logits_bytes
    from compiler.estimation.params import Architecture

    arch = Architecture(family="llama", vocab_size=vocab, hidden=256, layers=2, heads=4, kv_heads=4, head_dim=64,
                        intermediate=512, tied_embeddings=False, qkv_bias=False, positions=0)
    setup = TrainSetup(total_parameters=0, trainable_parameters=0, micro_batch_size=rows, seq_len=seq,
                       supervised_per_example=seq - 1, precision="fp32", device="cpu", cross_entropy=mode)
    return round(logits_bytes(arch, setup) / GIB, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mode", choices=("chunked", "full"), help=argparse.SUPPRESS)  # one mode, in-process
    args = parser.parse_args()
    shape = dict(vocab=args.vocab, rows=args.rows, seq=args.seq)
    if args.mode:
        print(json.dumps(measure(args.mode, steps=args.steps, **shape)))
        return
    out = {"shape": shape}
    for mode in ("full", "chunked"):
        command = [sys.executable, __file__, "--mode", mode, *[f"--{k}={v}" for k, v in shape.items()],
                   f"--steps={args.steps}"]
        done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
        figures = json.loads(done.stdout.splitlines()[-1])
        figures["plan_logits_gib"] = predicted_gib(mode, **shape)
        out[mode] = figures
        print(f"{mode}: step peak {figures['step_peak_gib']} GiB above the resident set before it "
              f"(plan's logits term {figures['plan_logits_gib']} GiB), {figures['tokens_per_s']} tokens/s, "
              f"loss {figures['loss']}")
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
