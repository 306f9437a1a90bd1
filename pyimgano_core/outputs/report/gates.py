"""``--fail-under image_auroc=0.99,aupro=0.90``: a pass/fail answer for CI jobs.

Parsed and checked before any work starts (a typo is a config error naming the allowed
metrics); applied to every category of the finished run. A metric that could not be
computed (no pixel ground truth, one class only) fails its gate: a CI job asked for it.
"""
from __future__ import annotations

from ...errors import ConfigError
from . import METRIC_NAMES


def parse_gates(text: str | None) -> dict[str, float]:
    """``"image_auroc=0.99,aupro=0.9"`` -> ``{"image_auroc": 0.99, "aupro": 0.9}``."""
    if not text:
        return {}
    gates = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, raw = part.partition("=")
        name = name.strip()
        if name not in METRIC_NAMES:
            raise ConfigError(f"--fail-under: unknown metric {name!r}; allowed: {', '.join(METRIC_NAMES)}")
        try:
            value = float(raw) if sep else None
        except ValueError:
            value = None
        if value is None or not 0.0 <= value <= 1.0:
            raise ConfigError(f"--fail-under {part!r}: expected {name}=<number in [0, 1]>, e.g. {name}=0.95")
        gates[name] = value
    return gates


def check_gates(summary: dict, gates: dict[str, float]) -> list[str]:
    """One line per category and metric that fell short (empty: every gate passed)."""
    failures = []
    for cat, r in summary["categories"].items():
        for name, limit in gates.items():
            value = (r.get("metrics") or {}).get(name)
            if value is None:
                failures.append(f"{cat}: {name} was not computed (needs both classes / pixel ground truth); required >= {limit:.3f}")
            elif value < limit:
                failures.append(f"{cat}: {name} {value:.4f} < {limit:.4f}")
    return failures
