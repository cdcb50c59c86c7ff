"""Numbers as the reports write them, one definition for every report module (the test report,
its calibration section, the corruptions section; calibration's JSON entry): a fraction as a
percentage in text, a float JSON cannot hold as null. No imports from the package: every layer
may use it."""

from __future__ import annotations

import math


def pct(x: float | None) -> str:
    """A fraction as text, "12.34%"; "-" where there is none (a class without images)."""
    return "-" if x is None else f"{x:.2%}"


def finite(x: float | None) -> float | None:
    """x, or None where it is NaN or infinite: JSON has neither, so a diverged model's loss or
    calibration is reported as null."""
    return x if x is not None and math.isfinite(x) else None
