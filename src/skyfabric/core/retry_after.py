"""``Retry-After`` as providers send it: every protocol's throttling answer carries one."""

from __future__ import annotations

from email.utils import parsedate_to_datetime


def parse_retry_after(value: bytes | None, now_epoch: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(text).timestamp() - now_epoch)
    except (TypeError, ValueError):
        return None


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first header called ``name`` (lower-case), whatever its case on the wire."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def delta_seconds(value: bytes | None) -> float | None:
    """A non-negative number of seconds (``Retry-After: 7``), or None."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def retry_after(headers: list[tuple[bytes, bytes]], now_epoch: float) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date), whichever
    comes first that parses, or None."""
    for name, value in headers:
        key = name.lower()
        if key == b"retry-after-ms":
            try:
                return max(0.0, float(value) / 1000)
            except ValueError:
                continue
        if key == b"retry-after":
            seconds = parse_retry_after(value, now_epoch)
            if seconds is not None:
                return seconds
    return None
