"""RFC 3339 timestamps, as every resource writes them."""

from __future__ import annotations

import re

from gemserve.timestamps import parse_rfc3339, rfc3339, utc_now


def test_timestamps_are_rfc3339_utc() -> None:
    stamp = utc_now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    assert parse_rfc3339(stamp).tzinfo is not None
    assert rfc3339(parse_rfc3339("2025-01-02T03:04:05+02:00")) == "2025-01-02T01:04:05.000000Z"
    assert parse_rfc3339("2025-01-02T03:04:05") == parse_rfc3339("2025-01-02T03:04:05Z")  # no offset: UTC
