"""Data sources: Parquet, globs over several files, hub names (a clear error when unreachable),
and the hash of every file read in the build manifest."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from compiler.emission.build import compile_recipe
from tests.conftest import base_recipe, run_cli, write_json_recipe

ROWS = [{"user_input": f"question {i}", "completion": f"answer {i}"} for i in range(6)]


def _recipe(tmp_path: Path, source: dict, **data) -> Path:
    recipe = base_recipe(template={"prompt": "Q: {{ user_input }}\nA:", "completion": " {{ completion }}"},
                         tokens={"max_total": "auto", "truncatable": []}, eval=None)
    recipe["data"] = {"qa": {"source": source, "format": "completion", "split": {"heldout_fraction": 0.5}, **data}}
    return write_json_recipe(tmp_path, recipe)


def test_parquet_rows_are_read_with_row_numbers(tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "qa.parquet")
    build = compile_recipe(_recipe(tmp_path, {"path": "qa.parquet"}))
    plan = build.plan["data"]["qa"]
    assert plan["rows"] == 6 and plan["split"]["train"] == 3
    lines = sorted(json.loads(x)["line"] for f in ("train", "heldout")
                   for x in build.files[f"data/qa/{f}.jsonl"].decode().splitlines())
    assert lines == [1, 2, 3, 4, 5, 6]


def test_a_glob_reads_every_file_and_the_manifest_hashes_each(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    for k in range(2):
        (parts / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[3 * k: 3 * k + 3]))
    build = compile_recipe(_recipe(tmp_path, {"path": "parts/*.jsonl"}))
    assert build.plan["data"]["qa"]["rows"] == 6
    manifest = json.loads(build.files["manifest.json"])
    files = manifest["data"]["qa"]["files"]
    assert files == {f"part-{k}.jsonl": hashlib.sha256((parts / f"part-{k}.jsonl").read_bytes()).hexdigest()
                     for k in range(2)}


def test_a_bad_row_in_a_globbed_file_names_that_file(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (parts / "b.jsonl").write_text(json.dumps(ROWS[1]) + "\n{broken\n")
    result = run_cli("compile", str(_recipe(tmp_path, {"path": "parts/*.jsonl"})), "--out", str(tmp_path / "b"),
                     cwd=tmp_path)
    assert result.returncode == 1
    assert "parts/*.jsonl/b.jsonl:2:2" in result.stderr and "[invalid_json]" in result.stderr


def test_an_unreachable_hub_is_a_clear_error_not_a_long_retry(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    path = _recipe(tmp_path, {"hub": "someone/some-data"})
    started = time.perf_counter()
    result = run_cli("compile", str(path), "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert time.perf_counter() - started < 30
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert 'data set "someone/some-data" is on the Hugging Face hub, which is not reachable from here' in result.stderr
    assert "use source.path" in result.stderr
