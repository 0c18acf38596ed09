"""The hot path's own parsers and encoders against the library code they stand in for."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse

from dailyplay.clock import MAX_MS, iso_from_ms, ms_from_iso
from dailyplay.errors import ApiError
from dailyplay.inputs import query_items, session_token
from dailyplay.responses import JsonResponse


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [b"a", b"action", b"token", b"=", b"&", b"%", b"%41", b"%zz", b"+", b";", b"\xe9", b""]
        ),
        max_size=12,
    ).map(b"".join)
)
def test_the_query_is_read_as_starlette_reads_it(query: bytes) -> None:
    # The dispatcher splits plain queries itself; the pairs must be the ones Starlette gives.
    assert query_items(query) == QueryParams(query).multi_items()


def _token_by_uuid_module(value: str) -> bytes | None:
    """What a token is by the uuid module: its canonical text in any case, nothing else."""
    if len(value) != 36:
        return None
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return None
    return parsed.bytes if str(parsed) == value.lower() else None


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.uuids().map(str),
        st.uuids().map(lambda u: str(u).upper()),
        st.uuids().map(lambda u: u.hex + "----"),
        st.uuids().map(lambda u: "{" + str(u)[:34] + "}"),
        st.uuids().map(lambda u: "urn:uuid:" + str(u)[9:]),
        st.uuids().map(lambda u: str(u)[:35] + " "),
        st.uuids().map(lambda u: " " + str(u)[1:]),
        st.uuids().map(lambda u: str(u)[:20] + "+" + str(u)[21:]),
        st.uuids().map(lambda u: str(u)[:20] + "٣" + str(u)[21:]),
        st.text(alphabet="0123456789abcdefABCDEFg- x", min_size=36, max_size=36),
        st.text(max_size=40),
    )
)
@example("00000000-0000-0000-0000-000000000000")
def test_a_session_token_is_read_as_the_uuid_module_reads_it(value: str) -> None:
    expected = _token_by_uuid_module(value)
    if expected is None:
        with pytest.raises(ApiError) as refused:
            session_token(value)
        assert refused.value.status == 400
    else:
        assert session_token(value) == expected


@settings(max_examples=2000, deadline=None)
@given(st.integers(min_value=0, max_value=MAX_MS))
@example(0)
@example(MAX_MS)
@example(1_795_867_199_999)  # the last millisecond of a day
def test_times_are_written_as_datetime_writes_them(ms: int) -> None:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    expected = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    assert iso_from_ms(ms) == expected
    assert ms_from_iso(expected) == ms


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (200, None),
        (200, {}),
        (200, {"X-RateLimit-Limit": "60", "Retry-After": "1"}),
        (404, None),
        (503, {"Retry-After": "60"}),
        (204, None),
        (200, {"Content-Type": "application/problem+json"}),
    ],
)
def test_answers_carry_the_headers_starlette_would_give_them(
    status: int, headers: dict[str, str] | None
) -> None:
    content = {"success": status < 300, "data": {"valid": True}}
    ours = JsonResponse(content, status_code=status, headers=headers)
    theirs = JSONResponse(content, status_code=status, headers=headers)
    assert ours.raw_headers == theirs.raw_headers
    assert (ours.status_code, ours.body, ours.background) == (status, theirs.body, None)


def test_answers_orjson_declines_are_encoded_as_starlette_would() -> None:
    # An integer past 64 bits cannot come from the database, but an answer must never 500.
    content = {"success": True, "data": {"n": 2**70, "s": "é"}}
    assert JsonResponse(content).body == JSONResponse(content).body
