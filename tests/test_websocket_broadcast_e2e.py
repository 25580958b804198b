"""Broadcast across processes: two gunicorn masters (standing in for two machines), two workers
each, one channels_redis layer; 1,000 sockets in one group, spread over the four workers.

Every broadcast must reach every socket exactly once and in order, whichever master's worker
sent it.  A socket whose client stops reading is closed with 1013 (Try Again Later) once it is
more than ``ASYNC_HANDLER_WS_OUTBOX_SIZE`` messages behind, that is logged once, and the others
still get everything.

Linux lets a server socket buffer about 3 MB towards a client that reads nothing (send-buffer
autotuning, up to ``tcp_wmem``'s 4 MB), so the stalled socket is also in a group of its own that
gets 64 KB messages: the others are not made to read gigabytes to fill that one's buffers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests._support import flush_redis_prefix, raise_nofile_limit, require_redis
from tests.server import GunicornServer
from tests.ws_swarm import SwarmSocket, child_pids, drain_frames, open_swarm, stalled_socket

pytestmark = [pytest.mark.slow, pytest.mark.load, pytest.mark.timeout(180)]

SOCKETS = 1000
GROUP = "fanout"
STALL_GROUP = "stall"
STALL_SEQ = 10_000
OUTBOX = 8
# Per worker: two workers hold at most 600 of a master's 500 sockets, so each holds >= 200.
WORKER_CONNECTIONS = 300
OVERFLOW_LOG = re.compile(r"Closing WebSocket /ws/group/fanout/ with 1013")


class Tally:
    """What each socket received: the worker pid it reported, then the broadcast sequence
    numbers, in arrival order."""

    def __init__(self) -> None:
        self.pid: dict[SwarmSocket, int] = {}
        self.seqs: dict[SwarmSocket, list[int]] = collections.defaultdict(list)

    def on_message(self, sock: SwarmSocket, message: str | bytes) -> None:
        assert isinstance(message, str)
        if sock not in self.pid:
            self.pid[sock] = json.loads(message)["pid"]
        else:
            self.seqs[sock].append(int(message.partition(" ")[0]))

    def behind(self, sockets: list[SwarmSocket], count: int) -> list[SwarmSocket]:
        return [s for s in sockets if len(self.seqs[s]) < count]


@pytest.fixture
def masters() -> Iterator[list[GunicornServer]]:
    require_redis()
    raise_nofile_limit(2 * SOCKETS + 1000)
    prefix = f"ah-e2e-{uuid.uuid4().hex[:8]}"
    env = {
        "DJPROJECT_MIDDLEWARE": "async",
        "DJPROJECT_REDIS_PREFIX": prefix,
        "DJPROJECT_WS_OUTBOX": str(OUTBOX),
        # Time to read the stalled socket's backlog before the server gives up on its close.
        "ASYNC_HANDLER_WS_CLOSE_TIMEOUT": "30",
    }
    args = [
        "--workers",
        "2",
        "--worker-connections",
        str(WORKER_CONNECTIONS),
        "--graceful-timeout",
        "5",
    ]
    servers = [
        GunicornServer(
            "tests.djproject.wsgi:application", args=args, env=env, ready_path="/async/hello/"
        )
        for _ in range(2)
    ]
    try:
        with contextlib.ExitStack() as stack:
            for server in servers:
                stack.enter_context(server)
            yield servers
    finally:
        flush_redis_prefix(prefix)


def _broadcast(
    server: GunicornServer, start: int, count: int, size: int, group: str = GROUP
) -> None:
    data = urllib.parse.urlencode({"start": start, "count": count, "size": size}).encode()
    url = f"{server.url}/ws/broadcast/{group}/"
    with urllib.request.urlopen(url, data=data, timeout=30) as response:
        assert response.status == 200


async def _until(predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s: {what()}")
        await asyncio.sleep(0.02)


def _overflow_lines(servers: list[GunicornServer]) -> int:
    return sum(len(OVERFLOW_LOG.findall(server.log_text())) for server in servers)


def test_broadcast_reaches_1000_sockets_on_four_workers_once_and_a_stalled_one_gets_1013(
    masters: list[GunicornServer],
) -> None:
    a, b = masters
    workers = set(child_pids(a.master_pid)) | set(child_pids(b.master_pid))
    assert len(workers) == 4, workers
    tally = Tally()

    async def main() -> tuple[list[SwarmSocket], int, str | bytes, list[int], int | None]:
        loop = asyncio.get_running_loop()
        path = f"/ws/group/{GROUP}/"
        sockets = [
            *await open_swarm(a.host, a.port, [path] * (SOCKETS // 2), on_message=tally.on_message),
            *await open_swarm(b.host, b.port, [path] * (SOCKETS // 2), on_message=tally.on_message),
        ]
        try:
            # The pid comes once the socket's membership is registered on the layer.
            await _until(
                lambda: len(tally.pid) == SOCKETS,
                20,
                lambda: (
                    f"{SOCKETS - len(tally.pid)} sockets never reported their worker; "
                    f"logs:\n{a.log_tail()}\n{b.log_tail()}"
                ),
            )

            async def send(server: GunicornServer, start: int, count: int, size: int) -> int:
                await asyncio.to_thread(_broadcast, server, start, count, size)
                end = start + count
                await _until(
                    lambda: not tally.behind(sockets, end),
                    30,
                    lambda: f"{len(tally.behind(sockets, end))} sockets short of {end} messages",
                )
                return end

            # Several broadcasts, from a worker of each master in turn.
            seq = 0
            for server in (a, b, a, b):
                seq = await send(server, seq, 3, 64)

            # A client that reads nothing more: its TCP window fills, then the transport
            # buffer, then its outbox, with 80 x 64 KB (5 MB) from master b's workers.
            stalled, hello = await asyncio.to_thread(
                stalled_socket, a.host, a.port, f"{path}?also={STALL_GROUP}"
            )
            await asyncio.to_thread(_broadcast, b, STALL_SEQ, 80, 65536, STALL_GROUP)
            await _until(
                lambda: _overflow_lines(masters) > 0,
                20,
                lambda: f"no 1013 logged; log:\n{a.log_tail()}",
            )
            # The others meanwhile, and after: more than OUTBOX further messages to the
            # closing socket, which must neither get them nor overflow again.
            for server in (a, b, a):
                seq = await send(server, seq, 10, 64)
            await asyncio.sleep(0.3)  # room for a duplicate to arrive
            got, close_code = await loop.run_in_executor(None, drain_frames, stalled, 10.0)
            stalled.close()
            stalled_seqs = [int(str(m).partition(" ")[0]) for m in got]
            return sockets, seq, hello, stalled_seqs, close_code
        finally:
            for sock in sockets:
                if sock.transport is not None:
                    sock.transport.abort()

    sockets, total, hello, stalled_seqs, close_code = asyncio.run(main())

    spread = collections.Counter(tally.pid.values())
    assert set(spread) == workers, (spread, workers)
    assert min(spread.values()) >= SOCKETS // 2 - WORKER_CONNECTIONS, spread
    expected = list(range(total))
    wrong = [s for s in sockets if tally.seqs[s] != expected]
    assert not wrong, (
        f"{len(wrong)} sockets missed, repeated or reordered messages, e.g. "
        f"{collections.Counter(tally.seqs[wrong[0]])}"
    )
    assert json.loads(hello)["pid"] in child_pids(a.master_pid)
    # What the stalled socket had been sent before its close: its group's messages in order,
    # none skipped, then the 1013 close frame behind them; nothing after it.
    assert stalled_seqs == list(range(STALL_SEQ, STALL_SEQ + len(stalled_seqs)))
    assert OUTBOX < len(stalled_seqs) < 80, len(stalled_seqs)
    assert close_code == 1013
    assert _overflow_lines(masters) == 1, [s.log_tail() for s in masters]
    print(
        f"\n{SOCKETS} sockets over workers {dict(spread)}; {total} broadcasts each, exactly "
        f"once; stalled socket got {len(stalled_seqs)} then 1013"
    )
