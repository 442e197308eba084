"""Options and parsing that several commands share."""

from __future__ import annotations

from adapterkit.errors import AdapterError


def parse_weights(text: str | None, count: int) -> list[float] | None:
    """``"0.7,0.3"`` -> ``[0.7, 0.3]``, one weight per adapter; ``None`` when the option was not given."""
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise AdapterError(f"--weights {text!r} is not a comma-separated list of numbers") from None
    if len(weights) != count:
        raise AdapterError(f"--weights gives {len(weights)} weights for {count} adapters")
    return weights
