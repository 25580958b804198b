"""Property tests: HttpProtocol fed valid and mutated byte streams, split at random points.

Each example drives a real :class:`~async_handler.protocol.HttpProtocol` through the loopback
transport of :mod:`tests.reliability` (pause_reading is honoured: a paused connection receives
nothing until the protocol resumes it), with a contract application on the loop and a plain WSGI
application on a pool thread.  The oracles:

* nothing raises out of ``connection_made``, ``data_received``, ``eof_received``,
  ``connection_lost`` or a task, and nothing is logged at error level;
* a valid request is seen by the application exactly as specified (method, target, path,
  query, protocol, headers with gunicorn's conventions, body), whether it arrives whole or in
  any number of pieces, and every request of a pipeline is answered, in order;
* every byte stream ends in a response or a close: with the client still connected, the
  server's own timers end the connection; after EOF or a drop it ends too; and the output is
  always a well-formed sequence of responses with any refusal last.

``benchmarks/fuzz.py`` runs the same properties for longer.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_handler.threads import ThreadPool
from tests.reliability import (
    APP_KINDS,
    QUIET_CONFIG,
    SHORT_CONFIG,
    cut,
    expected_observation,
    mutated_streams,
    pipelines,
    run_stream,
    stream_problems,
)

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPool]:
    p = ThreadPool(4, name="fuzz")
    yield p
    p.shutdown(wait=True, timeout=5)


def cut_points(size: int) -> st.SearchStrategy[list[int]]:
    """Where to split a stream of ``size`` bytes: a few random places, or between every byte."""
    return st.one_of(
        st.lists(st.integers(0, size), max_size=12),
        st.just(list(range(size))),
    )


@settings(FUZZ, max_examples=120)
@given(kind=st.sampled_from(APP_KINDS), requests=pipelines(), data=st.data())
def test_valid_requests_parse_identically_however_split(
    pool: ThreadPool, kind: str, requests: list, data: st.DataObject
) -> None:
    stream = b"".join(spec.wire() for spec in requests)
    expected = [expected_observation(spec) for spec in requests]
    points = data.draw(cut_points(len(stream)), label="cut points")
    for chunks in ([stream], cut(stream, points)):
        outcome = run_stream(
            kind, chunks, pool, config=QUIET_CONFIG, end="eof", responses=len(requests)
        )
        assert stream_problems(outcome, client_stayed=True) == [], (stream, chunks)
        assert outcome.seen == expected, (stream, chunks)
        assert [r.status for r in outcome.finals] == [200] * len(requests), outcome.output


@settings(FUZZ, max_examples=250)
@given(
    kind=st.sampled_from(APP_KINDS),
    stream=mutated_streams(),
    end=st.sampled_from(["none", "none", "eof", "lost"]),
    data=st.data(),
)
@pytest.mark.load
def test_mutated_streams_end_in_a_response_or_a_close(
    pool: ThreadPool, kind: str, stream: bytes, end: str, data: st.DataObject
) -> None:
    chunks = cut(stream, data.draw(cut_points(len(stream)), label="cut points"))
    outcome = run_stream(kind, chunks, pool, config=SHORT_CONFIG, end=end)
    problems = stream_problems(outcome, client_stayed=end == "none")
    assert problems == [], f"stream {stream!r}\nchunks {chunks!r}\noutput {outcome.output!r}"


@pytest.mark.parametrize("kind", APP_KINDS)
def test_oracle_catches_a_broken_answer(pool: ThreadPool, kind: str) -> None:
    """The oracles are not vacuous: a stream the server must refuse is seen as refused, an
    incomplete head ends by the header timeout with 408, and a good pipeline is answered."""
    refused = run_stream(kind, [b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n"], pool)
    assert [r.status for r in refused.finals] == [400]
    assert stream_problems(refused, client_stayed=True) == []
    stalled = run_stream(kind, [b"GET / HTTP/1.1\r\nHo"], pool, config=SHORT_CONFIG)
    assert [r.status for r in stalled.finals] == [408]
    good = run_stream(
        kind, [b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"], pool
    )
    assert [r.body for r in good.finals] == [b"GET /a 0", b"GET /b 0"]
    # A forged observation must be reported: the oracle compares answers with what was seen.
    good.seen.append(dict(good.seen[0]))
    assert stream_problems(good, client_stayed=True) != []
