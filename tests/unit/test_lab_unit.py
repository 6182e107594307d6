"""The lab's pure parts: kernel SPECs and release picking, Image formats, the deterministic cpio,
the ELF NEEDED reader, apt output parsers, the private apt configuration, the guest's marker lines,
the console collector and the printed tables. No QEMU and no network here (tests/system/test_lab.py
boots real kernels)."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest

from lmkd_py.lab import apt as labapt
from lmkd_py.lab.guest import GuestBuildError, _merge_usr, job_archive, runtime_requirements, wheel_entries
from lmkd_py.lab.image import (
    Entry,
    elf_dynamic,
    gzip_bytes,
    read_newc,
    unresolved_libraries,
    with_parents,
    write_newc,
)
from lmkd_py.lab.kernels import (
    Kernel,
    KernelError,
    image_kind,
    matching_releases,
    parse_kernel_arg,
    release_key,
    to_raw_image,
)
from lmkd_py.lab.peers import full_stall_us
from lmkd_py.lab.protocol import MARKER, emit_line, parse_marker
from lmkd_py.lab.run import GuestRun, _Collector, qemu_argv
from lmkd_py.lab.summary import TCG_NOTE, peers_rows, peers_table
from lmkd_py.records import KillRecord, Mrelease, MreleaseStatus, Outcome, Steps, Victim, record_json

# --- kernel SPECs -------------------------------------------------------------------------------


def test_kernel_spec_forms() -> None:
    s = parse_kernel_arg("A=deb:6.12")
    assert (s.label, s.kind, s.value) == ("A", "deb-series", "6.12")
    assert parse_kernel_arg("B=deb:7").kind == "deb-series"
    exact = parse_kernel_arg("new=deb:7.3.4+deb13-cloud-arm64")
    assert (exact.kind, exact.value) == ("deb-release", "7.3.4+deb13-cloud-arm64")
    path = parse_kernel_arg("mine=/tmp/x/Image=odd")
    assert (path.label, path.kind, path.value) == ("mine", "path", "/tmp/x/Image=odd")


@pytest.mark.parametrize("bad", ["A", "=deb:7", "A=", "A B=deb:7", "A=deb:", "A=deb:seven", "A=deb:7.3.4+deb13"])
def test_kernel_spec_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="--kernel"):
        parse_kernel_arg(bad)


NAMES = [
    "linux-image-6.1.140+deb12-cloud-arm64",
    "linux-image-6.12.107+deb13-cloud-arm64",
    "linux-image-6.12.117+deb13-cloud-arm64",
    "linux-image-6.12.117+deb13-cloud-arm64-dbg",  # not a kernel image package
    "linux-image-6.12.117+deb13-cloud-arm64-unsigned",
    "linux-image-6.18.9+deb13-cloud-arm64",
    "linux-binary-7.2.13+deb14-cloud-arm64",
    "linux-binary-7.3.4+deb13-cloud-arm64",
    "linux-image-7.3.4+deb13-cloud-arm64",
    "linux-binary-7.10.1+deb13-cloud-arm64",
    "linux-image-7.3.4+deb13-arm64",  # not the cloud flavour
    "linux-image-6.12.117+deb13-cloud-amd64",
]


def test_newest_release_of_a_series() -> None:
    assert matching_releases(NAMES, "6.12") == ["6.12.117+deb13-cloud-arm64", "6.12.107+deb13-cloud-arm64"]
    # numeric, not textual: 7.10 is newer than 7.3, and 6.1 does not match 6.12
    assert matching_releases(NAMES, "7")[0] == "7.10.1+deb13-cloud-arm64"
    assert matching_releases(NAMES, "6.1") == ["6.1.140+deb12-cloud-arm64"]
    assert matching_releases(NAMES, "5") == []


def test_release_key_orders_debian_revision() -> None:
    assert release_key("7.2.13+deb14-cloud-arm64") > release_key("7.2.13+deb13-cloud-arm64")
    with pytest.raises(ValueError):
        release_key("7.2.13-cloud-amd64")


# --- kernel images ------------------------------------------------------------------------------


def _fake_image(size: int = 4096) -> bytes:
    head = bytearray(size)
    head[0:2] = b"MZ"  # the EFI stub's PE signature, as Debian's signed images have
    head[0x38:0x3C] = b"ARMd"
    head[100:110] = b"kernelbody"
    return bytes(head)


def _zboot(payload: bytes, comp: bytes = b"gzip") -> bytes:
    header = bytearray(64)
    header[0:2] = b"MZ"
    header[4:8] = b"zimg"
    struct.pack_into("<II", header, 8, 64, len(payload))
    header[24 : 24 + len(comp)] = comp
    return bytes(header) + payload


def test_image_kinds(tmp_path: Path) -> None:
    img = _fake_image()
    assert image_kind(img[:64]) == "image"
    assert image_kind(gzip.compress(img)[:64]) == "gzip"
    assert image_kind(_zboot(gzip.compress(img))[:64]) == "zboot"
    assert image_kind(b"\x7fELF" + bytes(60)) == "unknown"
    for name, data in (("raw", img), ("gz", gzip.compress(img)), ("zb", _zboot(gzip.compress(img)))):
        src = tmp_path / name
        src.write_bytes(data)
        to_raw_image(src, tmp_path / f"{name}.Image")
        assert (tmp_path / f"{name}.Image").read_bytes() == img


def test_image_refuses_what_it_cannot_boot(tmp_path: Path) -> None:
    (tmp_path / "elf").write_bytes(b"\x7fELF" + bytes(200))
    with pytest.raises(KernelError, match="not an arm64 kernel Image"):
        to_raw_image(tmp_path / "elf", tmp_path / "out")
    (tmp_path / "zst").write_bytes(_zboot(b"x" * 100, b"zstd22"))
    with pytest.raises(KernelError, match="zstd"):
        to_raw_image(tmp_path / "zst", tmp_path / "out")
    (tmp_path / "gz").write_bytes(gzip.compress(b"not a kernel" * 20))
    with pytest.raises(KernelError):
        to_raw_image(tmp_path / "gz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- cpio ---------------------------------------------------------------------------------------


def _entries() -> list[Entry]:
    return with_parents([
        Entry("usr/bin/tool", stat.S_IFREG | 0o755, data=b"#!/bin/sh\necho hi\n"),
        Entry("bin", stat.S_IFLNK | 0o777, target="usr/bin"),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("etc/empty", stat.S_IFREG | 0o644, data=b""),
        Entry("etc/odd", stat.S_IFREG | 0o644, data=b"abc"),  # a length that needs padding
    ])


def test_newc_round_trip_and_parents() -> None:
    buf = io.BytesIO()
    write_newc(_entries(), buf)
    back = {e.path: e for e in read_newc(buf.getvalue())}
    assert set(back) == {"bin", "dev", "dev/console", "etc", "etc/empty", "etc/odd", "usr", "usr/bin",
                         "usr/bin/tool"}
    assert back["usr/bin/tool"].data == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(back["usr/bin/tool"].mode) == 0o755
    assert back["bin"].target == "usr/bin"
    assert back["dev/console"].rdev == (5, 1) and stat.S_ISCHR(back["dev/console"].mode)
    assert stat.S_ISDIR(back["usr"].mode)
    assert len(buf.getvalue()) % 4 == 0


def test_newc_matches_the_cpio_tool(tmp_path: Path) -> None:
    """The archive is what GNU cpio reads: names, contents and symlinks."""
    if shutil.which("cpio") is None:
        pytest.skip("cpio (GNU) is not installed: the cross-check needs it")
    buf = io.BytesIO()
    write_newc(_entries(), buf)
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=buf.getvalue(), capture_output=True, check=True)
    assert sorted(listing.stdout.decode().split()) == sorted(e.path for e in _entries())


def test_archive_and_gzip_are_deterministic() -> None:
    a, b = io.BytesIO(), io.BytesIO()
    write_newc(_entries(), a)
    write_newc(_entries(), b)
    assert a.getvalue() == b.getvalue()
    assert gzip_bytes(a.getvalue()) == gzip_bytes(b.getvalue())
    gz = gzip_bytes(a.getvalue())
    assert gz[4:8] == b"\0\0\0\0"  # mtime 0 in the gzip header
    assert gzip.decompress(gz) == a.getvalue()


def test_job_archive_is_a_padded_newc_with_the_job() -> None:
    data = job_archive({"label": "A", "kills": 3})
    assert len(data) % 512 == 0
    entries = {e.path: e for e in read_newc(data.rstrip(b"\0") + b"\0" * 4)}
    assert json.loads(entries["lab/job.json"].data or b"") == {"kills": 3, "label": "A"}


# --- ELF ----------------------------------------------------------------------------------------


def _elf(needed: list[str], soname: str | None = None) -> bytes:
    """A minimal ELF64 LE file with a .dynstr and a .dynamic section."""
    strtab = b"\0"
    offsets = []
    for name in [*needed, *([soname] if soname else [])]:
        offsets.append(len(strtab))
        strtab += name.encode() + b"\0"
    dyn = b"".join(struct.pack("<qQ", 1, off) for off in offsets[: len(needed)])
    if soname:
        dyn += struct.pack("<qQ", 14, offsets[-1])
    dyn += struct.pack("<qQ", 0, 0)
    str_off = 64
    dyn_off = str_off + len(strtab)
    sh_off = dyn_off + len(dyn)
    header = bytearray(64)
    header[0:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, sh_off)
    struct.pack_into("<HH", header, 0x3A, 64, 3)
    sections = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    sections += struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, str_off, len(strtab), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 0, 6, 0, 0, dyn_off, len(dyn), 1, 0, 8, 16)
    return bytes(header) + strtab + dyn + sections


def test_elf_needed_from_a_synthetic_file() -> None:
    assert elf_dynamic(_elf(["libc.so.6", "libz.so.1"], "libfoo.so.1")) == (["libc.so.6", "libz.so.1"], "libfoo.so.1")
    assert elf_dynamic(b"#!/bin/sh\n") is None
    assert elf_dynamic(b"\x7fELF\x01\x01" + bytes(100)) is None  # 32-bit: not ours


def test_elf_needed_matches_readelf_on_a_real_binary() -> None:
    binary = Path(os.path.realpath("/usr/bin/python3"))
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed: the cross-check needs it")
    out = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
    expected = [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    dyn = elf_dynamic(binary.read_bytes())
    assert dyn is not None and dyn[0] == expected and expected


def test_unresolved_libraries() -> None:
    files = {
        "usr/bin/python3.13": _elf(["libc.so.6", "libz.so.1", "libexpat.so.1"]),
        "usr/lib/aarch64-linux-gnu/libc.so.6": _elf([], "libc.so.6"),
        "usr/lib/aarch64-linux-gnu/libz.so.1": _elf(["libc.so.6"], "libz.so.1"),
        "usr/share/doc/readme": b"text",
    }
    assert unresolved_libraries(files, ["usr/lib/aarch64-linux-gnu"]) == {"usr/bin/python3.13": ["libexpat.so.1"]}


# --- apt ----------------------------------------------------------------------------------------


def test_mirror_from_system_sources() -> None:
    one_line = ["# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n"]
    assert labapt.mirror_from_sources(one_line, []) == "http://mirror.example/debian"
    deb822 = ["Types: deb\nURIs: http://sec.example/debian-security\nSuites: x\n\n"
              "Types: deb deb-src\nURIs: https://m.example/debian/\nSuites: bookworm\n"]
    assert labapt.mirror_from_sources([], deb822) == "https://m.example/debian"
    assert labapt.mirror_from_sources(["deb http://ports.example/debian-ports sid main\n"], []) is None
    disabled = ["Types: deb\nEnabled: no\nURIs: http://a.example/debian\n"]
    assert labapt.mirror_from_sources([], disabled) is None


def test_show_and_simulated_install_parsers() -> None:
    show = ("Package: libc6\nVersion: 2.41-12\nArchitecture: arm64\nDescription: GNU C\n more text\n"
            "Filename: pool/main/g/glibc/libc6_2.41-12_arm64.deb\nSize: 100\nSHA256: ab12\n\n"
            "Package: virtual-only\n\n")
    stanzas = labapt.parse_stanzas(show)
    assert stanzas[0]["Description"] == "GNU C\nmore text"
    deb = labapt.deb_from_stanza(stanzas[0])
    assert (deb.name, deb.version, deb.filename, deb.size, deb.sha256) == (
        "libc6", "2.41-12", "libc6_2.41-12_arm64.deb", 100, "ab12")
    assert labapt.DebFile.from_dict(deb.as_dict()) == deb
    with pytest.raises(KeyError):
        labapt.deb_from_stanza(stanzas[1])
    sim = ("Inst gcc-14-base (14.2.0-19 Debian:13.8/stable [arm64])\n"
           "Inst libc6 [2.36-9] (2.41-12+deb13u5 Debian:13.8/stable [arm64])\n"
           "Conf libc6 (2.41-12+deb13u5 Debian:13.8/stable [arm64])\n"
           "Inst linux-binary-7.3.4+deb13-cloud-arm64:arm64 (7.3.4-1~bpo13+1 Debian Backports:stable-backports"
           " [arm64])\n")
    assert labapt.parse_simulated_install(sim) == [
        ("gcc-14-base", "14.2.0-19"), ("libc6", "2.41-12+deb13u5"),
        ("linux-binary-7.3.4+deb13-cloud-arm64", "7.3.4-1~bpo13+1")]


def test_policy_candidate_parser() -> None:
    text = ("linux-binary-7.3.4+deb13-cloud-arm64:\n  Installed: (none)\n  Candidate: 7.3.4-1~bpo13+1\n"
            "  Version table:\n     7.3.4-1~bpo13+1 100\n")
    assert labapt.parse_policy_candidate(text) == "7.3.4-1~bpo13+1"
    assert labapt.parse_policy_candidate("x:\n  Installed: (none)\n  Candidate: (none)\n") is None
    assert labapt.parse_policy_candidate("") is None


def test_private_apt_config_stays_in_its_root(tmp_path: Path) -> None:
    keyring = tmp_path / "keyring.gpg"
    keyring.write_bytes(b"k")
    root = tmp_path / "apt"
    papt = labapt.PrivateApt(root, "http://mirror.example/debian", keyring=keyring)
    papt.setup()
    conf = papt.conf.read_text()
    for key in ("Dir::Etc", "Dir::State", "Dir::State::status", "Dir::Cache", "Dir::Etc::Parts"):
        line = next(x for x in conf.splitlines() if x.startswith(f'{key} "'))
        assert f'"{root}' in line, line
    import re

    quoted_paths = re.findall(r'"(/[^"]*)"', conf)
    assert quoted_paths and all(p.startswith(str(root)) for p in quoted_paths), quoted_paths
    assert 'APT::Architectures { "arm64"; }' in conf
    sources = (root / "etc/sources.list").read_text().splitlines()
    assert [s.split()[-2] for s in sources] == ["trixie", "trixie-backports", "sid"]
    assert all(f"signed-by={keyring}" in s and "arch=arm64" in s for s in sources)
    with pytest.raises(labapt.AptError, match="keyring"):
        labapt.PrivateApt(root, "http://m/debian", keyring=tmp_path / "missing").setup()


def test_cached_deb_is_checked(tmp_path: Path) -> None:
    (tmp_path / "x.deb").write_bytes(b"payload")
    good = labapt.DebFile("x", "1", "arm64", "x.deb", labapt.sha256_file(tmp_path / "x.deb"), 7)
    assert labapt.verify_cached(good, tmp_path) == tmp_path / "x.deb"
    with pytest.raises(labapt.AptError, match="differs"):
        labapt.verify_cached(labapt.DebFile("x", "1", "arm64", "x.deb", "00", 7), tmp_path)
    with pytest.raises(labapt.AptError, match="not in the cache"):
        labapt.verify_cached(labapt.DebFile("y", "1", "arm64", "y.deb", "00", 7), tmp_path)


# --- guest build pieces -------------------------------------------------------------------------


def test_wheel_entries(tmp_path: Path) -> None:
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("pkg/__init__.py", "x = 1\n")
        zf.writestr("pkg-1.0.data/purelib/extra.py", "y = 2\n")
        zf.writestr("pkg-1.0.data/scripts/tool", "#!/bin/sh\n")
    paths = {e.path: e.data for e in wheel_entries(whl)}
    assert paths == {"usr/lib/python3/dist-packages/pkg/__init__.py": b"x = 1\n",
                     "usr/lib/python3/dist-packages/extra.py": b"y = 2\n"}
    bad = tmp_path / "bad-1.0-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../../etc/passwd", "x")
    with pytest.raises(GuestBuildError, match="escapes"):
        wheel_entries(bad)


def test_merge_usr(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib/ld-linux-aarch64.so.1").write_text("loader")
    (tmp_path / "usr/bin").mkdir(parents=True)
    _merge_usr(tmp_path)
    for d in ("bin", "sbin", "lib"):
        assert (tmp_path / d).is_symlink() and os.readlink(tmp_path / d) == f"usr/{d}"
    assert (tmp_path / "usr/lib/ld-linux-aarch64.so.1").read_text() == "loader"


def test_runtime_requirements_are_pinned() -> None:
    import tomllib

    pins = runtime_requirements()
    names = {p.split("==")[0].lower() for p in pins}
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    declared = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in pyproject["project"]["dependencies"]}
    assert declared and names == declared
    assert all("==" in p and ";" not in p for p in pins)


# --- guest lines and the host's collector ----------------------------------------------------------


def test_marker_lines() -> None:
    assert parse_marker("[    1.2] random: crng init done") is None
    assert parse_marker(f"{MARKER} done {{\"records\": 3}}") == ("done", {"records": 3})
    assert parse_marker(f"garbage{MARKER} boot {{}}") == ("boot", {})
    with pytest.raises(ValueError):
        parse_marker(f"{MARKER} record {{\"cut")
    with pytest.raises(ValueError):
        parse_marker(f"{MARKER} record [1]")


def test_emit_line_round_trip() -> None:
    r, w = os.pipe()
    try:
        emit_line("note", {"what": "é ünïcode", "n": 1}, fd=w)
        os.close(w)
        line = os.read(r, 65536).decode("ascii")
    finally:
        os.close(r)
    assert line.endswith("\n") and line.count("\n") == 1
    assert parse_marker(line) == ("note", {"what": "é ünïcode", "n": 1})


def _record(n: int) -> KillRecord:
    return KillRecord(
        record_id=f"r{n}", wall_time="2026-01-01T00:00:00+00:00", outcome=Outcome.KILLED,
        victim=Victim(pid=100 + n), steps=Steps(start_ns=1, end_ns=2),
        mrelease=Mrelease(status=MreleaseStatus.OK), kill_to_exit_ns=5_000_000,
    )


def _run(tmp_path: Path, label: str = "A") -> GuestRun:
    kernel = Kernel(label=label, spec="deb:6.12", image=tmp_path / "Image", image_sha256="0" * 64,
                    release="6.12.117+deb13-cloud-arm64")
    return GuestRun(label=label, kernel=kernel, records_path=tmp_path / f"records-{label}.jsonl",
                    console_path=tmp_path / f"console-{label}.log", qemu_argv=["qemu"])


def test_collector_names_a_record_it_could_not_store(tmp_path: Path) -> None:
    out = tmp_path / "shared"
    out.mkdir()
    os.chmod(out, 0o777)  # an output directory anyone may write: the records writer refuses it
    run = _run(out)
    c = _Collector(run)
    c.feed(f"{MARKER} record {record_json(_record(1))}\n".encode())
    c.close()
    assert run.records == 0 and not run.records_path.exists()
    assert len(run.problems) == 1 and run.problems[0].startswith("record not stored: ")
    assert f"directory {out} is writable by group and others (mode 0777)" in run.problems[0]


def test_collector_splits_lines_across_reads(tmp_path: Path) -> None:
    run = _run(tmp_path)
    c = _Collector(run)
    stream = (
        "[    0.000000] Booting Linux\r\n"
        f"{MARKER} hello {{\"kernel_release\": \"6.12.117+deb13-cloud-arm64\"}}\r\n"
        f"{MARKER} record {record_json(_record(1))}\r\n"
        f"{MARKER} record {{\"schema_version\": 1}}\r\n"
        f"{MARKER} record {{\"broken\r\n"
        f"{MARKER} record {record_json(_record(2))}\r\n"
        f"{MARKER} done {{\"records\": 2}}\r\n"
        f"{MARKER} exit {{\"status\": 0}}\r\n"
        "[   20.3] reboot: Power down"
    ).encode()
    for i in range(0, len(stream), 7):  # console reads end anywhere
        c.feed(stream[i : i + 7])
    c.close()
    assert run.records == 2 and run.outcomes == {"killed": 2}
    assert run.hello == {"kernel_release": "6.12.117+deb13-cloud-arm64"}
    assert run.done == {"records": 2} and run.guest_exit == 0
    assert len(run.problems) == 2  # the record that does not validate and the damaged line
    lines = run.records_path.read_text().splitlines()
    assert [json.loads(x)["record_id"] for x in lines] == ["r1", "r2"]
    assert run.console_path.read_bytes() == stream
    run.wall_ns = 1
    assert run.ok


def test_qemu_argv_is_tcg_virt() -> None:
    argv = qemu_argv(Path("/k/Image"), Path("/i.cpio"), 1024)
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-aarch64"
    for part in ("-M virt", "-accel tcg", "-smp 2", "-m 1024", "-kernel /k/Image", "-initrd /i.cpio", "psi=1",
                 "-no-reboot"):
        assert part in joined
    assert argv[argv.index("-cpu") + 1].split(",")[0] == "max"
    assert "kvm" not in joined


# --- job, peers, summary ------------------------------------------------------------------------


def test_make_job() -> None:
    from lmkd_py.lab.cli import build_parser, make_job

    args = build_parser().parse_args(["--kernel", "A=deb:6.12", "--kills", "4", "--vmas", "4096", "--threads", "8",
                                      "--size-mib", "256"])
    job = make_job("A", args)
    assert job["kills"] == 4 and job["label"] == "A" and job["peers"] is False
    assert job["victims"] == [{"size_mib": 256, "vmas": 4096, "kind": "anon", "threads": 8, "touch": "all",
                               "adj": None}]
    scen = make_job("B", argparse.Namespace(**{**vars(args), "scenario": "many-vmas", "seed": 3}))
    assert len(scen["victims"]) == 2 and all(v["vmas"] >= 8000 for v in scen["victims"])
    with pytest.raises(KeyError):
        make_job("B", argparse.Namespace(**{**vars(args), "scenario": "nope"}))


def test_make_job_carries_a_shape_to_the_guest(tmp_path: Path) -> None:
    """--shape flows into the guest's job as the checked shape object; the in-guest program rebuilds the
    same Shape from it; a shape the guest cannot hold is refused on the host, before any boot."""
    from lmkd_py.lab.cli import build_parser, make_job
    from lmkd_py.shape import Shape, ShapeProvenance, ShapeVma, dumps, shape_from_dict

    shape = Shape(provenance=ShapeProvenance(comm="node", kernel="6.18", arch="x86_64", page_size=4096),
                  threads=7, vmas=(ShapeVma("anon_private", "rw-", 65536, rss_kib=32768, dirty_kib=32768),
                                   ShapeVma("file_private", "r-x", 1024, rss_kib=512, file=0)))
    path = tmp_path / "s.json"
    path.write_text(dumps(shape))
    args = build_parser().parse_args(["--kernel", "A=deb:6.12", "--kills", "3", "--shape", str(path),
                                      "--scale", "0.5"])
    job = make_job("A", args)
    assert job["victims"] == [] and job["shape"]["scale"] == 0.5
    carried = json.loads(json.dumps(job))["shape"]["shape"]  # as the guest reads job.json
    assert shape_from_dict(carried).vmas == shape.vmas
    with pytest.raises(ValueError, match="MiB available"):
        make_job("A", argparse.Namespace(**{**vars(args), "scale": 40.0}))
    with pytest.raises(ValueError, match="exclude"):
        make_job("A", argparse.Namespace(**{**vars(args), "scenario": "app-like"}))
    with pytest.raises(ValueError, match="vmas"):
        path.write_text(dumps(shape).replace('"rss_kib":32768', '"rss_kib":99999999'))
        make_job("A", args)
    with pytest.raises(ValueError, match="No such file"):
        make_job("A", argparse.Namespace(**{**vars(args), "shape": str(tmp_path / "nope.json")}))


def test_full_stall_parser() -> None:
    text = "some avg10=0.00 avg60=0.00 avg300=0.00 total=1234\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=567\n"
    assert full_stall_us(text) == 567
    assert full_stall_us("some avg10=0.00 total=1\n") is None


def test_peers_table(tmp_path: Path) -> None:
    run = _run(tmp_path)
    run.hello = {"kernel_release": "6.12.117+deb13-cloud-arm64"}
    base = {"kernel_oom_kills": 0, "full_stall_ms": 10.0, "time_to_first_kill_ms": 2000.0,
            "time_to_recover_ms": 2500.0, "designated_victim_killed_first": True}
    run.peers = [
        {"mode": "earlyoom", "round": 0, **base},
        {"mode": "earlyoom", "round": 1, **base, "full_stall_ms": 30.0, "designated_victim_killed_first": False},
        {"mode": "none", "round": 0, **base, "kernel_oom_kills": 1, "time_to_recover_ms": None},
        {"mode": "lmkd-py", "round": 0, "error": "RuntimeError: lmkd-py did not become ready"},
    ]
    rows = {r[0]: r for r in peers_rows(run.peers)}
    assert rows["earlyoom"][1:] == ["2/2", "0", "20 [10-30]", "2000 [2000-2000]", "2500 [2500-2500] (2 recovered)",
                                    "1/2"]
    assert rows["none"][2] == "1" and rows["none"][5] == "- (0 recovered)"
    assert rows["lmkd-py"][1] == "0/1"
    text = peers_table([run])
    assert "a range, not a confidence interval" in text and "TCG" in text
    assert "error in lmkd-py round 0" in text
    assert "TCG" in TCG_NOTE and "no KVM" in TCG_NOTE


# --- caches -------------------------------------------------------------------------------------


def test_offline_kernel_store_picks_the_newest_cached(tmp_path: Path) -> None:
    from lmkd_py.lab.kernels import KernelStore

    deb = labapt.DebFile("linux-image-x", "1", "arm64", "x.deb", "0" * 64, 1)
    for release in ("6.12.107+deb13-cloud-arm64", "6.12.117+deb13-cloud-arm64", "7.3.4+deb13-cloud-arm64"):
        d = tmp_path / "kernels" / release
        d.mkdir(parents=True)
        (d / "Image").write_bytes(_fake_image() + release.encode())
        info = {"release": release, "package": deb.as_dict(), "image_sha256": labapt.sha256_file(d / "Image")}
        (d / "kernel.json").write_text(json.dumps(info))
    store = KernelStore(tmp_path, None, offline=True)
    k = store.resolve(parse_kernel_arg("A=deb:6.12"), tmp_path)
    assert (k.label, k.release, k.spec) == ("A", "6.12.117+deb13-cloud-arm64", "deb:6.12")
    assert store.resolve(parse_kernel_arg("B=deb:7"), tmp_path).release == "7.3.4+deb13-cloud-arm64"
    with pytest.raises(KernelError, match=r"no arm64 cloud kernel 6\.1\.x"):
        store.resolve(parse_kernel_arg("C=deb:6.1"), tmp_path)
    # a cached Image that changed since it was recorded is refused, not booted
    (tmp_path / "kernels/7.3.4+deb13-cloud-arm64/Image").write_bytes(b"tampered")
    with pytest.raises(KernelError, match="sha256"):
        store.resolve(parse_kernel_arg("B=deb:7"), tmp_path)


def test_image_cache_is_pruned(tmp_path: Path) -> None:
    from lmkd_py.lab.guest import _prune

    for i in range(6):
        (tmp_path / f"img{i}.cpio.gz").write_bytes(b"x")
        meta = tmp_path / f"key{i}.json"
        meta.write_text(json.dumps({"file": f"img{i}.cpio.gz"}))
        os.utime(meta, (1000 + i, 1000 + i))
    _prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img4.cpio.gz", "img5.cpio.gz", "key4.json", "key5.json"]


def test_split_kills_between_boots() -> None:
    from lmkd_py.lab.cli import split_kills

    assert split_kills(30, 1) == [30]
    assert split_kills(31, 3) == [11, 10, 10]
    assert sum(split_kills(7, 7)) == 7
    for kills, boots in ((0, 1), (3, 0), (3, 4)):
        with pytest.raises(ValueError):
            split_kills(kills, boots)


def test_header_adds_up_the_boots_of_each_kernel(tmp_path: Path) -> None:
    from lmkd_py.lab.guest import GuestImage
    from lmkd_py.lab.summary import header_lines

    runs = []
    for boot in range(2):
        for label in ("A", "B"):
            r = _run(tmp_path, label)
            r.boot, r.records, r.outcomes, r.wall_ns = boot, 3, {"killed": 3}, 20 * 10**9
            r.hello = {"kernel_release": f"rel-{label}", "tracer": "TracefsTracer"}
            r.done, r.guest_exit = {"records": 3}, 0
            r.host_load_start, r.host_load_end = 0.5 + boot, 1.25 + boot
            runs.append(r)
    runs[3].outcomes = {"killed": 2, "exit_timeout": 1}
    runs[3].problems = ["the guest stopped before it reported 'done'"]
    runs[3].done = None
    guest = GuestImage(tmp_path / "initramfs.cpio.gz", "f" * 64, {"packages": [{}] * 29, "wheels": [{}] * 8}, {},
                       "0" * 64)
    text = "\n".join(header_lines(runs, [runs[0].kernel, runs[1].kernel], guest, 100.0))
    assert TCG_NOTE in text
    assert "6 kill records (6 killed) in 2 boots" in text
    assert "6 kill records (1 exit_timeout, 5 killed) in 2 boots" in text and "INCOMPLETE" in text
    assert "problem: the guest stopped" in text and "29 Debian packages, 8 wheels" in text
    assert "host 1-min load average during its boots: 0.50-2.25" in text
    assert "booted once, one after the other" not in text
    single = "\n".join(header_lines(runs[:2], [runs[0].kernel, runs[1].kernel], guest, 50.0))
    assert "booted once, one after the other" in single


def test_daemon_events_are_timed_from_the_growers_start_and_trimmed() -> None:
    from datetime import datetime

    from lmkd_py.lab.peers import daemon_events

    t0 = datetime.fromisoformat("2026-12-03T07:50:54.000000Z").timestamp()
    log = "\n".join([
        '{"event": "daemon.ready", "refresh_ms": 212.5, "candidates": 9, "timestamp": "2026-12-03T07:50:53.900000Z"}',
        '{"event": "records.opened", "timestamp": "2026-12-03T07:50:53.950000Z"}',
        "not json",
        '{"event": "psi.event", "kill_reason": "mem_floor", "why": "free 1 KiB < 2 KiB (falling 300 MiB/s)",'
        ' "some_avg10": 0.0, "timestamp": "2026-12-03T07:50:56.250000Z"}',
        '{"event": "kill.sent", "pid": 42, "comm": "victim", "rss_kib": 1, "timestamp": "2026-12-03T07:50:56.2625Z"}',
        '{"event": "kill.sent", "timestamp": "yesterday"}',
        '["kill.sent"]',
    ])
    assert daemon_events(log, t0) == [
        {"at_ms": -100.0, "event": "daemon.ready", "refresh_ms": 212.5},
        {"at_ms": 2250.0, "event": "psi.event", "kill_reason": "mem_floor",
         "why": "free 1 KiB < 2 KiB (falling 300 MiB/s)"},
        {"at_ms": 2262.5, "event": "kill.sent", "pid": 42, "comm": "victim"},
    ]
    assert len(daemon_events(log, t0, limit=2)) == 2
