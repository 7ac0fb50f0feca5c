"""Peak-memory estimates against published measurements.

    .venv/bin/python benchmarks/estimate_accuracy.py [--rows]

Reads benchmarks/data/memory_measurements.toml (real runs, each with its source and the sentence
the number comes from), estimates each configuration with the compiler's analytical model, and
prints the median and largest relative error, beside what DeepSpeed's own estimators
(estimate_zero2/zero3_model_states_mem_needs, model states only) and `accelerate estimate-memory`
(its "Training using Adam" figure) predict for the same rows. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compiler.estimation.catalog import activation_coefficients, load_model_facts  # noqa: E402
from compiler.estimation.estimate import GIB, ActivationCoefficients, TrainSetup, train_memory  # noqa: E402
from compiler.estimation.params import architecture, lora_parameters, parameters  # noqa: E402

DATA = REPO / "benchmarks" / "data" / "memory_measurements.toml"
# torch.cuda.max_memory_allocated excludes the CUDA context; reserved and nvidia-smi-style figures
# include allocator slack (reserved) or the context too. Our estimate adds 0.75 GiB of context:
# it is compared with the context removed when the source measured allocated memory.
_ALLOCATED = "max_memory_allocated"


def ours(row: dict) -> float:
    facts = load_model_facts(row["model"])
    a = architecture(facts)
    total = parameters(a).total
    if row["method"] in ("lora", "qlora"):
        trainable = lora_parameters(a, row.get("lora_rank", 8), row.get("lora_targets", "all-linear"))
    else:
        trainable = total
    assumptions = row.get("assumptions", "") + row.get("source", "")
    pure = "bf16-true" in assumptions or "torchtune" in assumptions or "pure bf16" in assumptions
    coefficients = {p: ActivationCoefficients(**v) for p, v in activation_coefficients(facts.family).items()}
    optimizer = {"paged_adamw_8bit": "adamw_8bit"}.get(row["optimizer"], row["optimizer"])
    quantization_format = row.get("quantization_format", "bnb-nf4")
    added = trainable if row["method"] in ("lora", "qlora") else 0  # a LoRA's weights come on top of the base
    setup = TrainSetup(
        total_parameters=total + added, trainable_parameters=trainable, micro_batch_size=row["micro_batch_size"],
        seq_len=row["seq_len"], supervised_per_example=row["seq_len"], precision=row["precision"], device="cuda",
        optimizer=optimizer if optimizer in ("adamw", "adamw_8bit", "sgd", "adafactor") else "adamw",
        quantization=row.get("quantization", "none"), world_size=row["gpus"], zero_stage=row["zero_stage"],
        offload_optimizer=row["offload"] != "none", offload_params=row["offload"] == "optimizer+params",
        gradient_checkpointing=row["gradient_checkpointing"], attention=row.get("attention", "sdpa"),
        master_weights=not pure, coefficients=coefficients,
        optimizer_in_backward=row.get("optimizer_in_backward", False),
        double_quantization=quantization_format in ("bnb-nf4-dq", "torchao-nf4"),
        quantized_head=row.get("quantized_head", False),
        quantized_keeps_inputs=quantization_format.startswith("bnb-"),
        loss_logits=row.get("loss_logits", "fp32"), lora_dropout_inputs=row.get("lora_dropout_inputs", 0),
    )
    memory = train_memory(a, setup)
    peak = memory.peak_bytes - (memory.overhead_bytes if _ALLOCATED in row["measured_as"] else 0)
    return peak / GIB


def deepspeed_estimate(row: dict) -> float | None:
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except ImportError:  # deepspeed is not a dependency yet; its column is left out
        return None
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    a = architecture(load_model_facts(row["model"]))
    total = parameters(a).total
    if row["zero_stage"] == 3:
        largest = a.vocab_size * a.hidden
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, num_gpus_per_node=row["gpus"], cpu_offload=row["offload"] != "none",
            cpu_offload_params=row["offload"] == "optimizer+params")
    else:
        _, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=row["gpus"],
                                                       cpu_offload=row["offload"] != "none")
    return gpu / GIB


def accelerate_estimate(row: dict) -> float:
    from accelerate.commands.estimate import estimate_training_usage

    total = parameters(architecture(load_model_facts(row["model"]))).total
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[row["precision"]]
    return max(estimate_training_usage(total * 4, dtype).values()) / GIB


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", action="store_true", help="print every row")
    args = parser.parse_args()
    rows = tomllib.loads(DATA.read_text(encoding="utf-8"))["measurement"]
    errors: dict[str, list[float]] = {"recipe": [], "deepspeed": [], "accelerate": []}
    table = []
    for row in rows:
        measured = row["measured_gib"]
        predicted = {"recipe": ours(row), "deepspeed": deepspeed_estimate(row), "accelerate": accelerate_estimate(row)}
        for name, value in predicted.items():
            if value is not None:
                errors[name].append(abs(value - measured) / measured)
        table.append((row["id"], measured, predicted))
        if args.rows:
            ds = f"{predicted['deepspeed']:7.2f}" if predicted["deepspeed"] is not None else "      -"
            print(f"{row['id']:48s} measured {measured:7.2f}  recipe {predicted['recipe']:7.2f}  "
                  f"deepspeed {ds}  accelerate {predicted['accelerate']:7.2f} GiB")
    summary = {name: {"median_rel_error": round(statistics.median(e), 4), "max_rel_error": round(max(e), 4)}
               for name, e in errors.items() if e}
    within = sum(1 for e in errors["recipe"] if e <= 0.10)
    print(f"{len(rows)} published measurements; recipe within 10%: {within}")
    for name, s in summary.items():
        print(f"{name:10s} median relative error {s['median_rel_error']:.1%}, max {s['max_rel_error']:.1%}")
    print(json.dumps({"rows": len(rows), "recipe_within_10pct": within, **summary}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
