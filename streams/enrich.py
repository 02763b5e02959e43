"""Enrichment before landing: estimated cost for model calls that report tokens but no cost.

Prices come from ``genai-prices`` (a maintained price table). Its ``calc_price`` costs about
200 us a call, far too slow for every event, so each (provider, model) is priced once at a
small reference usage and turned into per-token rates. Rates hold below a model's first
price tier; the rare call above ``TIER_SAFE_INPUT_TOKENS`` is priced exactly instead. Unknown
models stay null and are counted, never guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from genai_prices import Usage, calc_price, data_snapshot

from pipeline import schema

TIER_SAFE_INPUT_TOKENS: Final = 100_000
_REF: Final = 1_000_000


@dataclass(frozen=True)
class Rates:
    """USD per token for one model."""

    input: float
    cached_input: float
    output: float


def _price(model: str, provider: str | None, usage: Usage) -> float:
    return float(calc_price(usage, model_ref=model, provider_id=provider).total_price)


class CostEstimator:
    """Fills ``cost_usd`` from tokens where a model call lacks it; remembers unknown models."""

    def __init__(self) -> None:
        self._rates: dict[tuple[str | None, str], Rates | None] = {}
        self.unknown_models: dict[str, int] = {}
        # The bundled price table is parsed on its first use (0.14 s, once a process): here,
        # when the worker is made, rather than inside its first flush.
        data_snapshot.get_snapshot()

    def rates(self, provider: str | None, model: str) -> Rates | None:
        """Per-token rates for a model, or None if the price table does not know it."""
        key = (provider, model)
        if key not in self._rates:
            try:
                base = _price(model, provider, Usage(input_tokens=_REF, output_tokens=0))
                out = _price(model, provider, Usage(input_tokens=0, output_tokens=_REF))
                cached = _price(
                    model,
                    provider,
                    Usage(input_tokens=_REF, cache_read_tokens=_REF, output_tokens=0),
                )
                self._rates[key] = Rates(base / _REF, cached / _REF, out / _REF)
            except LookupError:
                self._rates[key] = None
        return self._rates[key]

    def estimate(self, ev: schema.LlmCall) -> float | None:
        """The cost of one call from its tokens, or None when the model is unknown."""
        if ev.model is None:
            return None
        if ev.input_tokens > TIER_SAFE_INPUT_TOKENS:
            try:
                return _price(
                    ev.model,
                    ev.provider,
                    Usage(
                        input_tokens=ev.input_tokens,
                        cache_read_tokens=ev.cached_input_tokens,
                        output_tokens=ev.output_tokens,
                    ),
                )
            except LookupError:
                return None
        r = self.rates(ev.provider, ev.model)
        if r is None:
            return None
        fresh = ev.input_tokens - ev.cached_input_tokens
        return (
            fresh * r.input + ev.cached_input_tokens * r.cached_input + ev.output_tokens * r.output
        )

    def fill(self, events: Sequence[schema.AgentEvent]) -> list[bool]:
        """Estimate missing costs in place; return the ``cost_estimated`` flag per event."""
        flags = [False] * len(events)
        for i, ev in enumerate(events):
            if type(ev) is schema.LlmCall and ev.cost_usd is None:
                cost = self.estimate(ev)
                if cost is None:
                    name = ev.model or "<no model>"
                    self.unknown_models[name] = self.unknown_models.get(name, 0) + 1
                else:
                    ev.cost_usd = cost
                    flags[i] = True
        return flags
