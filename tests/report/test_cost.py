"""report/cost.py: prices from the default table or a given price, device counts included."""

from __future__ import annotations

import pytest

from mathtune.report.cost import PRICES_USD_PER_HOUR, cost, price_key


def test_cost_defaults_and_override():
    h100 = cost(2.0, "NVIDIA H100 80GB HBM3")
    assert h100["usd"] == pytest.approx(2 * PRICES_USD_PER_HOUR["H100"]) and h100["price_source"] == "default table (H100)"
    assert price_key("NVIDIA L40S") == "L40S" and price_key("NVIDIA L4") == "L4"
    assert price_key("NVIDIA A10G") == "A10G" and price_key("NVIDIA A100-SXM4-80GB") == "A100"
    assert price_key("cpu (2 cores)") == "CPU"
    assert cost(1.5, "NVIDIA H100", price_per_hour=4.0)["usd"] == pytest.approx(6.0)
    assert cost(1.0, "Some TPU")["usd"] is None
    two = cost(1.0, "2x NVIDIA A100-SXM4-80GB")
    assert two["usd"] == pytest.approx(2 * PRICES_USD_PER_HOUR["A100"]) and two["price_source"] == "default table (2 x A100)"
    assert cost(1.0, "1x NVIDIA H100 80GB HBM3")["usd"] == pytest.approx(PRICES_USD_PER_HOUR["H100"])
    assert price_key("CPU (2 cores, x86_64)") == "CPU"
