"""journald's end of the native protocol, for tests: a datagram socket bound in a test's directory, and a
decoder written from the protocol document (not from lmkd_py.journal), so that the two can disagree."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

RECV_TIMEOUT_S = 10.0


def decode(data: bytes) -> list[tuple[str, bytes]]:
    """Fields of one entry in order: ``NAME=value\\n``, or ``NAME\\n`` + u64 LE length + value + ``\\n``.
    Raises AssertionError on anything journald would not parse the same way."""
    fields: list[tuple[str, bytes]] = []
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            i = nl + 1
        else:
            name = line
            size = int.from_bytes(data[nl + 1 : nl + 9], "little")
            start = nl + 9
            value = data[start : start + size]
            assert len(value) == size, f"binary field {name!r} cut short"
            assert data[start + size : start + size + 1] == b"\n", f"binary field {name!r} not closed by a newline"
            i = start + size + 1
        fields.append((name.decode("ascii"), value))
    return fields


class Entry:
    """One decoded entry; ``entry["NAME"]`` is the only value of a field (asserting there is one)."""

    def __init__(self, fields: list[tuple[str, bytes]], via_memfd: bool) -> None:
        self.fields = fields
        self.via_memfd = via_memfd

    def all(self, name: str) -> list[bytes]:
        return [v for k, v in self.fields if k == name]

    def __getitem__(self, name: str) -> str:
        values = self.all(name)
        assert len(values) == 1, f"{name}: {values!r} in {self.fields!r}"
        return values[0].decode()

    def __contains__(self, name: str) -> bool:
        return bool(self.all(name))


class JournalReceiver:
    """A bound ``AF_UNIX`` datagram socket standing in for /run/systemd/journal/socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        self.sock.settimeout(RECV_TIMEOUT_S)

    def recv(self, timeout_s: float = RECV_TIMEOUT_S) -> Entry:
        """The next entry; one sent as a memfd is read from it (and must be sealed, as journald asks)."""
        self.sock.settimeout(timeout_s)
        data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, 4)
        if not fds:
            return Entry(decode(data), via_memfd=False)
        assert data == b"" and len(fds) == 1, (data[:100], fds)
        fd = fds[0]
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK, f"memfd not sealed: {seals:#x}"
            size = os.fstat(fd).st_size
            return Entry(decode(os.pread(fd, size, 0)), via_memfd=True)
        finally:
            os.close(fd)

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(RECV_TIMEOUT_S)
        return True

    def close(self) -> None:
        self.sock.close()
