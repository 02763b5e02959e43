"""One OTLP body -> validated Kafka records, in bulk: decode, map, encode, validate.

Validation is the schema's own batch decoder (``pipeline.schema.decode_batch``), the same one
the worker runs, so an event the receiver accepts is one the worker lands; the validated JSON
bytes are what goes to Kafka (nothing is encoded twice).
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from pipeline import schema
from pipeline.otel.decode import Encoding, decode_logs, decode_traces
from pipeline.otel.mapping import SPAN_ATTRIBUTES, Mapped, map_logs, map_spans
from pipeline.publisher import event_key

Signal = Literal["traces", "logs"]
_REASONS_SHOWN: Final = 3
_encode = msgspec.json.Encoder().encode


class Converted(msgspec.Struct):
    """What one body became.

    ``records`` are validated ``(key, JSON)`` pairs ready for ``Publisher.publish_raw``;
    ``rejected`` counts spans (or log records) refused, ``invalid`` holds each refused
    event's JSON with the reason (the Kafka source dead-letters them); ``skipped`` counts
    items that are not agent work.
    """

    records: list[tuple[bytes, bytes]]
    rejected: int
    invalid: list[tuple[bytes, str]]
    reasons: list[str]
    skipped: int
    total: int

    def message(self, noun: str) -> str:
        """The ``partial_success.error_message``: how many were refused and the first reasons."""
        if not self.rejected:
            return ""
        return f"{self.rejected} of {self.total} {noun} rejected: " + "; ".join(self.reasons)


def convert(body: bytes, encoding: Encoding, signal: Signal) -> Converted:
    """Decode, map and validate one OTLP body; raises ``OtlpDecodeError`` if it is not OTLP."""
    if signal == "traces":
        mapped = map_spans(decode_traces(body, encoding, SPAN_ATTRIBUTES))
    else:
        mapped = map_logs(decode_logs(body, encoding))
    return validate(mapped)


def validate(mapped: Mapped) -> Converted:
    """Validate mapped events as the worker would; a span with any refused event is refused."""
    raws = [_encode(e) for e in mapped.events]
    events, ok_at, rejections, bad_at = schema.decode_batch(raws)
    bad_items: dict[int, str] = dict(mapped.rejected)
    invalid: list[tuple[bytes, str]] = []
    for at, rejection in zip(bad_at, rejections, strict=True):
        bad_items.setdefault(mapped.origins[at], rejection.reason)
        invalid.append((raws[at], rejection.reason))
    if bad_items:
        keep = [
            (ev, at)
            for ev, at in zip(events, ok_at, strict=True)
            if mapped.origins[at] not in bad_items
        ]
    else:
        keep = list(zip(events, ok_at, strict=True))
    reasons: list[str] = []
    for reason in bad_items.values():
        if reason not in reasons:
            reasons.append(reason)
            if len(reasons) == _REASONS_SHOWN:
                break
    return Converted(
        records=[(event_key(ev), raws[at]) for ev, at in keep],
        rejected=len(bad_items),
        invalid=invalid,
        reasons=reasons,
        skipped=mapped.skipped,
        total=mapped.total,
    )
