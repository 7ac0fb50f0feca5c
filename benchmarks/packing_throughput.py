"""Packing against length-grouped rows, and the training loop's speed with packing off.

    .venv/bin/python benchmarks/packing_throughput.py chat [--epochs N] [--host-memory release|reuse|both]
    .venv/bin/python benchmarks/packing_throughput.py demo [--repo PATH] [--epochs N] [--max-steps N]

`chat` trains the SmolLM2 chat SFT example twice, length-grouped rows and packed rows, on the same
data for the same epochs, evaluates each, and prints for each: steps, wall time, tokens/s, peak
resident set, the final training loss and the held-out loss of the example's eval (packing is
faster only if it reaches the same loss). It does so under each `hardware.host_memory` policy
(`--host-memory` picks one), and compares the two. `demo` trains the
tweet-sentiment example with packing off and prints its tokens/s; `--repo` runs another checkout of
the project (its compiler and runtime) on the same recipe, for a before/after comparison on the
same machine state.

Prints one line per figure and, last, one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _train(repo: Path, recipe: str, build: Path, overrides: dict[str, object], *, evaluate: bool = False) -> dict:
    """Compile `recipe` with `overrides`, train it with `repo`'s code (and with `evaluate` run its
    eval): the stage's figures."""
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "compiler.cli", "compile", str(REPO / recipe), "--out", str(build)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    subprocess.run(command, check=True, cwd=REPO / recipe.rsplit("/", 1)[0], env=env, stdout=sys.stderr)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "runtime.train", str(build)], check=True, cwd=repo, env=env,
                   stdout=sys.stderr)
    wall = time.perf_counter() - started
    if evaluate:
        subprocess.run([sys.executable, "-m", "runtime.evaluate", str(build)], check=True, cwd=repo, env=env,
                       stdout=sys.stderr)
    report = json.loads((build / "train_report.json").read_text())["stages"][0]
    metrics = [json.loads(line) for line in (build / "metrics.jsonl").read_text().splitlines()]
    tail = metrics[-max(1, len(metrics) // 5):]  # the last fifth of the logged steps
    return {"steps": report["steps"], "process_wall_s": round(wall, 1), "train_wall_s": report["wall_s"],
            "tokens": report["tokens"], "tokens_per_s": report["tokens_per_s"],
            "final_loss": round(sum(m["loss"] for m in tail) / len(tail), 4),
            "heldout_loss": json.loads((build / "eval.json").read_text())["loss"] if evaluate else None,
            "peak_rss_gib": report.get("peak_rss_gib"), "packing": report.get("packing")}


def chat(epochs: int, policies: list[str]) -> dict:
    recipe = "specs/examples/smollm2-chat-sft.toml"
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # A pack of this data holds about ten conversations, so one pack a step is about as many
        # tokens a step as the example's 4 x 2 rows.
        packed = {"train.packing": "true", "train.micro_batch_size": 1, "train.grad_accum": 1}
        for policy in policies:
            runs = out[policy] = {}
            for name, overrides in (("rows", {}), ("packed", packed)):
                overrides = {"train.epochs": epochs, "hardware.host_memory": policy, **overrides}
                runs[name] = _train(REPO, recipe, Path(tmp) / f"{policy}-{name}", overrides, evaluate=True)
                print(f"{policy}, {name}: " + ", ".join(f"{k} {v}" for k, v in runs[name].items() if k != "packing"))
            packing = runs["packed"]["packing"]
            print(f"{policy}, packed rows: {packing['sequences']} sequences in {packing['packs']} rows of "
                  f"{packing['budget']} tokens, {packing['padding_share']:.1%} padding")
            print(f"{policy}, speed-up (training loop): {runs['rows']['train_wall_s'] / runs['packed']['train_wall_s']:.2f}x")
            print(f"{policy}, speed-up (the training process, memory probe and saving included): "
                  f"{runs['rows']['process_wall_s'] / runs['packed']['process_wall_s']:.2f}x")
    if len(policies) == 2:
        for name in ("rows", "packed"):
            runs = [out[p][name] for p in policies]
            print(f"{name}, training loop under {policies[1]} against {policies[0]}: "
                  f"{runs[0]['train_wall_s'] / runs[1]['train_wall_s']:.2f}x as fast, peak RSS "
                  f"{runs[0]['peak_rss_gib']} -> {runs[1]['peak_rss_gib']} GiB")
    return out


def demo(repo: Path, epochs: int, max_steps: int | None) -> dict:
    overrides: dict[str, object] = {"train.epochs": epochs}
    if max_steps is not None:  # on the stage: [train] may not hold both epochs and max_steps
        overrides["stages.0.max_steps"] = max_steps
    with tempfile.TemporaryDirectory() as tmp:
        result = _train(repo, "specs/examples/tweet-sentiment.toml", Path(tmp) / "demo", overrides)
    print(f"demo ({repo}): {result['tokens_per_s']} tokens/s over {result['steps']} steps")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("chat", "demo"))
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to train with (demo)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="stop the demo after this many steps")
    parser.add_argument("--host-memory", choices=("release", "reuse", "both"), default="both",
                        help="hardware.host_memory of the chat runs (both: each, release first)")
    args = parser.parse_args()
    policies = ["release", "reuse"] if args.host_memory == "both" else [args.host_memory]
    figures = (chat(args.epochs, policies) if args.what == "chat"
               else demo(args.repo.resolve(), args.epochs, args.max_steps))
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
