"""``Retry-After`` as providers send it: every protocol's throttling answer carries one."""

from __future__ import annotations


def parse_retry_after(value: bytes | None, now_epoch: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        return max(0.0, parsedate_to_datetime(text).timestamp() - now_epoch)
    except (TypeError, ValueError):
        return None
