"""How long `recipe validate` takes on every example recipe (target: under 0.3 s each).

    .venv/bin/python benchmarks/validate_speed.py [--runs N]

For each recipe: the wall time of `recipe validate RECIPE` as a fresh process (what a user or a
pre-commit hook waits for, interpreter start included; best of N runs), and the time of the
validation itself inside a warm process. Also checks that validation imported neither torch nor
transformers. Prints one line per recipe and, last, one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_S = 0.3

_IN_PROCESS = """
import sys, time, json
from pathlib import Path
started = time.perf_counter()
from compiler.rules.validate import validate
imported = time.perf_counter()
validate(Path(sys.argv[1]))
done = time.perf_counter()
heavy = sorted(m for m in ("torch", "transformers", "tokenizers") if m in sys.modules)
print(json.dumps({"import_s": imported - started, "validate_s": done - imported, "heavy": heavy}))
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    figures: dict[str, dict] = {}
    # As installed for a user: bytecode caches are written on the first run and used after it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for recipe in sorted((REPO / "specs" / "examples").glob("*.toml")):
        rel = str(recipe.relative_to(REPO))
        walls = []
        for _ in range(args.runs + 1):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "compiler.cli", "validate", rel], cwd=REPO, check=True,
                           stdout=subprocess.DEVNULL, env=env)
            walls.append(time.perf_counter() - started)
        walls = walls[1:]  # the first run writes the bytecode caches
        inner = json.loads(subprocess.run([sys.executable, "-c", _IN_PROCESS, rel], cwd=REPO, check=True,
                                          capture_output=True, text=True, env=env).stdout)
        figures[recipe.stem] = {
            "process_wall_s": round(min(walls), 3),
            "validate_in_process_s": round(inner["validate_s"], 4),
            "heavy_imports": inner["heavy"],
        }
        verdict = "ok" if min(walls) < TARGET_S and not inner["heavy"] else "SLOW" if min(walls) >= TARGET_S else "HEAVY"
        print(f"{recipe.stem:24s} process {min(walls):.3f} s (best of {args.runs}), "
              f"validation itself {inner['validate_s'] * 1000:.1f} ms, heavy imports {inner['heavy'] or 'none'}: {verdict}")
    worst = max(f["process_wall_s"] for f in figures.values())
    print(json.dumps({"recipes": figures, "worst_process_wall_s": worst, "target_s": TARGET_S}, sort_keys=True))
    return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
