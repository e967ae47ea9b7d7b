"""A real app's life cycle under uvicorn: `tests/_l_app.py` (a `BaseJobManager` subclass on the reference plugins, a
pool of 2 workers, a SQLite store, the library's routes) served by `python -m uvicorn` in a subprocess on 127.0.0.1,
driven over real HTTP, stopped with SIGINT, SIGTERM or SIGKILL mid-work (jobs running and queued, an SSE client
connected), started again on the same database file, and started twice at once. After each: no worker, writer,
backstop or plugin process is left; every job is in the file and ends in one terminal state with a truthful reason;
the JSON API and the pages agree with the file; nothing ran more often than its retries allow (the `count` plugin
appends each run to a file); the file passes `PRAGMA integrity_check` and is not locked."""
import collections, os, re, signal, sqlite3, subprocess, sys, tempfile, threading, time
from contextlib import closing

import httpx, psutil, pytest
from _a_helpers import UvicornOutput

pytestmark = pytest.mark.timeout(120)

TESTS = os.path.dirname(os.path.abspath(__file__))
J = {'accept': 'application/json'}
GUARD = 30  # seconds: a hang guard, never a speed assertion
TERMINAL = ('completed', 'failed', 'cancelled')


class App(UvicornOutput):
    "`uvicorn _l_app:app` in a subprocess on a free port of 127.0.0.1 (`url` once it serves, or `port` None if it exited)."
    def __init__(self, db, *args, wait=True, env=None):
        self.db, self.runs = db, db + '.runs'
        env = {**os.environ, **(env or {}), 'L_DB': db, 'L_RUNS': self.runs,
               'PYTHONPATH': os.pathsep.join(filter(None, [TESTS, os.environ.get('PYTHONPATH')]))}
        self.proc = subprocess.Popen([sys.executable, '-m', 'uvicorn', '_l_app:app', '--host', '127.0.0.1', '--port', '0',
                                      '--no-access-log', *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.seen = {}
        self._follow()
        threading.Thread(target=self._watch, daemon=True).start()
        if wait:
            assert self._ready.wait(60), self.log()
            assert self.port is not None, "the app exited:\n" + self.log()
        self.url = f'http://127.0.0.1:{self.port}'

    def _watch(self):
        "Note every process the app's tree ever had (workers, the store's writer, backstops, plugin children)."
        while self.proc.poll() is None:
            try:
                for p in psutil.Process(self.proc.pid).children(recursive=True): self.seen.setdefault(p.pid, p)
            except psutil.NoSuchProcess: pass
            time.sleep(0.02)

    def log(self): return ''.join(self.lines)

    def stop(self, sig)->float:
        "Send `sig`; its exit code (after waiting for the exit)."
        self.proc.send_signal(sig)
        return self.proc.wait(GUARD)

    def left(self, timeout=10.0)->list:
        "The processes of its tree still alive `timeout` seconds after the app ended (at most)."
        end = time.monotonic() + timeout
        while True:
            alive = [p for p in self.seen.values() if _alive(p)]
            if not alive or time.monotonic() > end: return [(p.pid, p.name()) for p in alive if _alive(p)]
            time.sleep(0.05)

    def kill(self):
        for p in [psutil.Process(self.proc.pid) if self.proc.poll() is None else None, *self.seen.values()]:
            try:
                if p is not None: p.kill()
            except psutil.NoSuchProcess: pass
        if self.proc.poll() is None: self.proc.wait(10)


def _alive(p):
    try: return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return False


@pytest.fixture
def app():
    "Start apps (`app(db, *uvicorn_args)`); all are killed, with their trees, after the test."
    made = []
    def make(*a, **kw):
        made.append(App(*a, **kw))
        return made[-1]
    yield make
    for a in made: a.kill()


@pytest.fixture
def db():
    return os.path.join(tempfile.mkdtemp(prefix='cjm-life-'), 'jobs.db')


def start(c, plugin, params=None, **scheduling)->str:
    r = c.post('/jobs/start', json={'plugin_id': plugin, 'params': {**(params or {}), **scheduling}}, headers=J)
    assert r.status_code == 201, r.text
    return r.json()['id']


def job(c, jid)->dict:
    r = c.get(f'/jobs/{jid}', headers=J)
    assert r.status_code == 200, r.text
    return r.json()


def until(c, jid, pred, what):
    end = time.monotonic() + GUARD
    while not pred(j := job(c, jid)):
        assert time.monotonic() < end, f"job {jid} never {what}: {j}"
        time.sleep(0.02)
    return j


def rows(db)->dict:
    "id → (status, reason, attempts), read from the file itself."
    with closing(sqlite3.connect(db)) as x:
        try: return {r[0]: r[1:] for r in x.execute("SELECT id, status, reason, attempts FROM jobs_life")}
        except sqlite3.OperationalError as e:  # (the table comes with the first batch written)
            if 'no such table' in str(e): return {}
            raise


def in_file(db, want:dict):
    """Wait until the file has each job of `want` (id → status): a state is written a batch after it changes, and the
    test that kills the app waits for the file (a job's first row is in it when the start route answers: see
    `test_the_start_route_answers_once_the_job_is_in_the_file` in test_routes; its later states come a batch later)."""
    end = time.monotonic() + GUARD
    while any(rows(db).get(jid, (None,))[0] != status for jid, status in want.items()):
        assert time.monotonic() < end, f"the file never said {want}: {rows(db)}"
        time.sleep(0.01)


def runs(a)->collections.Counter:
    "How many times the `count` plugin really ran each job."
    return collections.Counter(open(a.runs).read().split()) if os.path.exists(a.runs) else collections.Counter()


def check_file(db, clean=True):
    "The file is sound, not locked (a write goes through at once), and (after a clean stop) no start journal or log is left."
    with closing(sqlite3.connect(db, timeout=0)) as x:
        assert x.execute('PRAGMA integrity_check').fetchall() == [('ok',)]
        x.execute('BEGIN IMMEDIATE')
        x.rollback()
    left = [f for f in os.listdir(os.path.dirname(db)) if 'journal' in f or 'started' in f]
    assert not left or not clean, left


def check_served(c, ids):
    "The JSON job, the JSON list and the job table (html) all say what the file says."
    listed = {j['id']: j['status'] for j in c.get('/jobs', headers=J).json()}
    page = c.get('/jobs').text
    for jid in ids:
        status = job(c, jid)['status']
        assert listed[jid] == status, (jid, listed[jid], status)
        m = re.search(rf'<span data-status="(\w+)" id="job-{jid}-', page)
        assert m and m.group(1) == status, (jid, status, m and m.group(0))


class Stream:
    "An SSE client on the job table's stream, in a thread: `lines` as they come."
    def __init__(self, url):
        self.lines, self.open = [], threading.Event()
        self.t = threading.Thread(target=self._run, args=(url,), daemon=True)
        self.t.start()
        assert self.open.wait(GUARD)

    def _run(self, url):
        try:
            with httpx.Client(timeout=GUARD) as c, c.stream('GET', url + '/jobs/stream') as r:
                self.open.set()
                for line in r.iter_lines(): self.lines.append(line)
        except httpx.HTTPError as e: self.lines.append(repr(e))
        finally: self.open.set()


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_work_stops_the_app_cleanly_and_a_restart_runs_what_waited(app, db, sig):
    a = app(db)
    with httpx.Client(base_url=a.url, timeout=GUARD) as c:
        quick = start(c, 'echo', {'text': 'hi'})
        until(c, quick, lambda j: j['status'] == 'completed', 'completed')
        plain = start(c, 'count', {'seconds': 60})                # running at the signal: cancelled
        retried = start(c, 'count', {'seconds': 60}, max_retries=1)  # running, with a retry left: runs again after
        for jid in (plain, retried): until(c, jid, lambda j: j['status'] == 'running', 'ran')
        tokens = start(c, 'tokens', {'text': 'a b c d', 'delay': 0.01})  # queued: run after the restart
        urgent = start(c, 'echo', {'text': 'first'}, priority=5)
        timed = start(c, 'count', {'seconds': 0.05}, timeout_seconds=30)
        stream = Stream(a.url)
        took = time.monotonic()
        assert a.stop(sig) in (0, -sig), a.log()
        took = time.monotonic() - took
    stream.t.join(GUARD)
    assert not stream.t.is_alive() and 'event: closed' in stream.lines, stream.lines  # the server ended the stream
    assert a.left() == [], a.log()
    r = rows(db)
    assert r[quick] == ('completed', None, 1)
    assert r[plain] == ('cancelled', 'the manager shut down', 1)
    assert r[retried] == ('pending', None, 1)                      # its cut-short run is in its attempt_log
    for jid in (tokens, urgent, timed): assert r[jid] == ('pending', None, 0)
    check_file(db)
    print(f"\n{sig.name}: exit {took:.2f} s with 2 jobs running, 3 queued and a stream open")

    b = app(db)  # the same file: the queued jobs run, the stopped one with a retry runs again
    with httpx.Client(base_url=b.url, timeout=GUARD) as c:
        again = until(c, retried, lambda j: j['status'] == 'running' and j['attempts'] == 2, 'ran again')
        assert [e['reason'] for e in again['attempt_log']] == ['interrupted']
        done = {jid: until(c, jid, lambda j: j['status'] in TERMINAL, 'ended') for jid in (tokens, urgent, timed)}
        assert {jid: j['status'] for jid, j in done.items()} == dict.fromkeys(done, 'completed'), done
        assert done[tokens]['result']['text'] == 'a b c d' and done[urgent]['result']['text'] == 'first'
        assert done[urgent]['started_at'] <= done[tokens]['started_at']  # the priority held across the restart
        assert c.post(f'/jobs/{retried}/cancel', headers=J).status_code == 200
        until(c, retried, lambda j: j['status'] == 'cancelled', 'cancelled')
        ids = [quick, plain, retried, tokens, urgent, timed]
        check_served(c, ids)
        served = {jid: job(c, jid)['status'] for jid in ids}
    assert b.stop(signal.SIGTERM) in (0, -signal.SIGTERM), b.log()
    assert b.left() == [], b.log()
    assert {jid: s for jid, (s, _, _) in rows(db).items()} == served  # the file, as the API said
    assert runs(b) == {plain: 1, retried: 2, timed: 1}  # nothing ran more often than its retries allow
    check_file(db)


def test_sigkill_a_quick_restart_and_a_second_copy_on_the_same_file(app, db):
    a = app(db)
    with httpx.Client(base_url=a.url, timeout=GUARD) as c:
        plain = start(c, 'count', {'seconds': 60})
        retried = start(c, 'count', {'seconds': 60}, max_retries=1)
        for jid in (plain, retried): until(c, jid, lambda j: j['status'] == 'running', 'ran')
        queued = [start(c, 'count', {'seconds': 0.05}), start(c, 'echo', {'text': 'e'}, priority=3),
                  start(c, 'tokens', {'text': 'x y', 'delay': 0.01}, timeout_seconds=30, max_retries=2)]
        in_file(db, {plain: 'running', retried: 'running'} | dict.fromkeys(queued, 'pending'))
        assert a.stop(signal.SIGKILL) == -signal.SIGKILL
    b = app(db)  # at once: the dead app's workers and writer may still be ending
    assert a.left() == [], a.log()  # the workers, their backstops and the writer went with the app
    with httpx.Client(base_url=b.url, timeout=GUARD) as c:
        j = until(c, plain, lambda j: j['status'] in TERMINAL, 'ended')
        assert (j['status'], j['reason'], j['attempts']) == ('failed', 'interrupted', 1), j
        assert j['error'].startswith('Interrupted: the process that ran the job ended while it was running'), j
        until(c, retried, lambda j: j['status'] == 'running' and j['attempts'] == 2, 'ran again')
        for jid in queued: assert until(c, jid, lambda j: j['status'] in TERMINAL, 'ended')['status'] == 'completed'

        second = app(db, wait=False)  # another copy on the same file while this one runs: refused, and says why
        assert second.proc.wait(GUARD) == 3, second.log()
        assert second.port is None and 'JobStoreLocked' in second.log(), second.log()
        assert f"belong to another running manager (pid {b.proc.pid} on" in second.log(), second.log()
        assert second.left() == [], second.log()
        assert c.get('/jobs/health').status_code == 200  # the first copy is untouched
        assert until(c, start(c, 'echo', {'text': 'still here'}), lambda j: j['status'] in TERMINAL, 'ended')['status'] == 'completed'

        assert c.post(f'/jobs/{retried}/cancel', headers=J).status_code == 200
        until(c, retried, lambda j: j['status'] == 'cancelled', 'cancelled')
        ids = [plain, retried, *queued]
        check_served(c, ids)
        served = {jid: job(c, jid)['status'] for jid in ids}
    assert b.stop(signal.SIGTERM) in (0, -signal.SIGTERM), b.log()
    assert b.left() == [], b.log()
    for _ in range(2):  # twice more in a row, quickly: nothing changes, nothing is left
        d = app(db)
        with httpx.Client(base_url=d.url, timeout=GUARD) as c: assert {jid: job(c, jid)['status'] for jid in ids} == served
        assert d.stop(signal.SIGINT) in (0, -signal.SIGINT), d.log()
        assert d.left() == [], d.log()
    assert {jid: rows(db)[jid][0] for jid in ids} == served
    assert runs(d)[plain] == 1 and runs(d)[retried] == 2 and runs(d)[queued[0]] == 1
    check_file(db)


def test_uvicorn_workers_2_on_one_file_stops_with_a_clear_error(app, db):
    """docs/fasthtml.md (Deploying): with a SQLite store, `uvicorn --workers 2` fails at startup with JobStoreLocked
    and uvicorn stops the whole server. Nothing is left running, the jobs waiting in the file end truthfully (the
    process that won the lease may have run or begun them before it was stopped), and the file is usable afterwards."""
    first = app(db)
    with httpx.Client(base_url=first.url, timeout=GUARD) as c:
        busy = [start(c, 'count', {'seconds': 60}) for _ in range(2)]
        for jid in busy: until(c, jid, lambda j: j['status'] == 'running', 'ran')
        waiting = [start(c, 'echo', {'text': str(i)}) for i in range(3)]
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM) and first.left() == [], first.log()
    a = app(db, '--workers', '2', wait=False)
    a.proc.wait(60)  # (uvicorn 0.55's supervisor exits with 0 when a worker process fails to start)
    assert 'JobStoreLocked' in a.log() and 'belong to another running manager' in a.log(), a.log()
    assert a.left() == [], a.log()
    r = rows(db)
    assert all(r[j][:2] in (('pending', None), ('completed', None), ('cancelled', 'the manager shut down')) for j in waiting), r
    b = app(db)
    with httpx.Client(base_url=b.url, timeout=GUARD) as c:
        assert until(c, start(c, 'echo', {'text': 'ok'}), lambda j: j['status'] in TERMINAL, 'ended')['status'] == 'completed'
        for jid in waiting:  # what waited still runs; what the refused server stopped stays as it said
            assert until(c, jid, lambda j: j['status'] in TERMINAL, 'ended')['status'] == r[jid][0].replace('pending', 'completed')
    assert b.stop(signal.SIGTERM) in (0, -signal.SIGTERM), b.log()
    assert b.left() == [], b.log()
    check_file(db)


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_cuts_the_lifespans_drain_short(app, db, sig):
    """Found here (2026-12-07): with `WorkerConfig(drain_timeout_seconds=60)` a second Ctrl-C during the drain did
    nothing (uvicorn notes it, but the lifespan's drain ran its full minute): only a SIGKILL ended it sooner, as a
    crash. Now the lifespan's shutdown takes a second SIGINT or SIGTERM as `end_drain()`: what still runs is stopped
    as when the drain timeout passes, the queued jobs stay pending, and the process ends cleanly."""
    a = app(db, env={'L_DRAIN': '60'})
    with httpx.Client(base_url=a.url, timeout=GUARD) as c:
        plain = start(c, 'count', {'seconds': 60})
        retried = start(c, 'count', {'seconds': 60}, max_retries=1)
        for jid in (plain, retried): until(c, jid, lambda j: j['status'] == 'running', 'ran')
        queued = start(c, 'echo', {'text': 'later'})
    a.proc.send_signal(sig)
    end = time.monotonic() + GUARD
    while 'running jobs may finish first' not in a.log():  # the drain has begun (and the lifespan listens)
        assert time.monotonic() < end and a.proc.poll() is None, a.log()
        time.sleep(0.01)
    assert a.stop(sig) in (0, -sig), a.log()  # (before the fix: the 60 s drain outlasted the 30 s guard)
    assert a.left() == [], a.log()
    r = rows(db)
    assert r[plain] == ('cancelled', 'the manager shut down: its drain was cut short before the job finished', 1)
    assert r[retried] == ('pending', None, 1) and r[queued] == ('pending', None, 0)  # both run after the next start
    with closing(sqlite3.connect(db)) as x:
        log_, = x.execute("SELECT attempt_log FROM jobs_life WHERE id = ?", (retried,)).fetchone()
    assert 'its drain was cut short' in log_ and '"interrupted"' in log_, log_
    check_file(db)


@pytest.mark.parametrize('handled', [False, True])
def test_sighup_ends_uvicorn_as_a_crash_unless_the_app_turns_it_into_sigterm(app, db, handled):
    """docs/fasthtml.md (Shutting down): uvicorn handles only SIGINT and SIGTERM, so a SIGHUP (a closed terminal) ends
    the app without its lifespan (the running job stays `running` in the file, for the next start to find
    interrupted), yet leaves no process behind; the one line the docs give makes it a clean shutdown."""
    a = app(db, env={'L_SIGHUP': '1'} if handled else None)
    with httpx.Client(base_url=a.url, timeout=GUARD) as c:
        running = start(c, 'count', {'seconds': 60})
        until(c, running, lambda j: j['status'] == 'running', 'ran')
        queued = [start(c, 'count', {'seconds': 60}), start(c, 'count', {'seconds': 60})]
        until(c, queued[0], lambda j: j['status'] == 'running', 'ran')
        in_file(db, {running: 'running', queued[0]: 'running', queued[1]: 'pending'})
    rc = a.stop(signal.SIGHUP)
    assert a.left() == [], a.log()
    r = rows(db)
    if handled:
        assert rc in (0, -signal.SIGTERM) and 'Application shutdown complete' in a.log(), a.log()
        assert [r[j] for j in (running, *queued)] == [('cancelled', 'the manager shut down', 1)] * 2 + [('pending', None, 0)]
    else:
        assert rc == -signal.SIGHUP and 'Application shutdown complete' not in a.log(), a.log()
        assert [r[j] for j in (running, *queued)] == [('running', None, 1)] * 2 + [('pending', None, 0)]
    check_file(db, clean=handled)  # (after a crash, the start journal waits for the next start)


async def test_a_lifespan_whose_second_manager_cannot_start_stops_the_first(tmp_path):
    """Found here (2026-12-07): `managers_lifespan(m1, m2)` with m2 unable to start (its file held by another copy of
    the app, or not a database) raised, but left m1 started: its workers ran on, taking its stored jobs, in a process
    whose app never served; in a process that goes on (a test's `TestClient`), for good. Now m1 is shut down first."""
    from cjm_workers.managers.base import managers_lifespan
    from cjm_workers.stores.base import JobStoreError
    from cjm_workers.stores.sqlite import SQLiteJobStore
    from cjm_workers.testing import ReferenceJobManager
    (tmp_path / 'b.db').mkdir()  # not a database file: m2's start fails
    threads, kids = {t.name for t in threading.enumerate()}, {p.pid for p in psutil.Process().children(recursive=True)}
    m1 = ReferenceJobManager(worker_type='a', job_store=SQLiteJobStore(str(tmp_path / 'a.db')))
    m2 = ReferenceJobManager(worker_type='b', job_store=SQLiteJobStore(str(tmp_path / 'b.db')))
    try:
        with pytest.raises(JobStoreError, match='the path is a directory'):
            async with managers_lifespan(m1, m2)(): pass
        assert m1._closed  # shut down, not left running
        end = time.monotonic() + GUARD
        while [p for p in psutil.Process().children(recursive=True) if p.pid not in kids and _alive(p)
               and 'resource_tracker' not in ' '.join(p.cmdline())]:
            assert time.monotonic() < end, "m1's workers were left running"
            time.sleep(0.02)
        assert not {t.name for t in threading.enumerate()} - threads - {'asyncio_0', 'asyncio_1'}
        m3 = ReferenceJobManager(worker_type='a', job_store=SQLiteJobStore(str(tmp_path / 'a.db')))
        await m3.start()  # m1's lease was given back
        await m3.ashutdown()
    finally:
        for m in (m1, m2): await m.ashutdown()
