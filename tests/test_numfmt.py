"""numfmt: the one home of the reports' percentage text and JSON's null for NaN and infinity."""

from __future__ import annotations

import math

from vggtrain import calibration, calibration_report, corruptions, report
from vggtrain.numfmt import finite, pct


def test_pct_writes_a_fraction_as_a_percentage_and_none_as_a_dash():
    assert pct(0.12345) == "12.35%" and pct(1.0) == "100.00%" and pct(None) == "-"


def test_finite_keeps_numbers_and_turns_what_json_cannot_hold_into_none():
    assert finite(0.5) == 0.5 and finite(0.0) == 0.0
    assert finite(math.nan) is None and finite(math.inf) is None and finite(-math.inf) is None
    assert finite(None) is None


def test_the_report_modules_use_the_one_definition():
    assert report.pct is calibration_report.pct is corruptions.pct is pct
    assert report.finite is calibration.finite is finite
