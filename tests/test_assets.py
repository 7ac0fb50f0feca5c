"""Pinned assets: download once, verify, unpack nested members, survive races and kills."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from compiler.data import assets
from compiler.data.assets import asset_path, fetch_all
from runtime.contract.assets import DISTS, AssetError, AssetSpec, cache_dir, load_catalog

TWEETS_TEXT = "1\t2.5\tfirst tweet\n2\t-1.25\tsecond tweet ünïcode\n"


def _tar_gz_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def build_fake_sdist(directory: Path) -> Path:
    """An sdist-like archive whose data file sits inside a nested archive, like vaderSentiment's."""
    inner = _tar_gz_bytes({
        "corpus/tweets.txt": TWEETS_TEXT.encode(),
        "corpus/tweets_ratings.txt": b"unused\n",
    })  # fmt: skip
    outer = _tar_gz_bytes({
        "fake-1.0/README": b"fake package\n",
        "fake-1.0/resources/corpus.tar.gz": inner,
    })  # fmt: skip
    path = directory / "fake-1.0.tar.gz"
    path.write_bytes(outer)
    return path


def fake_spec(sha256: str, member: tuple[str, ...] | None = None, name: str = "fake-tweets") -> AssetSpec:
    return AssetSpec(
        name=name,
        package="fake",
        version="1.0",
        dist="sdist",
        sha256=sha256,
        member=member or ("fake-1.0/resources/corpus.tar.gz", "corpus/tweets.txt"),
        license="MIT",
        description="test data",
    )


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("RECIPE_CACHE", str(root))
    return root


@pytest.fixture
def fake_sdist(tmp_path) -> tuple[Path, str]:
    source = tmp_path / "registry"
    source.mkdir()
    path = build_fake_sdist(source)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def downloads(monkeypatch, fake_sdist) -> list[str]:
    """Replace the registry download with a copy of the fake sdist; records one entry per call."""
    calls: list[str] = []

    def fake_download(spec: AssetSpec, dest_dir: Path) -> Path:
        calls.append(spec.name)
        return Path(shutil.copy(fake_sdist[0], dest_dir))

    monkeypatch.setattr(assets, "_download", fake_download)
    return calls


def test_unpacks_nested_member_and_reuses_cache(cache, fake_sdist, downloads):
    spec = fake_spec(fake_sdist[1])

    path = asset_path(spec)

    assert path.read_text() == TWEETS_TEXT
    assert path == cache / "assets" / f"fake-tweets-{fake_sdist[1][:16]}" / "tweets.txt"
    source = json.loads((path.parent / "source.json").read_text())
    assert source["package"] == "fake" and source["version"] == "1.0" and source["sha256"] == fake_sdist[1]
    assert source["member_sha256"] == hashlib.sha256(TWEETS_TEXT.encode()).hexdigest()
    assert asset_path(spec) == path
    assert asset_path(spec, fetch=False) == path
    assert downloads == ["fake-tweets"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".partial-")]


def test_cache_dir_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("RECIPE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "recipe"


def test_wrong_sha256_caches_nothing(cache, fake_sdist, downloads):
    spec = fake_spec("0" * 64)

    with pytest.raises(AssetError) as excinfo:
        asset_path(spec)

    message = str(excinfo.value)
    assert "fake-tweets" in message and "0" * 64 in message and fake_sdist[1] in message
    directory = cache / "assets" / spec.directory_name
    assert not (directory / "tweets.txt").exists()
    assert not (directory / "source.json").exists()
    assert [p.name for p in directory.iterdir()] == [".lock"]


def test_missing_member_suggests_close_name(cache, fake_sdist, downloads):
    spec = fake_spec(fake_sdist[1], member=("fake-1.0/resources/corpus.tar.gz", "corpus/tweet.txt"))

    with pytest.raises(AssetError, match="fake-tweets") as excinfo:
        asset_path(spec)

    assert "corpus/tweets.txt" in str(excinfo.value)
    assert not (cache / "assets" / spec.directory_name / "tweet.txt").exists()


def test_missing_member_in_outer_archive_names_the_archive(cache, fake_sdist, downloads):
    spec = fake_spec(fake_sdist[1], member=("fake-1.1/resources/corpus.tar.gz", "corpus/tweets.txt"))

    with pytest.raises(AssetError, match=r"fake-1\.0\.tar\.gz.*fake-1\.0/resources/corpus\.tar\.gz"):
        asset_path(spec)


@pytest.mark.parametrize("member", ["../etc/passwd", "fake-1.0/../../x", "/etc/passwd", ""])
def test_unsafe_member_paths_are_refused(member):
    with pytest.raises(AssetError, match="member"):
        fake_spec("a" * 64, member=("fake-1.0/ok.tar.gz", member))


def test_unpacks_member_of_a_wheel(cache, tmp_path, monkeypatch):
    wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/__init__.py", "")
        zf.writestr("fake_pkg/data/ranks.tiktoken", "IQ== 0\n")
    monkeypatch.setattr(assets, "_download", lambda spec, dest: Path(shutil.copy(wheel, dest)))
    spec = AssetSpec(
        name="fake-ranks",
        package="fake-pkg",
        version="1.0",
        dist="wheel",
        sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member=("fake_pkg/data/ranks.tiktoken",),
        license="MIT",
        description="test data",
    )

    assert asset_path(spec).read_text() == "IQ== 0\n"


def test_fetch_false_tells_user_to_run_fetch(cache, fake_sdist, downloads):
    with pytest.raises(AssetError, match=r"recipe fetch fake-tweets"):
        asset_path(fake_spec(fake_sdist[1]), fetch=False)
    assert downloads == []


def test_half_written_fetch_is_not_trusted(cache, fake_sdist, downloads):
    """A fetch killed after writing the member but before the marker must be redone."""
    spec = fake_spec(fake_sdist[1])
    directory = cache / "assets" / spec.directory_name
    directory.mkdir(parents=True)
    (directory / "tweets.txt").write_text("1\t2.5\tfirst tw")
    (directory / ".partial-abc123").write_bytes(b"junk")

    with pytest.raises(AssetError):
        asset_path(spec, fetch=False)
    assert asset_path(spec).read_text() == TWEETS_TEXT
    assert downloads == ["fake-tweets"]
    assert not (directory / ".partial-abc123").exists()


def test_download_failure_shows_pip_output_and_retry_command(cache, monkeypatch):
    failing = [sys.executable, "-c", "import sys; sys.stderr.write('line one\\nNo matching distribution\\n'); sys.exit(3)"]
    monkeypatch.setattr(assets, "_download_command", lambda spec, dest: failing)

    with pytest.raises(AssetError) as excinfo:
        asset_path(fake_spec("a" * 64))

    message = str(excinfo.value)
    assert "fake-tweets" in message and "exit 3" in message and "No matching distribution" in message
    assert "retry" in message and "sys.exit(3)" in message


def test_download_command_pins_exact_version():
    spec = fake_spec("a" * 64)
    command = assets._download_command(spec, Path("/tmp/x"))
    assert command[:6] == [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary"]
    assert "fake==1.0" in command
    wheel = dataclasses.replace(spec, dist="wheel")
    assert "--only-binary" in assets._download_command(wheel, Path("/tmp/x"))
    npm = dataclasses.replace(spec, dist="npm")
    assert assets._download_command(npm, Path("/tmp/x")) == ["npm", "pack", "fake@1.0"]


def test_fetch_all_rejects_unknown_names_before_downloading(cache, fake_sdist, downloads):
    catalog = {"fake-tweets": fake_spec(fake_sdist[1])}
    with pytest.raises(AssetError, match="did you mean fake-tweets"):
        fetch_all(["fake-tweets", "fake-tweet"], catalog)
    assert downloads == []
    assert fetch_all(["fake-tweets"], catalog)["fake-tweets"].read_text() == TWEETS_TEXT


def _fetch_in_child(cache_root: str, archive: str, sha256: str, counter: str, barrier, out: str) -> None:
    """Runs in a spawned process: fetch the fake asset with a slow download that logs each call."""
    os.environ["RECIPE_CACHE"] = cache_root

    def slow_download(spec: AssetSpec, dest_dir: Path) -> Path:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # long enough that the other process reaches the lock meanwhile
        return Path(shutil.copy(archive, dest_dir))

    assets._download = slow_download
    barrier.wait(timeout=60)
    Path(out).write_text(asset_path(fake_spec(sha256)).read_text())


def test_concurrent_fetches_download_once(tmp_path, fake_sdist):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    counter = tmp_path / "downloads.log"
    outputs = [tmp_path / f"out-{i}.txt" for i in range(2)]
    workers = [
        context.Process(
            target=_fetch_in_child,
            args=(str(tmp_path / "cache"), str(fake_sdist[0]), fake_sdist[1], str(counter), barrier, str(out)),
        )
        for out in outputs
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)

    assert [w.exitcode for w in workers] == [0, 0]
    assert [out.read_text() for out in outputs] == [TWEETS_TEXT, TWEETS_TEXT]
    assert len(counter.read_text().splitlines()) == 1


def test_catalog_rejects_bad_entries(tmp_path):
    good = {
        "package": '"fake"',
        "version": '"1.0"',
        "dist": '"sdist"',
        "sha256": f'"{"a" * 64}"',
        "member": '["fake-1.0/x.txt"]',
        "license": '"MIT"',
        "description": '"x"',
    }

    def catalog_with(**changes: str | None) -> Path:
        entry = {**good, **changes}
        lines = ["[broken]"] + [f"{key} = {value}" for key, value in entry.items() if value is not None]
        path = tmp_path / "assets.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    assert load_catalog(catalog_with())["broken"].member == ("fake-1.0/x.txt",)
    cases = [
        ({"sha256": '"abc"'}, "sha256"),
        ({"dist": '"egg"'}, "dist"),
        ({"member": '["../x.txt"]'}, "member"),
        ({"member": "[]"}, "member"),
        ({"license": None}, "license"),
        ({"version": "3"}, "version"),
        ({"package": '"-r evil.txt"'}, "package"),
        ({"shasum": '"x"'}, "shasum"),
    ]
    for changes, key in cases:
        with pytest.raises(AssetError, match=rf"\[broken\], key '{key}'"):
            load_catalog(catalog_with(**changes))
    with pytest.raises(AssetError, match="did you mean 'sha256'"):
        load_catalog(catalog_with(shasum='"x"'))


def test_real_catalog_is_well_formed():
    catalog = load_catalog()
    assert {"vader-tweets", "gpt2-bpe", "smollm2-135m-instruct-gguf", "cl100k-base", "seed-tasks"} <= set(catalog)
    for name, spec in catalog.items():
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256), name
        assert spec.member and all(spec.member), name
        assert spec.dist in DISTS, name
        assert spec.license and spec.description, name


@pytest.mark.network
def test_vader_tweets_really_download(cache):
    path = asset_path(load_catalog()["vader-tweets"])

    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4200
    assert all(len(row) == 3 for row in rows)
    assert [row[0] for row in rows[:3]] == ["1", "2", "3"]
    scores = [float(row[1]) for row in rows]
    assert min(scores) >= -4 and max(scores) <= 4
    assert hashlib.sha256(path.read_bytes()).hexdigest() == (
        "dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f"
    )
