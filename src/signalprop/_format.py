"""The one compact number formatter (sentences, tables, reports).

Each caller keeps its own spelling of missing and infinite values (a table's "–", a sentence's
"n/a") through arguments; the rule itself lives here once: ``digits`` significant digits, and
scientific notation for magnitudes at or above 1e4 or below ``small``.
"""

from __future__ import annotations

import math
from typing import Any


def fmt_number(
    v: Any,
    digits: int = 3,
    *,
    missing: str = "n/a",
    infinity: tuple[str, str] = ("inf", "-inf"),
    small: float = 1e-3,
    exact_ints: bool = False,
    compact_exp: bool = False,
) -> str:
    """Format a number compactly.

    Args:
        v: The number (``None`` and NaN are ``missing``; a non-number is ``str(v)``).
        digits: Significant digits.
        missing: The text for ``None``/NaN.
        infinity: The texts for +inf and -inf.
        small: Magnitudes below this (and at or above 1e4) are written in scientific notation.
        exact_ints: Write ints (and bools) as they are instead of as floats.
        compact_exp: Drop the exponent's sign "+" and leading zero (``3e-7``, ``1.2e5``).

    >>> fmt_number(0.123456), fmt_number(123456.0), fmt_number(float("nan")), fmt_number(0)
    ('0.123', '1.23e+05', 'n/a', '0')
    >>> fmt_number(3e-7, 2, compact_exp=True, small=1e-2)
    '3.0e-7'
    """
    if v is None:
        return missing
    if exact_ints and isinstance(v, (bool, int)):
        return str(v)
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(x):
        return missing
    if math.isinf(x):
        return infinity[0] if x > 0 else infinity[1]
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < small:
        s = f"{x:.{max(digits - 1, 0)}e}"
        if compact_exp:
            s = s.replace("e-0", "e-").replace("e+0", "e+").replace("e+", "e")
        return s
    return f"{x:.{digits}g}"
