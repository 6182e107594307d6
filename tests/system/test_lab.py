"""The arm64 kernel lab as a user runs it: a real 6.12 and a real 7.x Debian arm64 cloud kernel,
downloaded through the lab's private apt configuration, booted under qemu-system-aarch64 (TCG) with
the initramfs built on this host; small victims, three kills each; the records of both kernels come
back and are compared.

Skips only when QEMU is not installed or the kernel packages cannot be had (the lab exits 3 and says
why). The first run on a machine downloads ~60 MB (two kernels, the guest's Debian packages, wheels)
into the lab cache; later runs reuse it. The guest is then rebuilt twice from the cache with the
network blocked, and must come out byte-identical to the image the smoke run booted.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmkd_py.lab.kernels import image_kind

pytestmark = pytest.mark.slow

KILLS = 3
QEMU = "qemu-system-aarch64"


@dataclass
class LabRun:
    rc: int
    stdout: str
    stderr: str
    out: Path
    wall_s: float


def _lab(args: list[str], timeout_s: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmkd_py.cli", "lab", *args], capture_output=True, text=True,
                          timeout=timeout_s, check=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> LabRun:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (Debian package qemu-system-arm): the lab cannot boot arm64")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: the lab fetches Debian arm64 packages with it")
    out = tmp_path_factory.mktemp("lab") / "out"
    t0 = time.monotonic()
    proc = _lab(["--kernel", "A=deb:6.12", "--kernel", "B=deb:7", "--kills", str(KILLS), "--size-mib", "32",
                 "--resamples", "500", "--peers", "--peer-rounds", "1", "--out", str(out)])
    run = LabRun(proc.returncode, proc.stdout, proc.stderr, out, time.monotonic() - t0)
    print(f"\nlab smoke run: {run.wall_s:.0f} s wall, exit {run.rc}")
    if run.rc == 3:
        pytest.skip(f"kernel packages or QEMU unavailable: {run.stderr.strip().splitlines()[-1]}")
    return run


_OWN = "usr/lib/python3/dist-packages/lmkd_py/"


def _members(path: Path) -> dict[str, tuple[int, bytes | None, str | None]]:
    from lmkd_py.lab.image import read_newc

    return {e.path: (e.mode, e.data, e.target) for e in read_newc(gzip.decompress(path.read_bytes()))}


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_both_kernels_boot_kill_and_return_records(smoke: LabRun) -> None:
    assert smoke.rc == 0, f"lab failed ({smoke.rc}):\n{smoke.stdout[-3000:]}\n{smoke.stderr[-3000:]}"
    releases = {}
    for label, series in (("A", "6.12."), ("B", "7.")):
        recs = _records(smoke.out / f"records-{label}.jsonl")
        assert len(recs) == KILLS, f"{label}: {len(recs)} records"
        for r in recs:
            prov = r["provenance"]
            assert isinstance(prov, dict)
            assert r["outcome"] == "killed", r.get("error")
            assert prov["virtualised"] == "qemu-tcg" and prov["arch"] == "aarch64"
            assert str(prov["kernel_release"]).startswith(series), prov["kernel_release"]
            assert r["kill_to_exit_ns"] is not None
        releases[label] = recs[0]["provenance"]["kernel_release"]  # type: ignore[index]
        console = (smoke.out / f"console-{label}.log").read_text(errors="replace")
        assert "@LMKDLAB@ done" in console
    meta = json.loads((smoke.out / "lab.json").read_text())
    for k in meta["kernels"]:
        pkg = k["package"]
        assert len(pkg["sha256"]) == 64 and pkg["version"] and pkg["name"].startswith(("linux-image-", "linux-binary-"))
        assert k["release"] == releases[k["label"]]
        assert len(k["image_sha256"]) == 64
    guest = meta["guest_image"]
    assert len(guest["sha256"]) == 64
    names = {p["name"] for p in guest["packages"]}
    assert {"busybox-static", "python3.13-minimal", "libpython3.13-stdlib", "libc6", "earlyoom"} <= names
    assert all(len(p["sha256"]) == 64 for p in guest["packages"])
    assert any(w["filename"].startswith("pydantic_core-") and "aarch64" in w["filename"] for w in guest["wheels"])
    assert all(r["timed_out"] is False and r["guest_exit"] == 0 for r in meta["runs"])


def test_every_peer_ran_its_episode_in_both_guests(smoke: LabRun) -> None:
    """The whole-guest episode under lmkd-py, earlyoom and no daemon: each daemon became ready, the
    episode ended, and (lmkd-py, earlyoom) the designated victim died first. A daemon that cannot start
    in the guest (it once refused its records directory there) fails here, not in a long benchmark run."""
    assert smoke.rc == 0, smoke.stderr[-2000:]
    meta = json.loads((smoke.out / "lab.json").read_text())
    for run in meta["runs"]:
        peers = {p["mode"]: p for p in run["peers"]}
        assert set(peers) == {"lmkd-py", "earlyoom", "none"}, run["peers"]
        for mode, p in peers.items():
            assert "error" not in p, f"{run['label']} {mode}: {p.get('error')}"
            assert p["timed_out"] is False and p["time_to_first_kill_ms"] is not None, p
            if mode != "none":
                assert p["designated_victim_killed_first"] is True, p


def test_compare_table_names_both_kernels_and_says_tcg(smoke: LabRun) -> None:
    assert smoke.rc == 0, smoke.stderr[-2000:]
    compare = (smoke.out / "compare.txt").read_text()
    meta = json.loads((smoke.out / "lab.json").read_text())
    for k in meta["kernels"]:
        assert k["release"] in compare
    assert "kill_to_exit" in compare and "95% CI" in compare
    summary = (smoke.out / "summary.txt").read_text()
    assert "QEMU TCG emulation" in summary
    assert summary.count(f"{KILLS} kill records") == 2
    assert summary == smoke.stdout
    assert any(p.suffix == ".png" for p in (smoke.out / "plots").iterdir())


def test_guest_rebuilds_identically_from_the_cache_without_network(
    smoke: LabRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert smoke.rc == 0, smoke.stderr[-2000:]
    from lmkd_py.lab.args import default_cache
    from lmkd_py.lab.guest import GuestBuilder

    # Any download attempt would go to a closed port and fail; offline must not need one.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    builder = GuestBuilder(default_cache(), None, offline=True)
    first = builder.build(force=True, out=tmp_path / "a.cpio.gz")
    second = builder.build(force=True, out=tmp_path / "b.cpio.gz")
    assert first.sha256 == second.sha256
    assert (tmp_path / "a.cpio.gz").read_bytes() == (tmp_path / "b.cpio.gz").read_bytes()
    meta = json.loads((smoke.out / "lab.json").read_text())
    assert first.lock == {k: meta["guest_image"][k] for k in first.lock}, "the cache's lock changed"
    if first.sources_sha256 == meta["guest_image"]["lmkd_py_sources_sha256"]:
        assert first.sha256 == meta["guest_image"]["sha256"], "the rebuilt image differs from the one that booted"
    else:
        # lmkd-py's own files were edited while the smoke run booted (a developer's working tree):
        # the image must differ then, and only in them and in the manifest that hashes them.
        booted = default_cache() / "images" / meta["guest_image"]["file"]
        old, new = _members(booted), _members(tmp_path / "a.cpio.gz")
        changed = {p for p in old.keys() | new.keys() if old.get(p) != new.get(p)}
        assert changed and all(p.startswith(_OWN) or p == "etc/lmkd-lab/image.json" for p in changed), changed
    if shutil.which("cpio"):
        raw = gzip.decompress((tmp_path / "a.cpio.gz").read_bytes())
        listing = subprocess.run(["cpio", "-t", "--quiet"], input=raw, capture_output=True, check=True).stdout
        assert {"init", "usr/bin/python3.13", "usr/bin/busybox", "dev/console"} <= set(listing.decode().split())


def test_offline_with_an_empty_cache_says_what_is_missing(tmp_path: Path) -> None:
    proc = _lab(["--kernel", "A=deb:6.12", "--kernel", "B=deb:7", "--offline", "--build-only",
                 "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")], timeout_s=120)
    assert proc.returncode == 3, proc.stderr
    assert "no arm64 cloud kernel 6.12.x in the cache" in proc.stderr


def test_own_kernel_file_is_unpacked_and_hashed(smoke: LabRun, tmp_path: Path) -> None:
    """An engineer's kernel given as a path (here a gzipped copy of the 7.x Image from the cache)."""
    assert smoke.rc == 0, smoke.stderr[-2000:]
    meta = json.loads((smoke.out / "lab.json").read_text())
    from lmkd_py.lab.args import default_cache

    release = next(k["release"] for k in meta["kernels"] if k["label"] == "B")
    image = default_cache() / "kernels" / release / "Image"
    own = tmp_path / "Image.gz"
    own.write_bytes(gzip.compress(image.read_bytes(), compresslevel=1))
    out = tmp_path / "out"
    proc = _lab(["--kernel", "A=deb:6.12", "--kernel", f"mine={own}", "--offline", "--build-only",
                 "--out", str(out)], timeout_s=300)
    assert proc.returncode == 0, proc.stderr
    mine = next(k for k in json.loads((out / "lab.json").read_text())["kernels"] if k["label"] == "mine")
    assert mine["source_file"] == str(own.resolve()) and mine["release"] is None
    assert mine["image_sha256"] == next(k["image_sha256"] for k in meta["kernels"] if k["label"] == "B")
    assert any("gunzipped" in n for n in mine["notes"])
    unpacked = out / "Image-mine"
    with unpacked.open("rb") as fh:
        assert image_kind(fh.read(64)) == "image"
    assert os.path.getsize(unpacked) == os.path.getsize(image)
