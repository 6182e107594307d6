"""The arm64 kernel A/B lab: Debian (or the engineer's own) kernels booted under QEMU TCG from an
initramfs built on the host, the same victims killed by lmkd-py's Killer on each, records brought
back over the serial console and compared by kernel.

Modules: ``apt`` (private apt configuration), ``kernels`` (SPEC resolution and Image extraction),
``image`` (deterministic cpio, ELF NEEDED), ``guest`` (the initramfs), ``run`` (one QEMU boot),
``inguest`` and ``peers`` (what runs inside the guest), ``summary`` (printed text), ``cli``.
Nothing here is imported by the daemon.
"""
