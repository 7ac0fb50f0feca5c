"""`recipe plan --precise`: the analytical estimate of each stage beside a simulated step."""

from __future__ import annotations

import json

from compiler.emission.build import Build
from compiler.estimation.estimate import GIB
from compiler.estimation.precise import simulate_step
from runtime.contract.config import LOSS_CHUNK_POSITIONS
from runtime.contract.layout import RUNTIME_CONFIG_FILE

SIMULATED_FAMILIES = ("gpt2", "llama", "mistral", "qwen2")


def precise_report(build: Build) -> str:
    runtime = json.loads(build.files[RUNTIME_CONFIG_FILE])
    model = runtime["model"]
    lines = ["", "## Precise check (one training step simulated on fake tensors)", "",
             "| stage | analytical peak GiB | simulated peak GiB | difference |", "|---|---|---|---|"]
    if model["family"] not in SIMULATED_FAMILIES:
        return "\n".join(lines[:3] + [f"{model['family']} is not implemented in transformers: nothing to simulate.", ""])
    for stage, planned in zip(runtime["stages"], build.plan["stages"]):
        # Adapter steps are left out: the estimate holds an adapter's frozen base at the working
        # width, while the runtime loads it in fp32, so the two would differ by design.
        if stage["adapter"]["kind"] != "full":
            lines.append(f"| {stage['name']} | {planned['memory']['peak_gib']} | - | {stage['adapter']['kind']} "
                         "adapters are not simulated |")
            continue
        data = runtime["data"][stage["data"]]
        config = {**model["config"], "vocab_size": model["vocab_size"]}
        if model["family"] == "gpt2":
            config["n_positions"] = model["n_positions"]
        before = build.plan["data"][stage["data"]]["tokens"].get("before_truncation", {})
        supervised = (before.get("completion") or before.get("supervised") or before.get("total") or {}).get("max", 1)
        hardware = runtime["hardware"]
        result = simulate_step(
            config, micro_batch_size=stage["micro_batch_size"], seq_len=data["max_total_tokens"],
            supervised_per_example=max(1, supervised), precision=hardware["precision"], optimizer=stage["optimizer"],
            gradient_checkpointing=hardware["gradient_checkpointing"], attention=hardware["attention"],
            cross_entropy=stage["cross_entropy"], chunk_positions=LOSS_CHUNK_POSITIONS)
        simulated = result.total_bytes / GIB
        analytical = planned["memory"]["peak_gib"] - planned["memory"]["breakdown_gib"]["overhead"]
        lines.append(f"| {stage['name']} | {analytical:.3f} | {simulated:.3f} | {(analytical - simulated) / simulated:+.1%} |")
    lines += ["", "The simulation runs transformers' own code on CPU kernels without the CUDA context; the "
              "analytical figures above exclude the context too.", ""]
    return "\n".join(lines)
