"""Redaction of user content before landing."""

from __future__ import annotations

import pytest

from pipeline import schema
from pipeline.config import ConfigError, Settings
from streams.redact import Redactor

ALL = ["email", "phone", "api_key"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail me at jane.doe+x@example.co.uk please", "mail me at [email] please"),
        ("call +1 (555) 010-9999 now", "call [phone] now"),
        ("or 0151 2345678", "or [phone]"),
        ("key sk-proj-abcdefghijklmnop1234 leaked", "key [api_key] leaked"),
        ("aws AKIAABCDEFGHIJKLMNOP here", "aws [api_key] here"),
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "token [api_key]"),
        ("order 12345 costs 19.99 on 2026-01-05", "order 12345 costs 19.99 on 2026-01-05"),
        ("version v3.2.1 of gpt-4o", "version v3.2.1 of gpt-4o"),
    ],
)
def test_patterns(text: str, expected: str) -> None:
    assert Redactor(ALL).text(text) == expected


def test_events_are_redacted_in_their_text_fields_only() -> None:
    base = {"event_id": "e", "schema_version": 1, "ts": "2026-01-05T09:00:00Z", "agent_id": "a"}
    events = [
        schema.from_dict({**base, "type": "retrieval", "hits": 0, "query": "who is bob@x.io"}),
        schema.from_dict({**base, "type": "escalation", "reason": "user gave +49 151 2345678"}),
        schema.from_dict({**base, "type": "feedback", "correction": "use sk-abcdefghijklmnopqrst"}),
        schema.from_dict({**base, "type": "tool_call", "tool_name": "bob@x.io", "status": "ok"}),
    ]
    redactor = Redactor(ALL)
    redactor.events(events)
    assert [
        getattr(e, f)
        for e, f in zip(events, ["query", "reason", "correction", "tool_name"], strict=True)
    ] == [
        "who is [email]",
        "user gave [phone]",
        "use [api_key]",
        "bob@x.io",  # identifiers are not user content
    ]
    assert redactor.redacted == 3


def test_configuration() -> None:
    assert Settings.load(env={}).redact_kinds == ALL
    assert Settings.load(env={"AGENTSTREAM_REDACT": "none"}).redact_kinds == []
    assert Settings.load(env={"AGENTSTREAM_REDACT": "email"}).redact_kinds == ["email"]
    with pytest.raises(ConfigError, match="bad redact 'emails'"):
        Settings.load(env={"AGENTSTREAM_REDACT": "emails"})
    Redactor([]).events([])  # nothing to do, nothing fails
