"""Rebuild seed-tasks-chat.jsonl: the 175 Self-Instruct seed tasks (pinned asset `seed-tasks`,
Apache-2.0) as OpenAI-style chat records, one per task instance.

    python specs/examples/data/build_seed_chat.py

Each record is {"messages": [system, user, assistant]}: the user turn is the task's instruction
followed by its input (when it has one), the assistant turn is the human-written output.
A test checks the committed file equals what this script writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SYSTEM = "You are a helpful assistant. Answer the task exactly."
OUT = Path(__file__).resolve().parent / "seed-tasks-chat.jsonl"


def chat_records(seed_tasks: Path) -> list[dict]:
    records = []
    for line in seed_tasks.read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        for instance in task["instances"]:
            user = task["instruction"] + (f"\n\n{instance['input']}" if instance["input"] else "")
            records.append({"messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": user},
                {"role": "assistant", "content": instance["output"]},
            ]})
    return records


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from compiler.data.assets import fetch_all
    from runtime.contract.assets import load_catalog

    path = fetch_all(["seed-tasks"], load_catalog())["seed-tasks"]
    OUT.write_text(render(chat_records(path)), encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
