"""Several processes at once: fetching one asset into an empty cache, and training runs on one
machine (rendezvous ports, build directories)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compiler.data import assets
from compiler.data.assets import asset_path
from compiler.emission.launch import derived_port
from runtime.contract.assets import AssetSpec
from tests.conftest import REPO, base_recipe, run_cli, write_json_recipe
from tests.test_assets import TWEETS_TEXT, build_fake_sdist, fake_spec

# --- the asset cache --------------------------------------------------------------------------


def _fetch_child(cache_root: str, archive: str, sha256: str, log: str, barrier, out: str, first_sleep_s: float) -> None:
    """Runs in a spawned process: fetch the fake asset; the first download of all is slow."""
    os.environ["RECIPE_CACHE"] = cache_root

    def download(spec: AssetSpec, dest_dir: Path) -> Path:
        first = not Path(log).exists()
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        if first:
            time.sleep(first_sleep_s)  # the others reach the lock meanwhile
        return Path(shutil.copy(archive, dest_dir))

    assets._download = download
    barrier.wait(timeout=60)
    Path(out).write_text(asset_path(fake_spec(sha256)).read_text())


def _fetchers(tmp_path: Path, n: int, first_sleep_s: float) -> tuple[list, list[Path], Path, str, object]:
    registry = tmp_path / "registry"
    registry.mkdir()
    archive = build_fake_sdist(registry)
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(n)
    log = tmp_path / "downloads.log"
    outs = [tmp_path / f"out-{i}.txt" for i in range(n)]
    workers = [context.Process(target=_fetch_child, args=(str(tmp_path / "cache"), str(archive), sha256, str(log),
                                                          barrier, str(out), first_sleep_s)) for out in outs]
    for worker in workers:
        worker.start()
    return workers, outs, log, sha256, barrier  # the caller keeps the barrier alive until the joins


def _assert_cached_whole(tmp_path: Path, sha256: str) -> None:
    folder = tmp_path / "cache" / "assets" / fake_spec(sha256).directory_name
    source = json.loads((folder / "source.json").read_text())
    content = (folder / "tweets.txt").read_bytes()
    assert hashlib.sha256(content).hexdigest() == source["member_sha256"] == \
        hashlib.sha256(TWEETS_TEXT.encode()).hexdigest()
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "source.json", "tweets.txt"]  # nothing half-written


def test_concurrent_fetches_into_an_empty_cache_all_succeed(tmp_path: Path) -> None:
    workers, outs, log, sha256, _barrier = _fetchers(tmp_path, 4, first_sleep_s=1.0)
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    assert [out.read_text() for out in outs] == [TWEETS_TEXT] * 4
    assert len(log.read_text().splitlines()) == 1  # one download; the others waited and reused it
    _assert_cached_whole(tmp_path, sha256)


def test_a_fetcher_killed_mid_download_leaves_the_others_a_whole_file(tmp_path: Path) -> None:
    workers, outs, log, sha256, _barrier = _fetchers(tmp_path, 3, first_sleep_s=30.0)
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    downloader = int(log.read_text().split()[0])
    os.kill(downloader, signal.SIGKILL)  # while it holds the lock, half way through its fetch
    for worker in workers:
        worker.join(timeout=120)
    survivors = [(w, out) for w, out in zip(workers, outs) if w.pid != downloader]
    assert [w.exitcode for w, _ in survivors] == [0, 0]
    assert [out.read_text() for _, out in survivors] == [TWEETS_TEXT] * 2
    assert len(log.read_text().splitlines()) == 2  # the lock passed on; one of the others fetched it again
    _assert_cached_whole(tmp_path, sha256)


@pytest.mark.network
def test_concurrent_real_fetches_into_an_empty_cache(tmp_path: Path) -> None:
    """Three `recipe fetch` processes, one pinned package from the registry, an empty cache."""
    env = dict(os.environ, RECIPE_CACHE=str(tmp_path / "cache"))
    processes = [subprocess.Popen([sys.executable, "-m", "compiler.cli", "fetch", "gpt2-bpe"], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in processes]
    assert [code for code, _, _ in results] == [0, 0, 0], results
    spec = assets.load_catalog()["gpt2-bpe"]
    folder = tmp_path / "cache" / "assets" / spec.directory_name
    assert {out.strip() for _, out, _ in results} == {f"gpt2-bpe: {folder / spec.filename}"}
    source = json.loads((folder / "source.json").read_text())
    assert source["sha256"] == spec.sha256
    assert hashlib.sha256((folder / spec.filename).read_bytes()).hexdigest() == source["member_sha256"]
    assert sorted(p.name for p in folder.iterdir()) == [".lock", spec.filename, "source.json"]


# --- runs on one machine ----------------------------------------------------------------------


def _two_process_recipe(tmp_path: Path, name: str, **hardware) -> Path:
    recipe = base_recipe(name=name, hardware={"nproc_per_node": 2, **hardware},
                         train={"epochs": 2, "micro_batch_size": 2, "learning_rate": 1e-3})
    del recipe["eval"]
    return write_json_recipe(tmp_path, recipe, f"{name}.json")


@pytest.mark.slow
def test_runs_at_once_on_one_machine_do_not_collide(tmp_path: Path) -> None:
    """One recipe compiled into two --out folders, both trained at the same time with two
    processes each: torchrun --standalone gives each job its own free rendezvous port, and each
    build directory has its own lock, so both finish. (Two different recipes differ in more than
    this: their names, and so their derived ports, too.)"""
    recipe = _two_process_recipe(tmp_path, "alpha")
    builds = [tmp_path / "alpha-1", tmp_path / "alpha-2"]
    for out in builds:
        assert run_cli("compile", str(recipe), "--out", str(out), cwd=tmp_path).returncode == 0
        assert "--standalone" in (out / "launch.sh").read_text()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    runs = [subprocess.Popen([sys.executable, "-m", "compiler.cli", "run", str(out)], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for out in builds]
    outputs = [p.communicate(timeout=600)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    for out in builds:
        assert json.loads((out / "train_report.json").read_text())["world_size"] == 2
        assert (out / "model" / "model.safetensors").is_file()


def test_training_a_build_another_run_trains_is_refused(tmp_path: Path) -> None:
    """The lock training itself takes (what `recipe run` checks first, and what decides when two
    runs start together): a second training of one build stops with one line, touching nothing."""
    import fcntl

    recipe = write_json_recipe(tmp_path, base_recipe(name="locked"))
    build = tmp_path / "build"
    assert run_cli("compile", str(recipe), "--out", str(build), cwd=tmp_path).returncode == 0
    with open(build / ".run.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = subprocess.run([sys.executable, "-m", "runtime.train", str(build)], cwd=REPO, capture_output=True,
                                text=True)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert second.stderr.strip() == (f"error: another run is training {build} right now; wait for it to finish "
                                     "(or compile the recipe into another directory with --out)")
    assert not (build / "metrics.jsonl").exists() and not (build / "checkpoints").exists()


def test_two_multi_node_jobs_of_one_recipe_on_one_machine(tmp_path: Path, monkeypatch) -> None:
    """Several nodes rendezvous at a port every node must know in advance (derived from the
    recipe), so a second job of the same recipe on the first job's node cannot share it: it stops
    before torchrun starts, naming the port and the fix."""
    recipe = _two_process_recipe(tmp_path, "multi", nodes=2, nproc_per_node=1)
    first_build, second_build = tmp_path / "job-1", tmp_path / "job-2"
    for out in (first_build, second_build):
        assert run_cli("compile", str(recipe), "--out", str(out), cwd=tmp_path).returncode == 0
    port = derived_port("multi")
    env = dict(os.environ, PYTHON=sys.executable, MASTER_ADDR="127.0.0.1", NODE_RANK="0")
    first = subprocess.Popen(["bash", str(first_build / "launch.sh")], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # node 0 of the first job now waits for node 1 on the port
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            pytest.fail(f"the first job never listened on {port}")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("NODE_RANK", "0")
        second = run_cli("run", str(second_build), cwd=tmp_path)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"error: rendezvous port {port} is already in use" in second.stderr
    assert "set MASTER_PORT to a free port, or [launch] rdzv_port in the recipe" in second.stderr
