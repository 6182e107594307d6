"""A small sd_notify(3) client: readiness, status, reload and watchdog messages to the service manager.

The protocol (systemd's ``sd_notify(3)`` and ``systemd.service(5)``): the manager passes the address of
an ``AF_UNIX`` datagram socket in ``$NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for an abstract
socket), and the service sends newline-separated ``KEY=VALUE`` assignments to it, one datagram per
message. The manager learns the sender from the kernel's ``SCM_CREDENTIALS``, so with ``NotifyAccess=main``
only the daemon's own process (any of its threads) is listened to.

``$WATCHDOG_USEC`` (with ``$WATCHDOG_PID``, when the manager sets it) asks for ``WATCHDOG=1`` at least
once per that many microseconds; sd_watchdog_enabled(3) recommends pinging at half of it, which is what
:attr:`SdNotifier.watchdog_interval_ns` gives.

A notification must never take the daemon down: every send failure is counted, logged at warning the
first time (with its reason) and at debug afterwards, and swallowed. Without ``$NOTIFY_SOCKET`` every
method is a no-op, so the same code runs under systemd, in a terminal and in tests.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Protocol

import structlog

# A datagram to the manager's socket is tiny; if the manager does not drain its queue for this long
# something is badly wrong with PID 1, and blocking a memory killer longer than this is worse than
# losing one notification.
DEFAULT_SEND_TIMEOUT_NS = 250_000_000

# Linux sockaddr_un.sun_path is 108 bytes, including the terminating NUL of a filesystem path.
_SUN_PATH_MAX = 108


def parse_notify_socket(value: str) -> bytes | None:
    """Turn ``$NOTIFY_SOCKET`` into an ``AF_UNIX`` address for ``socket.sendto``.

    Returns the path as bytes, or ``b"\\0name"`` for ``@name`` (Linux abstract namespace); ``None`` when
    the value is empty, relative, a non-``AF_UNIX`` form (e.g. systemd 254's ``vsock:``), or too long for
    ``sockaddr_un``. Pure: no I/O.
    """
    if value.startswith("@"):
        name = value[1:].encode()
        if not name or len(name) + 1 > _SUN_PATH_MAX:
            return None
        return b"\0" + name
    if value.startswith("/"):
        path = value.encode()
        if len(path) + 1 > _SUN_PATH_MAX:
            return None
        return path
    return None


def parse_watchdog(environ: Mapping[str, str], pid: int) -> int | None:
    """Return the watchdog ping interval in ns (half of ``$WATCHDOG_USEC``), or ``None`` if none is asked.

    ``None`` when ``$WATCHDOG_USEC`` is unset, not a positive integer, or ``$WATCHDOG_PID`` names another
    process (the variables were inherited from a parent that is the watched one). Pure: no I/O.
    """
    usec_text = environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text:
        try:
            if int(pid_text) != pid:
                return None
        except ValueError:
            return None
    return usec * 1000 // 2


def _clean_value(text: str) -> str:
    # A newline would end the assignment and let the rest be read as another KEY=VALUE (e.g. a status
    # built from a process name could say "READY=1"): flatten it.
    return text.replace("\r", " ").replace("\n", " ")


class Notifier(Protocol):
    """What the daemon and observe loops tell their service manager (``SdNotifier`` is the real one)."""

    watchdog_interval_ns: int | None

    def ready(self, status: str | None = None) -> None: ...

    def status(self, text: str) -> None: ...

    def watchdog(self) -> None: ...

    def reloading(self) -> None: ...

    def stopping(self) -> None: ...


class SdNotifier:
    """Sends sd_notify messages; see the module docstring for the protocol.

    Build it with :meth:`from_env` in the daemon; the constructor is for tests and for callers that
    already hold the address. ``enabled`` is false when there is no socket to talk to, and then every
    method returns at once. Not thread-safe by design: the daemon loop is its only user.
    """

    def __init__(
        self,
        address: bytes | None,
        watchdog_interval_ns: int | None = None,
        send_timeout_ns: int = DEFAULT_SEND_TIMEOUT_NS,
    ) -> None:
        """``address`` as returned by :func:`parse_notify_socket`; ``None`` disables the notifier.

        ``watchdog_interval_ns`` is the recommended ping period (``None``: no watchdog asked);
        ``send_timeout_ns`` bounds how long one send may block when the manager's queue is full.
        """
        self._address = address
        self.enabled: bool = address is not None
        self.watchdog_interval_ns: int | None = watchdog_interval_ns if self.enabled else None
        self._send_timeout_ns = send_timeout_ns
        self._sock: socket.socket | None = None
        self._failures = 0
        self._sent = 0
        self._log = structlog.get_logger()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> SdNotifier:
        """Build a notifier from ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``.

        An unset ``$NOTIFY_SOCKET`` gives a disabled notifier silently (not run by systemd); a value this
        client cannot use gives a disabled one with a warning. A malformed ``$WATCHDOG_USEC`` is logged and
        treated as no watchdog. Never raises. The environment is not modified.
        """
        log = structlog.get_logger()
        raw = environ.get("NOTIFY_SOCKET")
        if not raw:
            return cls(None)
        address = parse_notify_socket(raw)
        if address is None:
            log.warning("sdnotify.unsupported_address", notify_socket=raw)
            return cls(None)
        interval_ns = parse_watchdog(environ, os.getpid())
        usec_text = environ.get("WATCHDOG_USEC")
        if interval_ns is None and usec_text and not _is_positive_int(usec_text):
            log.warning("sdnotify.bad_watchdog_usec", watchdog_usec=usec_text)
        return cls(address, interval_ns)

    @property
    def failures(self) -> int:
        """How many sends have failed since construction."""
        return self._failures

    @property
    def sent(self) -> int:
        """How many datagrams were handed to the kernel since construction."""
        return self._sent

    def send(self, fields: Mapping[str, str]) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines, in the mapping's order.

        Returns True if the kernel accepted it, False if disabled or the send failed (counted and logged,
        never raised). Values have newlines flattened to spaces.
        """
        if self._address is None or not fields:
            return False
        payload = "\n".join(f"{key}={_clean_value(value)}" for key, value in fields.items()).encode()
        try:
            sock = self._socket()
            sock.sendto(payload, self._address)
        except OSError as exc:
            self._on_failure(exc, fields)
            return False
        self._sent += 1
        return True

    def ready(self, status: str | None = None) -> None:
        """Tell the manager start-up (or a reload) is finished: ``READY=1``, with ``STATUS=`` if given."""
        fields = {"READY": "1"}
        if status is not None:
            fields["STATUS"] = status
        self.send(fields)

    def status(self, text: str) -> None:
        """Set the free-form status line shown by ``systemctl status`` (``STATUS=``)."""
        self.send({"STATUS": text})

    def watchdog(self) -> None:
        """Ping the watchdog (``WATCHDOG=1``). Call every :attr:`watchdog_interval_ns` from the main loop."""
        self.send({"WATCHDOG": "1"})

    def reloading(self) -> None:
        """Announce a configuration reload: ``RELOADING=1`` and ``MONOTONIC_USEC=`` (now, CLOCK_MONOTONIC µs).

        systemd 253's ``Type=notify-reload`` requires the timestamp; older managers ignore it. Call
        :meth:`ready` when the reload is done.
        """
        self.send({"RELOADING": "1", "MONOTONIC_USEC": str(time.monotonic_ns() // 1000)})

    def stopping(self) -> None:
        """Announce an orderly shutdown (``STOPPING=1``)."""
        self.send({"STOPPING": "1"})

    def close(self) -> None:
        """Close the socket; a later send reopens it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        # One socket reused for every ping: the watchdog fires every few seconds for the daemon's life.
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.settimeout(self._send_timeout_ns / 1e9)
            self._sock = sock
        return self._sock

    def _on_failure(self, exc: OSError, fields: Mapping[str, str]) -> None:
        self._failures += 1
        # A broken socket may be the cause; start from a fresh one next time.
        self.close()
        reason = exc.strerror or type(exc).__name__
        keys = ",".join(fields)
        if self._failures == 1:
            self._log.warning("sdnotify.send_failed", reason=reason, errno=exc.errno, fields=keys)
        else:
            self._log.debug(
                "sdnotify.send_failed", reason=reason, errno=exc.errno, fields=keys, failures=self._failures
            )


def _is_positive_int(text: str) -> bool:
    try:
        return int(text) > 0
    except ValueError:
        return False
