"""A small seccomp filter for the sandbox: the system calls that would allocate memory outside every limit.

Memory a process maps counts against its address-space limit, and files count against the tmpfs sizes, but two
kinds of memory count against neither: `memfd_create` files (anonymous files that are never mapped) and System V
shared memory (`shmget`, whose limits in a fresh ipc namespace are the kernel's generous defaults). `memfd_secret`
is refused with them. Everything else is allowed; on other architectures (and for x32 or 32-bit calls on x86-64)
the filter refuses the whole architecture's calls rather than guess their numbers.

The program is classic BPF as `bwrap --seccomp FD` reads it: an array of `struct sock_filter`.
"""

from __future__ import annotations

import errno
import platform
import struct

_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_ALLOW = 0x7FFF0000  # SECCOMP_RET_ALLOW
_DENY = 0x00050000 | errno.EPERM  # SECCOMP_RET_ERRNO: the call fails with EPERM
_X32_BIT = 0x40000000

# (audit architecture, {name: number}) per machine
_ARCHES = {
    "x86_64": (0xC000003E, {"memfd_create": 319, "shmget": 29, "memfd_secret": 447}),
    "aarch64": (0xC00000B7, {"memfd_create": 279, "shmget": 194, "memfd_secret": 447}),
}


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def memory_filter() -> bytes | None:
    """The filter for this machine; None where its system call numbers are not known here."""
    arch = _ARCHES.get(platform.machine())
    if arch is None:
        return None
    audit_arch, calls = arch
    numbers = list(calls.values())
    body = [
        _insn(_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        _insn(_JEQ_K, 1, 0, audit_arch),
        None,  # -> deny (filled in below)
        _insn(_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        None,  # x32 calls -> deny
        *(None for _ in numbers),
        _insn(_RET_K, 0, 0, _ALLOW),
        _insn(_RET_K, 0, 0, _DENY),
    ]
    deny = len(body) - 1

    def jump_to_deny(at: int, code: int, k: int) -> bytes:
        return _insn(code, deny - at - 1, 0, k)

    body[2] = _insn(0x05, 0, 0, deny - 3)  # BPF_JMP | BPF_JA: unconditional, to deny
    body[4] = jump_to_deny(4, _JGE_K, _X32_BIT)
    for i, number in enumerate(numbers):
        body[5 + i] = jump_to_deny(5 + i, _JEQ_K, number)
    return b"".join(insn for insn in body if insn is not None)
