"""Bursts of HTTP job starts: many `POST /jobs/start` at once, over real connections on 127.0.0.1, against a real app
under uvicorn in a process of its own (`tests/_burst_app.py`), the client on plain asyncio sockets in this process.
Every start is answered, an accepted one (201) ends in one terminal state in the SQLite file, a refused one (503, over
`WorkerConfig.max_waiting_jobs`) says when to try again and is in the file nowhere. The sizes at which bursts were
measured (thousands of starts) are `bench/http_burst.py`'s (docs/performance.md, "Bursts of HTTP job starts")."""
import asyncio, json, os, re, signal, sqlite3, subprocess, sys, time
from contextlib import closing

import httpx, pytest

pytestmark = pytest.mark.timeout(120)

TESTS = os.path.dirname(os.path.abspath(__file__))
GUARD = 60  # seconds: a hang guard, never a speed assertion
TERMINAL = ('completed', 'failed', 'cancelled')


@pytest.fixture
def burst_app(tmp_path):
    "`uvicorn _burst_app:app` on a free port of 127.0.0.1: (base URL, SQLite file, process); stopped after the test."
    db = str(tmp_path / 'jobs.db')
    env = {**os.environ, 'B_DB': db, 'B_MAX_WAITING': '50',
           'PYTHONPATH': os.pathsep.join(filter(None, [TESTS, os.environ.get('PYTHONPATH')]))}
    log = open(tmp_path / 'app.log', 'w+')
    p = subprocess.Popen([sys.executable, '-m', 'uvicorn', '_burst_app:app', '--host', '127.0.0.1', '--port', '0',
                          '--no-access-log'], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    end, port = time.monotonic() + GUARD, None
    while port is None:
        assert p.poll() is None and time.monotonic() < end, f"the app did not start:\n{open(log.name).read()}"
        if m := re.search(r'Uvicorn running on http://127\.0\.0\.1:(\d+)', open(log.name).read()): port = int(m.group(1))
        else: time.sleep(0.05)
    yield f'http://127.0.0.1:{port}', db, p
    if p.poll() is None: p.kill(); p.wait(10)
    log.close()


async def start_at_once(port:int, n:int)->list:
    "`n` connections opened at once, each sending one JSON start (Connection: close); [(status, headers, body)]."
    async def one(i):
        body = json.dumps({'plugin_id': 'echo', 'params': {'text': f'burst {i}'}}).encode()
        async with asyncio.timeout(GUARD):
            r, w = await asyncio.open_connection('127.0.0.1', port)
            w.write(f'POST /jobs/start HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\naccept: application/json\r\n'
                    f'content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n'.encode() + body)
            data = await r.read()
            w.close()
        head, _, payload = data.partition(b'\r\n\r\n')
        status, *lines = head.decode().split('\r\n')
        return int(status.split()[1]), {k.lower(): v for k, v in (l.split(': ', 1) for l in lines)}, payload
    return await asyncio.gather(*(one(i) for i in range(n)))


def file_rows(db)->dict:
    with closing(sqlite3.connect(db)) as x: return dict(x.execute("SELECT id, status FROM jobs_demo"))


async def test_every_start_of_a_burst_is_answered_and_every_accepted_job_ends_once(burst_app):
    url, db, proc = burst_app
    answers = await start_at_once(int(url.rsplit(':', 1)[1]), 300)
    assert {s for s, _, _ in answers} <= {201, 503}, sorted({s for s, _, _ in answers})
    accepted = [json.loads(b)['id'] for s, _, b in answers if s == 201]
    refused = [(h, b) for s, h, b in answers if s == 503]
    assert accepted  # (how many of the 300 are refused depends on how fast the workers empty the line)
    assert all(h.get('retry-after') and 'max_waiting_jobs' in json.loads(b)['error'] for h, b in refused)
    async with httpx.AsyncClient(base_url=url, timeout=GUARD) as c:  # the app takes starts again once they have run
        end = time.monotonic() + GUARD
        while (h := (await c.get('/jobs/health')).json())['queued'] or h['running']:
            assert time.monotonic() < end, h
            await asyncio.sleep(0.05)
        again = await c.post('/jobs/start', json={'plugin_id': 'echo', 'params': {'text': 'after'}}, headers={'accept': 'application/json'})
        assert again.status_code == 201, again.text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(GUARD) in (0, -signal.SIGTERM)  # (uvicorn re-raises the signal once it has shut down)
    rows = file_rows(db)
    assert set(rows) == {*accepted, again.json()['id']}  # every accepted start kept, no refused one created
    assert all(rows[j] in TERMINAL for j in accepted), {j: rows[j] for j in accepted if rows[j] not in TERMINAL}
    print(f"300 starts at once: {len(accepted)} accepted and ended ({set(rows[j] for j in accepted)}), {len(refused)} refused with 503")
