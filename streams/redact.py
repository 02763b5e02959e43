"""Redaction of user content before it is landed: emails, phone numbers, API-key-like strings.

Only the free-text fields that can hold what a user typed or a document said are touched
(``TEXT_FIELDS``); identifiers and model names are not. Each match becomes a marker such as
``[email]``, so a reader still sees that something was there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Final

from pipeline import schema

TEXT_FIELDS: Final = ("query", "reason", "correction", "explanation")
_BY_CLASS: Final = {
    cls: tuple(f for f in TEXT_FIELDS if f in cls.__struct_fields__) for cls in schema.EVENT_CLASSES
}

PATTERNS: Final[dict[str, re.Pattern[str]]] = {
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    # Long digit runs with optional separators and country code: +1 (555) 010-9999, 0151 2345678.
    "phone": re.compile(r"(?<![\w.])\+?\d[\d\s().-]{7,}\d(?![\w.])"),
    # Provider key shapes (sk-..., AKIA..., ghp_..., xox?-...) and long opaque tokens.
    "api_key": re.compile(
        r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}|\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}"
        r"|\bxox[abpr]-[A-Za-z0-9-]{10,}|\b[A-Za-z0-9_\-]{32,}\b"
    ),
}


def _phone(match: re.Match[str]) -> str:
    # Nine digits or more: a phone number, not a date (8 digits) or an amount.
    text = match.group(0)
    return "[phone]" if sum(c.isdigit() for c in text) >= 9 else text


class Redactor:
    """Applies the chosen patterns to the text fields of events, in place."""

    def __init__(self, kinds: Sequence[str]) -> None:
        unknown = [k for k in kinds if k not in PATTERNS]
        if unknown:
            raise ValueError(
                f"unknown redaction {unknown[0]!r}: choose from {', '.join(PATTERNS)} or none"
            )
        self.rules = [(PATTERNS[k], _phone if k == "phone" else f"[{k}]") for k in kinds]
        self.redacted = 0

    rules: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]]

    def text(self, value: str) -> str:
        """``value`` with every match replaced by its marker."""
        for pattern, marker in self.rules:
            value = pattern.sub(marker, value)
        return value

    def events(self, events: Sequence[schema.AgentEvent]) -> None:
        """Redact the text fields of ``events`` in place."""
        if not self.rules:
            return
        by_class = _BY_CLASS
        for ev in events:
            for name in by_class[type(ev)]:
                value = getattr(ev, name)
                if value:
                    clean = self.text(value)
                    if clean != value:
                        setattr(ev, name, clean)
                        self.redacted += 1
