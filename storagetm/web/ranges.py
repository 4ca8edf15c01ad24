"""HTTP byte ranges (RFC 9110 14.1.2): one range per request, so a broken download resumes."""

from __future__ import annotations

import re

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class Unsatisfiable(ValueError):
    """No byte of the range is in the resource: 416."""


def byte_range(header: str | None, total: int) -> tuple[int, int] | None:
    """(first, last) byte, inclusive; None for the whole resource: no Range, or one this
    server ignores as RFC 9110 allows (several ranges, or not of the bytes=A-B form)."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = int(last)  # the last N bytes
        if suffix == 0 or total == 0:
            raise Unsatisfiable(header)
        return max(total - suffix, 0), total - 1
    start = int(first)
    end = int(last) if last else total - 1
    if last and end < start:
        return None  # invalid: ignored, the whole resource
    if start >= total:
        raise Unsatisfiable(header)
    return start, min(end, total - 1)
