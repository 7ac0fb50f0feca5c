"""The runtime measured on one GPU against its own plans: tokens/s, MFU, peak memory and time per
step for a ladder of models, each at two micro-batch sizes.

    .venv/bin/python benchmarks/gpu_suite.py --out DIR [--smoke] [--budget-s 450] [--case NAME ...]

Needs only the repository and a CUDA torch: each model is a catalog config (specs/models) with
scratch-initialised weights saved once into DIR/work, with a word-level tokenizer and synthetic
rows of a fixed token length, so nothing is downloaded. Every run goes through the real compiler
(`recipe compile` of a generated recipe: the plan) and the real runtime (`python -m runtime.train`,
called in-process), with `max_steps` small and a log line per step; the first WARMUP_STEPS are
left out of the steady figures.

For each run: steady tokens/s; MFU (the plan's FLOPs per step over the measured step time, over
the device's dense bf16 peak from specs/hardware, found by the device's name); the peak torch
allocated (torch.cuda.max_memory_allocated) against the plan's peak less the CUDA context it
counts (which torch's allocator does not see); the plan's time per step against the measured one.
A run that fails (out of memory, flash-attn missing) is recorded with its error and the suite goes
on; a time guard starts no run after `--budget-s` and the results are written after every run.

`--smoke` runs the same cases on CPU with tiny configs in seconds (tests/test_gpu_suite.py, CI).
Writes DIR/gpu_suite.json and DIR/gpu_suite.md; prints the table, then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WARMUP_STEPS = 2
STEPS = 8
SEQ_LEN, SMOKE_SEQ_LEN = 2048, 32
SMOKE_STEPS = 4
WORDS = 1000  # the synthetic tokenizer's vocabulary: w0 ... w999, one token each
SPECIAL = ("<pad>", "<eos>", "<unk>")
# A tiny body of the same family, for --smoke
SMOKE_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "vocab_size": WORDS + len(SPECIAL)}
# device name (torch.cuda.get_device_name) fragments -> specs/hardware entry, most specific first
DEVICE_FILES = (("H200", "h200-141gb"), ("H100 PCIe", "h100-pcie-80gb"), ("H100", "h100-sxm-80gb"),
                ("A100-SXM4-40GB", "a100-sxm-40gb"), ("A100", "a100-sxm-80gb"), ("L40S", "l40s-48gb"),
                ("L4", "l4-24gb"), ("A10G", "a10g-24gb"), ("4090", "rtx-4090-24gb"), ("V100", "v100-sxm2-32gb"))


@dataclass(frozen=True)
class Case:
    name: str
    catalog: str  # specs/models entry
    micro_batches: tuple[int, int]
    adapter: dict = field(default_factory=lambda: {"kind": "full"})
    hardware: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    rows_per_sequence: int = 1  # >1: shorter rows that packing puts several to a pack
    needs_flash: bool = False
    chunked_loss: bool = False


LORA = {"kind": "lora", "rank": 16, "alpha": 32, "targets": "all-linear"}
CASES = (
    Case("smollm2-135m-full", "smollm2-135m", (8, 16)),
    Case("qwen2.5-0.5b-full-packed-sdpa", "qwen2.5-0.5b", (2, 4), train={"packing": True}, rows_per_sequence=4),
    Case("qwen2.5-0.5b-full-packed-fa2", "qwen2.5-0.5b", (2, 4), train={"packing": True}, rows_per_sequence=4,
         hardware={"attention": "flash_attention_2"}, needs_flash=True),
    Case("llama-3.2-1b-full-checkpointing", "llama-3.2-1b", (4, 8), hardware={"gradient_checkpointing": True}),
    Case("llama-3.2-1b-lora-r16", "llama-3.2-1b", (4, 8), adapter=LORA),
    Case("llama-3.2-3b-lora-r16", "llama-3.2-3b", (2, 4), adapter=LORA, chunked_loss=True),
)


# ---------------------------------------------------------------------------------------------
# the inputs: device facts, tokenizer, checkpoints, data, recipes


def device_entry(smoke: bool) -> tuple[str, str | None, str]:
    """(torch device, its specs/hardware entry or None, the device's name as torch gives it)."""
    import torch

    if smoke:
        return "cpu", "cpu", "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; run with --smoke to check the suite on CPU")
    name = torch.cuda.get_device_name(0)
    return "cuda", hardware_file_for(name), name


def hardware_file_for(device_name: str) -> str | None:
    """The specs/hardware entry of a CUDA device name ("NVIDIA H100 80GB HBM3" -> h100-sxm-80gb)."""
    return next((file for fragment, file in DEVICE_FILES if fragment in device_name), None)


def peak_tflops(entry: str | None, precision: str) -> float | None:
    from compiler.estimation.catalog import load_accelerator

    return load_accelerator(entry).peak_tflops.get(precision) if entry else None


def cross_entropy_section() -> str | None:
    """The recipe section that has a `cross_entropy` key accepting "chunked" (train or hardware),
    read from the live recipe schema; None while the key does not exist."""
    from compiler.loading.schema import recipe_schema

    defs = recipe_schema().get("$defs", {})
    for model, section in (("TrainSection", "train"), ("HardwareSection", "hardware")):
        prop = defs.get(model, {}).get("properties", {}).get("cross_entropy")
        if prop is not None and "chunked" in json.dumps(prop):
            return section
    return None


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer: every "w<i>" one token, so a row of n words is n tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL)} | {f"w{i}": len(SPECIAL) + i for i in range(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "pad_token": "<pad>",
              "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def write_checkpoint(folder: Path, catalog: str, smoke: bool, device: str) -> None:
    """The catalog config with scratch-initialised weights (bf16 on a GPU) and the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from compiler.estimation.catalog import load_model_facts

    config = dict(load_model_facts(catalog).config)
    config.update(SMOKE_CONFIG if smoke else {})
    config.update(bos_token_id=1, eos_token_id=1, pad_token_id=0)
    config.pop("architectures", None)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    del model
    _free_memory()


def write_rows(path: Path, rows: int, tokens: int) -> None:
    """`rows` completion records of exactly `tokens` tokens (a quarter prompt, the rest completion)."""
    prompt = max(1, tokens // 4)
    with open(path, "w", encoding="utf-8") as f:
        for r in range(rows):
            words = [f"w{(r * 7919 + i * 31) % WORDS}" for i in range(tokens)]
            f.write(json.dumps({"user_input": " ".join(words[:prompt]), "completion": " ".join(words[prompt:])}) + "\n")


def case_recipe(case: Case, micro: int, checkpoint: Path, data: Path, device: str, entry: str | None,
                seq_len: int, steps: int, loss_section: str | None) -> dict:
    """The generated recipe of one run: a pretrain stage (every token supervised) of `steps` steps."""
    hardware = {"device": device, "precision": "fp32" if device == "cpu" else "bf16", **case.hardware}
    if device == "cuda" and entry:
        hardware["gpu"] = entry
    train = {"max_steps": steps, "micro_batch_size": micro, "learning_rate": 1e-5, "log_every_steps": 1,
             "warmup_steps": 0, **case.train}
    if case.chunked_loss and loss_section is not None:
        (train if loss_section == "train" else hardware)["cross_entropy"] = "chunked"
    return {
        "name": f"{case.name}-mb{micro}", "seed": 0,
        "model": {"init": "pretrained", "path": str(checkpoint)},
        **({"adapter": case.adapter} if case.adapter["kind"] != "full" else {}),
        "data": {"synthetic": {"source": {"path": str(data)}, "format": "completion",
                               "split": {"heldout_fraction": 0.02, "seed": 0}}},
        "template": {"prompt": "{{ user_input }} ", "completion": "{{ completion }}"},
        "tokens": {"max_total": seq_len, "round_to": 8},
        "train": train,
        "stages": [{"name": "pretrain", "kind": "pretrain"}],
        "hardware": hardware,
    }


# ---------------------------------------------------------------------------------------------
# one run: compile, train, measure


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _last_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error") or "Error" in line]
    return (errors or lines or ["no output"])[-1][:400]


def compile_and_train(recipe: dict, folder: Path) -> tuple[Path, str | None]:
    """The run's build directory, and its error line when compiling or training failed."""
    from compiler.cli import main as recipe_cli
    from runtime import train

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.json"
    path.write_text(json.dumps(recipe, indent=2))
    build = folder / "build"
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(io.StringIO()):
        if compiled := recipe_cli(["compile", str(path), "--out", str(build)]):
            return build, f"compile exited {compiled}: {_last_error(captured.getvalue())}"
        try:
            rc = train.main([str(build)])
        except Exception as exc:  # out of memory past the probe, a kernel missing: recorded, the suite goes on
            return build, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return build, None if rc == 0 else f"training exited {rc}: {_last_error(captured.getvalue())}"


def measure(build: Path, peak: float | None) -> dict:
    """Steady tokens/s and step time, MFU, and memory and time against the plan, of a trained build."""
    plan = json.loads((build / "plan.json").read_text())["stages"][0]
    report = json.loads((build / "train_report.json").read_text())["stages"][0]
    records = [json.loads(line) for line in (build / "metrics.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_s"] for r in records if r.get("loss") is not None and r["step"] > WARMUP_STEPS]
    tokens_per_s = statistics.median(steady)
    step_s = report["tokens"] / report["steps"] / tokens_per_s  # rows of one length: equal steps
    flops_per_step = plan["compute"]["flops"] / plan["steps"]
    memory = plan["memory"]
    context = memory["breakdown_gib"].get("overhead", 0.0)
    measured_gib = report.get("peak_memory_gib") or report.get("peak_rss_gib")
    planned_allocated = round(memory["peak_gib"] - (context if report.get("peak_memory_gib") else 0.0), 3)
    planned_step_s = plan["compute"]["wall_s"] / plan["steps"] if plan["compute"]["wall_s"] else None
    return {
        "tokens_per_s": round(tokens_per_s, 1), "step_s": round(step_s, 4),
        "mfu": round(flops_per_step / step_s / (peak * 1e12), 4) if peak else None,
        "peak_allocated_gib": measured_gib, "probe_peak_gib": report.get("probe_peak_gib"),
        "plan_peak_gib": memory["peak_gib"], "plan_peak_less_context_gib": planned_allocated,
        "memory_ratio": round(measured_gib / planned_allocated, 3) if measured_gib and planned_allocated else None,
        "plan_step_s": round(planned_step_s, 4) if planned_step_s else None,
        "step_time_ratio": round(step_s / planned_step_s, 3) if planned_step_s else None,
        "plan_breakdown_gib": memory["breakdown_gib"],
    }


# ---------------------------------------------------------------------------------------------
# the suite


@dataclass
class Suite:
    out: Path
    smoke: bool
    budget_s: float
    started: float = field(default_factory=time.perf_counter)
    results: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.started > self.budget_s

    def record(self, entry: dict) -> None:
        self.results.append(entry)
        self.write()

    def write(self) -> None:
        self.meta["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        (self.out / "gpu_suite.json").write_text(json.dumps({**self.meta, "runs": self.results}, indent=2,
                                                            sort_keys=True) + "\n")
        (self.out / "gpu_suite.md").write_text(markdown(self.meta, self.results))


def run_suite(suite: Suite, cases: list[Case]) -> None:
    device, entry, device_name = device_entry(suite.smoke)
    precision = "fp32" if device == "cpu" else "bf16"
    loss_section = cross_entropy_section()
    suite.meta.update(device=device_name, hardware_file=entry, peak_tflops=peak_tflops(entry, precision),
                      precision=precision, smoke=suite.smoke, cross_entropy_key=loss_section)
    work = suite.out / "work"
    seq_len = SMOKE_SEQ_LEN if suite.smoke else SEQ_LEN
    steps = SMOKE_STEPS if suite.smoke else STEPS
    for case in cases:
        checkpoint = work / "models" / case.catalog
        # the smoke run checks each case's path once: one micro-batch size
        for micro in case.micro_batches[:1] if suite.smoke else case.micro_batches:
            base = {"case": case.name, "model": case.catalog, "micro_batch_size": micro, "seq_len": seq_len,
                    "note": _note(case, loss_section)}
            if suite.out_of_time():
                suite.record({**base, "error": f"skipped: the {suite.budget_s:.0f} s time guard was reached"})
                continue
            if case.needs_flash and (device != "cuda" or importlib.util.find_spec("flash_attn") is None):
                suite.record({**base, "error": "skipped: flash_attn is not importable" if device == "cuda"
                              else "skipped: flash_attention_2 needs CUDA"})
                continue
            suite.record({**base, **run_one(case, micro, checkpoint, work, suite.smoke, device, entry, seq_len,
                                            steps, loss_section, suite.meta["peak_tflops"])})
        if not any(c.catalog == case.catalog for c in cases[cases.index(case) + 1:]):
            shutil.rmtree(checkpoint, ignore_errors=True)  # disk: a 3B checkpoint is 6 GB


def run_one(case: Case, micro: int, checkpoint: Path, work: Path, smoke: bool, device: str, entry: str | None,
            seq_len: int, steps: int, loss_section: str | None, peak: float | None) -> dict:
    """Compile and train one case at one micro-batch size; its figures, or its error."""
    started = time.perf_counter()
    try:
        if not (checkpoint / "config.json").is_file():
            write_checkpoint(checkpoint, case.catalog, smoke, device)
        folder = work / "runs" / f"{case.name}-mb{micro}"
        data = folder / "rows.jsonl"
        folder.mkdir(parents=True, exist_ok=True)
        row_tokens = seq_len // case.rows_per_sequence
        write_rows(data, rows=(steps + 2) * micro * case.rows_per_sequence + 8, tokens=row_tokens)
        recipe = case_recipe(case, micro, checkpoint, data, device, entry, seq_len, steps, loss_section)
        build, error = compile_and_train(recipe, folder)
        figures = {"error": error} if error else measure(build, peak)
    except Exception as exc:  # one case's failure is recorded; the suite goes on
        figures = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    finally:
        _free_memory()
    shutil.rmtree(work / "runs" / f"{case.name}-mb{micro}", ignore_errors=True)
    return {**figures, "run_s": round(time.perf_counter() - started, 1)}


def _note(case: Case, loss_section: str | None) -> str:
    if case.chunked_loss:
        return "chunked loss" if loss_section else "default loss (no cross_entropy key in the recipe schema yet)"
    return ""


def markdown(meta: dict, runs: list[dict]) -> str:
    head = (f"# GPU suite on {meta.get('device')} ({meta.get('hardware_file')}, dense {meta.get('precision')} peak "
            f"{meta.get('peak_tflops')} TFLOP/s){' (smoke)' if meta.get('smoke') else ''}\n\n"
            "| case | micro-batch | tokens/s | MFU | peak allocated GiB | plan peak less context GiB | ratio | "
            "plan s/step | measured s/step | ratio | note |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in runs:
        if r.get("error"):
            lines.append(f"| {r['case']} | {r['micro_batch_size']} | | | | | | | | | {r['error']} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "?"
        lines.append(f"| {r['case']} | {r['micro_batch_size']} | {r['tokens_per_s']:,.0f} | {mfu} | "
                     f"{r['peak_allocated_gib']} | {r['plan_peak_less_context_gib']} | {r['memory_ratio']} | "
                     f"{r['plan_step_s']} | {r['step_s']} | {r['step_time_ratio']} | {r['note']} |")
    return head + "\n".join(lines) + f"\n\nElapsed {meta.get('elapsed_s')} s.\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--smoke", action="store_true", help="tiny configs on CPU, in seconds")
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no run after this many seconds")
    parser.add_argument("--case", action="append", choices=[c.name for c in CASES], help="only these cases")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    suite = Suite(args.out, args.smoke, args.budget_s)
    run_suite(suite, [c for c in CASES if not args.case or c.name in args.case])
    suite.write()
    shutil.rmtree(args.out / "work", ignore_errors=True)
    print((args.out / "gpu_suite.md").read_text())
    print(json.dumps({"runs": [{k: r.get(k) for k in ("case", "micro_batch_size", "tokens_per_s", "mfu",
                                                        "memory_ratio", "step_time_ratio", "error")}
                               for r in suite.results]}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
