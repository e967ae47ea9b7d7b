"""`cjm_workers.fasthtml.sse` over real HTTP: a FastHTML app under uvicorn on 127.0.0.1, httpx streaming clients
(and one raw socket that never reads), and a real `ReferenceJobManager` with its worker process.

Most servers run in this process on the test's event loop, the way an app runs its manager and broadcaster on one
loop. The shutdown test runs the app as a subprocess and sends it a real signal, as Ctrl-C or a process manager would.
"""
import asyncio, json, os, signal, socket, subprocess, sys, threading
from contextlib import asynccontextmanager

import httpx, pytest
from fasthtml.common import FastHTML, Div, P, to_xml
from cjm_workers.fasthtml.sse import DROPPED, RESET, SSEBroadcaster
from cjm_workers.testing import ReferenceJobManager, wait_until
import _f_scenarios

STEP = 20  # seconds any single wait may take before the test fails (a guard, not a measurement)


def make_app(bc: SSEBroadcaster, render=None, event_name=None):
    app = FastHTML()
    @app.get('/events')
    def events(request, job: str = None): return bc.stream(request, job_id=job, render=render, event_name=event_name)
    return app


def serve(app, bc: SSEBroadcaster):
    "Run `app` under uvicorn on this event loop on a free 127.0.0.1 port; yields the base URL."
    # a server run inside a program (no signal handlers of its own) ends open streams with `bc.close()`
    return _f_scenarios.serve(app, before_exit=bc.close, timeout=STEP)


class SSEReader:
    "Parse the SSE stream of an httpx response: `await next()` gives {'id', 'event', 'data'} (None at the end)."
    def __init__(self, resp: httpx.Response):
        self.resp, self.lines = resp, resp.aiter_lines()
        self.comments, self.retry = [], None

    async def next(self):
        ev = {}
        async with asyncio.timeout(STEP):
            async for line in self.lines:
                if line == '':
                    if ev: return ev
                    continue
                if line.startswith(':'):
                    self.comments.append(line[1:].strip())
                    continue
                k, _, v = line.partition(':')
                v = v[1:] if v.startswith(' ') else v
                if k == 'data': ev['data'] = ev['data'] + '\n' + v if 'data' in ev else v
                elif k in ('id', 'event'): ev[k] = v
                elif k == 'retry': self.retry = int(v)
        return None

    async def take(self, n): return [await self.next() for _ in range(n)]


@asynccontextmanager
async def sse(client: httpx.AsyncClient, path: str, headers=None):
    "Open an SSE stream; yields an `SSEReader` once the response headers (and the `retry:` line) arrived."
    async with client.stream('GET', path, headers=headers) as r:
        assert r.status_code == 200 and r.headers['content-type'].startswith('text/event-stream')
        yield SSEReader(r)


def payload(ev): return json.loads(ev['data'])


async def test_events_arrive_in_order_with_ids():
    bc = SSEBroadcaster()
    async with serve(make_app(bc), bc) as url, httpx.AsyncClient(base_url=url, timeout=STEP) as cli:
        async with sse(cli, '/events') as a, sse(cli, '/events') as b:
            await wait_until(lambda: bc.clients == 2, STEP)
            first = bc.last_id + 1
            for i in range(20):
                assert await bc.broadcast('demo:progress', {'job_id': 'j', 'i': i}) == 2
            for reader in (a, b):
                evs = await reader.take(20)
                assert [int(e['id']) for e in evs] == list(range(first, first + 20))
                assert {e['event'] for e in evs} == {'demo:progress'}
                assert [payload(e) for e in evs] == [{'type': 'demo:progress', 'data': {'job_id': 'j', 'i': i}} for i in range(20)]
                assert reader.retry == 1000
        await wait_until(lambda: bc.clients == 0, STEP)  # closing the client frees its subscription


async def test_job_filter():
    bc = SSEBroadcaster()
    async with serve(make_app(bc), bc) as url, httpx.AsyncClient(base_url=url, timeout=STEP) as cli:
        async with sse(cli, '/events?job=a') as only_a, sse(cli, '/events') as every:
            await wait_until(lambda: bc.clients == 2, STEP)
            for i, jid in enumerate(['a', 'b', None, 'a', 'b', 'a']):
                await bc.broadcast('demo:chunk', {'i': i} if jid is None else {'job_id': jid, 'i': i})
            evs = await only_a.take(3)
            assert [payload(e)['data'] for e in evs] == [{'job_id': 'a', 'i': 0}, {'job_id': 'a', 'i': 3}, {'job_id': 'a', 'i': 5}]
            ids = [int(e['id']) for e in evs]
            assert ids == sorted(ids) and len(set(ids)) == 3
            assert [payload(e)['data']['i'] for e in await every.take(6)] == list(range(6))


async def test_reconnect_with_last_event_id_misses_nothing():
    bc = SSEBroadcaster()
    async with serve(make_app(bc), bc) as url, httpx.AsyncClient(base_url=url, timeout=STEP) as cli:
        async with sse(cli, '/events?job=r') as r:
            await wait_until(lambda: bc.clients == 1, STEP)
            for i in range(5): await bc.broadcast('demo:chunk', {'job_id': 'r', 'i': i})
            seen = await r.take(5)
        await wait_until(lambda: bc.clients == 0, STEP)
        for i in range(5, 10): await bc.broadcast('demo:chunk', {'job_id': 'r', 'i': i})  # nobody is listening
        async with sse(cli, '/events?job=r', headers={'Last-Event-ID': seen[-1]['id']}) as r:
            await wait_until(lambda: bc.clients == 1, STEP)
            await bc.broadcast('demo:chunk', {'job_id': 'r', 'i': 10})
            seen += await r.take(6)
        assert [payload(e)['data']['i'] for e in seen] == list(range(11))
        assert [int(e['id']) for e in seen] == sorted(int(e['id']) for e in seen)
        # the query parameter does the same (for pages that open a new EventSource) ...
        async with sse(cli, f"/events?job=r&last_event_id={seen[7]['id']}") as r:
            assert [payload(e)['data']['i'] for e in await r.take(3)] == [8, 9, 10]
        # ... but a reconnecting browser's header wins over the URL it was first given
        async with sse(cli, f"/events?job=r&last_event_id={seen[0]['id']}", headers={'Last-Event-ID': seen[7]['id']}) as r:
            assert [payload(e)['data']['i'] for e in await r.take(3)] == [8, 9, 10]
        assert (await cli.get('/events?last_event_id=soon')).status_code == 400


async def test_resume_after_the_buffer_moved_on_starts_with_reset():
    bc = SSEBroadcaster(history_size=4)
    async with serve(make_app(bc), bc) as url, httpx.AsyncClient(base_url=url, timeout=STEP) as cli:
        first = bc.last_id + 1
        for i in range(10): await bc.broadcast('demo:chunk', {'job_id': 'r', 'i': i})
        async with sse(cli, '/events', headers={'Last-Event-ID': str(first)}) as r:
            evs = await r.take(5)
        assert evs[0]['event'] == RESET and 'id' not in evs[0]
        assert payload(evs[0])['data']['last_event_id'] == first
        assert [payload(e)['data']['i'] for e in evs[1:]] == [6, 7, 8, 9]  # what the buffer still holds
        # an id from an earlier run of the server (ids are time-based, so an older run's are smaller) and a foreign one
        for stale in (str(first - 10_000_000), 'abc'):
            async with sse(cli, '/events', headers={'Last-Event-ID': stale}) as r:
                assert (await r.next())['event'] == RESET


async def test_slow_client_is_dropped_and_fast_client_keeps_receiving():
    bc = SSEBroadcaster(max_queue_size=8, heartbeat_seconds=0)
    async with serve(make_app(bc), bc) as url, httpx.AsyncClient(base_url=url, timeout=STEP) as cli:
        port = int(url.rsplit(':', 1)[1])
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, and it never reads
        slow.connect(('127.0.0.1', port))
        slow.sendall(b'GET /events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n')
        try:
            async with sse(cli, '/events') as fast:
                await wait_until(lambda: bc.clients == 2, STEP)
                big, reached, got, i = 'x' * 65536, [], [], 0
                while bc.clients == 2 and i < 3000:
                    reached.append(bc.publish('demo:chunk', {'job_id': 'j', 'i': i, 'blob': big}))  # synchronous: cannot wait
                    got.append(await fast.next())
                    i += 1
                assert bc.clients == 1, "the slow client was never dropped"
                for j in range(i, i + 8):  # after the drop, broadcasting carries on for the fast client alone
                    reached.append(bc.publish('demo:chunk', {'job_id': 'j', 'i': j, 'blob': big}))
                got += await fast.take(8)  # a burst as large as its queue: it keeps up
                assert [payload(e)['data']['i'] for e in got] == list(range(i + 8))
                assert reached[0] == 2 and reached[-8:] == [1] * 8
        finally: slow.close()


async def test_a_dropped_stream_says_so_before_it_ends():
    """UAT finding: during a token burst a job's stream ended mid-job with no word; an API client took the end of the
    stream for the end of the job. Now a dropped stream sends what was queued, then a `dropped` event naming the last
    id sent, so the client resumes from it (a browser reconnects by itself)."""
    bc = SSEBroadcaster(max_queue_size=8, heartbeat_seconds=0, flush_interval=0)
    async with serve(make_app(bc), bc) as url, httpx.AsyncClient(base_url=url, timeout=STEP) as cli:
        async with sse(cli, '/events?job=j') as r:
            await wait_until(lambda: bc.clients == 1, STEP)
            for i in range(20): bc.publish('demo:chunk', {'job_id': 'j', 'i': i})  # one step of the loop: 9 do not fit
            evs = await r.take(9)
        assert [payload(e)['data']['i'] for e in evs[:8]] == list(range(8))
        assert evs[8]['event'] == DROPPED and 'id' not in evs[8]
        d = payload(evs[8])['data']
        assert d['last_event_id'] == int(evs[7]['id']) and 'read too slowly' in d['reason'] and d['job_id'] == 'j'
        async with sse(cli, '/events?job=j', headers={'Last-Event-ID': str(d['last_event_id'])}) as r:
            assert [payload(e)['data']['i'] for e in await r.take(12)] == list(range(8, 20))  # resumed: nothing lost


async def test_heartbeats_on_an_idle_stream():
    bc = SSEBroadcaster(heartbeat_seconds=0.05)
    async with serve(make_app(bc), bc) as url, httpx.AsyncClient(base_url=url, timeout=STEP) as cli:
        async with sse(cli, '/events') as r:
            async with asyncio.timeout(STEP):
                async for line in r.lines:
                    if line.startswith(':'): r.comments.append(line[1:].strip())
                    if len(r.comments) >= 3: break
            assert r.comments == ['heartbeat'] * 3


async def test_rendered_html_events():
    def render(ev):
        if ev.data.get('progress') is None: return None  # nothing to show for this event
        return Div(P(f"{ev.data['progress']:.0%}"), P('line two'), id=f"job-{ev.data['job_id']}", hx_swap_oob='true')
    bc = SSEBroadcaster()
    async with serve(make_app(bc, render=render, event_name='job'), bc) as url, httpx.AsyncClient(base_url=url, timeout=STEP) as cli:
        async with sse(cli, '/events') as r:
            await wait_until(lambda: bc.clients == 1, STEP)
            await bc.broadcast('demo:started', {'job_id': 'h'})
            await bc.broadcast('demo:progress', {'job_id': 'h', 'progress': 0.25})
            ev = await r.next()
        html = to_xml(render(type('E', (), {'data': {'job_id': 'h', 'progress': 0.25}})))
        assert '\n' in html  # several lines: each went out as its own `data:` line and came back joined
        assert ev['event'] == 'job' and ev['data'] == html and int(ev['id']) == bc.last_id


async def test_publish_from_another_thread():
    bc = SSEBroadcaster()
    async with serve(make_app(bc), bc) as url, httpx.AsyncClient(base_url=url, timeout=STEP) as cli:
        async with sse(cli, '/events?job=t') as r:
            await wait_until(lambda: bc.clients == 1, STEP)
            t = threading.Thread(target=lambda: [bc.publish('demo:chunk', {'job_id': 't', 'i': i}) for i in range(200)])
            t.start()
            evs = await r.take(200)
            t.join()
        assert [payload(e)['data']['i'] for e in evs] == list(range(200))


async def test_real_manager_events_reach_an_sse_client():
    bc = SSEBroadcaster()
    mgr = ReferenceJobManager(event_broadcaster=bc)
    try:
        await mgr.start(wait=True)
        async with serve(make_app(bc), bc) as url, httpx.AsyncClient(base_url=url, timeout=STEP) as cli:
            streams = {}
            for plugin, kw in (('transcribe', dict(steps=3, delay=0.01)), ('tokens', dict(text='one two three', delay=0.01))):
                before = bc.last_id  # resume from here: the stream replays 'pending', which came before it connected
                job = await mgr.start_job(plugin, **kw)
                streams[plugin] = (job, f"/events?job={job.id}&last_event_id={before}")
            got = {}
            for plugin, (job, path) in streams.items():
                async with sse(cli, path) as r:
                    evs = []
                    while not evs or evs[-1]['event'].split(':', 1)[1] not in ('completed', 'failed', 'cancelled'):
                        evs.append(await r.next())
                got[plugin] = evs
                assert {payload(e)['data']['job_id'] for e in evs} == {job.id}
            names = {p: [e['event'] for e in evs] for p, evs in got.items()}
            assert names['transcribe'] == ['reference:pending', 'reference:started'] + ['reference:progress'] * 3 + ['reference:completed']
            assert names['tokens'] == ['reference:pending', 'reference:started'] + ['reference:chunk'] * 3 + ['reference:completed']
            assert [payload(e)['data']['progress'] for e in got['transcribe'][2:5]] == pytest.approx([1 / 3, 2 / 3, 1.0])
            assert ''.join(payload(e)['data']['chunk'] for e in got['tokens'][2:5]) == 'one two three'
            assert payload(got['tokens'][-1])['data']['result']['text'] == 'one two three'
    finally: await mgr.ashutdown()


APP = r'''
import socket, sys, uvicorn
from fasthtml.common import FastHTML
from cjm_workers.fasthtml.sse import SSEBroadcaster

bc = SSEBroadcaster(heartbeat_seconds=0)
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
sock.bind(('127.0.0.1', 0))

async def lifespan(app):
    print('READY', sock.getsockname()[1], flush=True)
    yield
    bc.close()
    print('LIFESPAN-SHUTDOWN', flush=True)

app = FastHTML(lifespan=lifespan)
@app.get('/events')
def events(request): return bc.stream(request)
@app.get('/clients')
def clients(): return str(bc.clients)

uvicorn.Server(uvicorn.Config(app, log_level='warning')).run(sockets=[sock])
'''


@pytest.mark.parametrize('sig', ['SIGINT', 'SIGTERM'])
async def test_server_shutdown_with_open_streams_finishes(sig):
    proc = await asyncio.create_subprocess_exec(sys.executable, '-c', APP, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        async with asyncio.timeout(STEP): line = (await proc.stdout.readline()).decode()
        assert line.startswith('READY'), line + (await proc.stderr.read()).decode()
        url = f"http://127.0.0.1:{int(line.split()[1])}"
        async with httpx.AsyncClient(base_url=url, timeout=STEP) as cli:
            async with sse(cli, '/events') as a, sse(cli, '/events') as b, sse(cli, '/events') as c:
                async with asyncio.timeout(STEP):
                    while (await cli.get('/clients')).text != '3': await asyncio.sleep(0.01)
                proc.send_signal(getattr(signal, sig))
                for r in (a, b, c):  # each stream says the server ended it, then ends
                    assert (await r.next())['event'] == 'closed'
                    assert await r.next() is None
        async with asyncio.timeout(STEP): out, err = await proc.communicate()
        # uvicorn shuts down gracefully (the lifespan shutdown ran), then re-raises the signal it caught
        assert out.decode().split() == ['LIFESPAN-SHUTDOWN'], err.decode()
        assert proc.returncode == -getattr(signal, sig), err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_long_replay_is_rendered_in_slices_that_let_the_loop_serve_others():
    """SSE review (2026-12-07): a stream resuming from an old id rendered its whole replay in one go on the event loop
    (1,000 events with a store read each held a health check up for a third of a second). It renders a slice at a
    time now: here a task ticking on the same loop moves on while the replay is rendered."""
    bc = SSEBroadcaster(history_size=2000)
    ticks, seen = [0], []
    def render(ev):
        seen.append(ticks[0])
        return P(str(ev.data['i']))
    async def ticker():
        while True:
            await asyncio.sleep(0)
            ticks[0] += 1
    first = bc.last_id + 1
    for i in range(1000): await bc.broadcast('demo:progress', {'job_id': 'j', 'i': i})
    tick = asyncio.ensure_future(ticker())
    try:
        async with serve(make_app(bc, render=render), bc) as url, httpx.AsyncClient(base_url=url, timeout=STEP) as cli:
            async with sse(cli, '/events', headers={'Last-Event-ID': str(first - 1)}) as r:
                evs = await r.take(1000)
        assert [int(e['id']) for e in evs] == list(range(first, first + 1000))
        assert len(set(seen[:1000])) >= 10, sorted(set(seen[:1000]))  # (one go: the same tick for all of them)
    finally: tick.cancel()


def test_the_ledger_keeps_less_than_100_bytes_an_event_and_still_tells_who_missed_nothing():
    """Review (2026-12-07): the ledger (type and job id of the events the history let go, 16 x history_size) kept each
    event's id and its own type string (the manager builds one per event): measured 185 bytes an event, 3 MB per
    broadcaster at the defaults, where docs/fasthtml.md says about 100. It now keeps a type once and no id (the ids of
    its events run on up to the history's first): about 64 bytes an event. What it tells is unchanged (checked too)."""
    import gc, tracemalloc, uuid
    bc = SSEBroadcaster(heartbeat_seconds=0, history_size=256)  # ledger: 4,096 events
    mine, other, wt = uuid.uuid4().hex, uuid.uuid4().hex, 'transcription'
    def pub(n, jid):
        for i in range(n): bc.publish(f"{wt}:{'chunk'}", {'job_id': jid, 'chunk': 'w ', 'offset': 7})  # a new type string each
    pub(256, other)  # the history is full, the ledger empty
    pub(1, other)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        pub(4095, other)  # the ledger fills
        gc.collect()
        grew = tracemalloc.get_traced_memory()[0] - before
    finally: tracemalloc.stop()
    assert len(bc._ledger) == 4096 and grew < 4095 * 100, grew / 4095
    # what it tells is unchanged: a job's stream that missed only other jobs' events (past the history) is not reset,
    bc.publish(f'{wt}:progress', {'job_id': mine})
    last = bc.last_id
    pub(1000, other)
    assert bc.can_replay(last, mine) and not bc.can_replay(last)  # (a stream of every event missed some)
    # one that missed one of its own is; and a `wants_by_job` stream that missed only what it does not take is not
    bc.publish(f'{wt}:progress', {'job_id': mine})
    pub(1000, other)
    assert not bc.can_replay(last, mine)
    no_chunks = lambda ev: not ev.type.endswith(':chunk')
    assert bc.subscribe(None, bc.last_id - 500, wants=no_chunks, wants_by_job=True).reset is False
    assert bc.subscribe(None, last, wants=no_chunks, wants_by_job=True).reset is True
    assert bc.subscribe(None, bc.last_id - 500, wants=no_chunks).reset is True  # (without wants_by_job: as before)
