"""A check's value and limit never print alike where they differ: "p99 KL 0.03417 > limit 0.03417"
and "top-1 agreement 95.0% < limit 95.0%" were failing checks that contradicted themselves."""

from __future__ import annotations

import math

from difftest.report.words import fmt_value_and_limit
from difftest.results import Check, fmt_apart


def test_more_digits_only_where_four_read_alike():
    assert fmt_apart(0.0341650488, 0.034165) == ("0.03416505", "0.034165")
    assert fmt_apart(0.05, 0.01) == ("0.05", "0.01")  # unchanged where they already differ
    assert fmt_apart(0.034165, 0.034165 * (1 + 1e-12)) == ("0.03417", "0.03417")  # at the limit: alike
    assert fmt_apart(math.nan, 0.5) == ("nan", "0.5")


def test_rates_get_more_decimals():
    assert fmt_value_and_limit("top1_agreement", 0.9496, 0.95) == ("94.96%", "95.00%")
    assert fmt_value_and_limit("top1_agreement", 0.8, 0.95) == ("80.0%", "95.0%")
    assert fmt_value_and_limit("kl_mean", None, 0.01) == ("n/a", "0.01")


def test_the_check_line_reads_apart():
    c = Check(name="kl_p99", value=0.0341650488, limit=0.034165, op="<=", passed=False)
    assert c.describe().startswith("kl_p99 0.03416505 > 0.034165")
