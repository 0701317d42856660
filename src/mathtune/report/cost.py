"""What a run cost: device-hours priced from a rough table or a given price, and training throughput.

Pure functions; a figure the inputs do not support raises NotComputable with the reason.
"""

from __future__ import annotations

import re

from mathtune.report.stats import NotComputable

# Rough on-demand cloud prices in USD per device-hour (2025); override with cost.price_per_hour.
PRICES_USD_PER_HOUR = {
    "H200": 3.50,
    "H100": 2.50,
    "A100": 1.50,
    "L40S": 1.00,
    "A10G": 1.00,
    "L4": 0.70,
    "T4": 0.35,
    "V100": 0.80,
    "RTX 4090": 0.40,
    "RTX 3090": 0.25,
    "CPU": 0.10,  # a 2-core cloud VM
}


def price_key(hardware: str) -> str | None:
    """The price table's entry named in a hardware string ("NVIDIA H100 80GB HBM3" -> "H100"), longest first."""
    for key in sorted(PRICES_USD_PER_HOUR, key=len, reverse=True):
        if re.search(rf"(?<![A-Z0-9]){re.escape(key)}(?![A-Z0-9])", hardware.upper()):
            return key
    return None


def cost(hours: float, hardware: str | None, price_per_hour: float | None = None) -> dict:
    """USD for `hours` on `hardware`, at the given price or the table's default for that hardware.

    A leading device count ("2x NVIDIA H100 ...", as models.hardware_name writes it) multiplies the
    default price; a given price is taken as the price of the whole machine.
    """
    key = price_key(hardware) if hardware else None
    count = re.match(r"\s*(\d+)\s*x\s", hardware or "")
    if price_per_hour is not None:
        price, source = price_per_hour, "given"
    elif key is not None:
        devices = int(count.group(1)) if count else 1
        price = PRICES_USD_PER_HOUR[key] * devices
        source = f"default table ({devices} x {key})" if devices > 1 else f"default table ({key})"
    else:
        price, source = None, None
    return {"hours": hours, "hardware": hardware, "price_per_hour": price, "price_source": source,
            "usd": None if price is None else hours * price}


def throughput(metrics: list[dict]) -> dict:
    """Tokens seen in training (all and loss-bearing) and tokens per wall-clock second, at the last training log."""
    logged = [m for m in metrics if m.get("kind") == "train" and m.get("num_tokens") is not None]
    if not logged:
        raise NotComputable("No training record carries num_tokens, so tokens processed and throughput are unknown.")
    last = logged[-1]
    elapsed = last.get("elapsed_s")
    return {"tokens": last["num_tokens"], "loss_tokens": last.get("num_loss_tokens"),
            "tokens_per_s": last["num_tokens"] / elapsed if elapsed else None}

