"""Options that several commands share, declared once, and the click types every number goes through.

Ranges are click types, so a bad option is refused before any work, the click way (a usage line and exit 2). The
types call the library's one parser per kind of value (:mod:`adapterkit.values`), so the CLI and the library refuse
the same values with the same words.
"""

from __future__ import annotations

import click

from adapterkit import values
from adapterkit.errors import RequestError
from adapterkit.precision import PRECISIONS


class Number(click.ParamType):
    """A finite number in ``[low, high]`` (an end excluded when ``*_open``)."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            return values.number(value, "the value", self.low, self.high, low_open=self.low_open,
                                 high_open=self.high_open)
        except RequestError as exc:
            self.fail(exc.reason.removeprefix("the value "), param, ctx)


class Weights(click.ParamType):
    """``0.7,0.3``: one finite weight per adapter (the count is checked by :func:`check_weight_count`)."""

    name = "weights"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return values.weights(value, "")
        except RequestError as exc:
            self.fail(exc.reason.strip(), param, ctx)


def check_weight_count(weights: list[float] | None, adapters: int) -> list[float] | None:
    """Refuse, the click way, a --weights that does not give one weight per adapter."""
    if weights is not None and len(weights) != adapters:
        raise click.BadParameter(f"gives {len(weights)} weights for {adapters} adapter{'s' if adapters != 1 else ''}",
                                 param_hint="'--weights'")
    return weights


class Count(click.IntRange):
    """A whole number from 1 to :data:`adapterkit.values.MAX_COUNT` (click's words below the range)."""

    def __init__(self):
        super().__init__(min=1)

    def convert(self, value, param, ctx):
        result = super().convert(value, param, ctx)
        if result > values.MAX_COUNT:
            self.fail(f"{result} is more than {values.MAX_COUNT}, the largest count adapterkit takes", param, ctx)
        return result


COUNT = Count()
WEIGHTS = click.option("--weights", type=Weights(), default=None,
                       help="One weight per adapter, comma-separated, e.g. 0.7,0.3 (negative subtracts).  "
                            "[default: 1 each]")
FORCE = click.option("--force", is_flag=True, help="Go on even if an adapter was made for another base (fingerprint).")
OVERWRITE = click.option("--overwrite", is_flag=True,
                         help="Replace OUTPUT if it is a non-empty folder that adapterkit wrote.")
DTYPES = ("float32", "float16", "bfloat16")
DTYPE = click.option("--dtype", type=click.Choice(DTYPES), default=None,
                     help="Dtype of the written weights [default: the checkpoint's].")


class Precisions(click.ParamType):
    """``float32,nf4``: one or more base precisions, comma-separated, each one of :data:`PRECISIONS`."""

    name = "precisions"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        chosen = [p.strip() for p in value.split(",") if p.strip()]
        unknown = [p for p in chosen if p not in PRECISIONS]
        if unknown or not chosen:
            self.fail(f"{unknown[0]!r} is not a base precision (known: {', '.join(PRECISIONS)})" if unknown
                      else "name at least one base precision", param, ctx)
        return list(dict.fromkeys(chosen))


BASE_PRECISION_HELP = ("Precision the frozen base is held in while the adapter (float32) trains or runs on top: "
                       "float32; bfloat16; int8 or nf4 weights in the linear layers (torchao; QLoRA's recipe). The "
                       "adapter still belongs to the full-precision base.")
BASE_PRECISION = click.option("--base-precision", type=click.Choice(PRECISIONS), default="float32",
                              help=BASE_PRECISION_HELP)
BASE_PRECISIONS = click.option("--base-precisions", type=Precisions(), default="float32",
                               help="Comma-separated base precisions to compare each method over (" +
                                    ", ".join(PRECISIONS) + ").")
