"""Process lifetime: children that must not outlive the process that started them."""

from __future__ import annotations

import contextlib
import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies, even by SIGKILL.

    Called in a child right after fork (before exec, for subprocesses): a supervisor or gateway parent
    that is killed outright then leaves no orphaned replicas or workers holding ports. Elsewhere than
    Linux it does nothing.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
