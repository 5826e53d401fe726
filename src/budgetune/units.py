"""Parsing human quantities: durations (`90s`, `10m`, `1h30m`), counts (`5M`, `1.5e9`), sizes (`24GB`)."""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(ms|s|sec|m|min|h|hr|d)?\s*$", re.I)
# one part of a compound duration such as 1h30m or 2h 15m 10s (each part has a unit)
_DURATION_PART = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(ms|sec|s|min|m|hr|h|d)", re.I)
_SECONDS = {None: 1.0, "ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0, "d": 86400.0}
_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([kmgbt])?\s*$", re.I)
_SCALE = {None: 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}


def _parse(value: str | float | int, pattern: re.Pattern, scales: dict, what: str, examples: str) -> float:
    """A number with an optional unit suffix (case-insensitive); plain numbers pass through."""
    if isinstance(value, bool):
        raise ValueError(f"not a {what}: {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"not a {what}: {value!r} (a finite number, e.g. {examples})")
        return float(value)
    match = pattern.match(str(value))
    if not match:
        raise ValueError(f"not a {what}: {value!r} (use e.g. {examples})")
    number, unit = match.groups()
    return float(number) * scales[unit.lower() if unit else None]


def parse_duration(value: str | float | int) -> float:
    """Seconds from `90`, `90s`, `1.5m`, `2h`, `1h30m`. Raises ValueError on anything else.

    A sign is read, so `-5m` is -300 and the caller's range check can say what is wrong with it."""
    if isinstance(value, str) and not _DURATION.match(value):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        parts, end = [], 0
        for match in _DURATION_PART.finditer(text):
            if match.start() != end:
                break
            parts.append(match.groups())
            end = match.end()
        if len(parts) > 1 and not text[end:].strip():
            return sign * sum(float(n) * _SECONDS[u.lower()] for n, u in parts)
    return _parse(value, _DURATION, _SECONDS, "duration", "90s, 10m, 1h30m")


def parse_count(value: str | float | int) -> float:
    """A count from `1000`, `5M`, `1.5e9`, `2B`. Raises ValueError on anything else."""
    return _parse(value, _COUNT, _SCALE, "count", "5M, 2e9")


_BYTES = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(b|kb|mb|gb|tb|pb|kib|mib|gib|tib|pib)?\s*$", re.I)
_BYTE_SCALE = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}


def parse_bytes(value: str | float | int) -> float:
    """Bytes from `24GB`, `24GiB`, `512MB` or a plain number. The SI units are powers of ten
    (GB = 10^9), the IEC ones powers of two (GiB = 2^30): distinct, as the standards say. A
    "24 GB" GPU has 24 GiB; describe_bytes shows which value was used."""
    return _parse(value, _BYTES, _BYTE_SCALE, "size", "24GB, 24GiB, 512MB")


def describe_bytes(n: float) -> str:
    """Both readings of a byte count, e.g. `24.00 GiB = 25.77 GB`: no doubt which one is meant."""
    for binary, decimal, b_scale, d_scale in (("TiB", "TB", 2**40, 10**12), ("GiB", "GB", 2**30, 10**9),
                                              ("MiB", "MB", 2**20, 10**6), ("KiB", "kB", 2**10, 10**3)):
        if abs(n) >= b_scale:
            return f"{n / b_scale:.2f} {binary} = {n / d_scale:.2f} {decimal}"
    return f"{n:.0f} B"


def format_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
