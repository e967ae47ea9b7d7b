"""Fault-injection and abuse scenarios (issue 6), shared by `tests/test_faults.py` (short sizes, in CI) and
`bench/soak.py` (the issue's sizes). Each scenario is `async def scenario(size, seed) -> Outcome`, beats on real
managers, real worker processes, real SQLite files and real HTTP on 127.0.0.1, and records what it broke and what
the invariants found in an `Outcome`, through one checker, `Invariants`:

- every job ends in exactly one terminal state (completed / failed / cancelled) with a reason (failed and cancelled
  jobs carry `reason`, failed ones an `error`; completed ones a result), and exactly one terminal event per job was
  broadcast, naming that state;
- nothing finished is lost: a job's final state read back from the job store (a fresh `SQLiteJobStore` on the file
  where a file is involved) equals what the manager said;
- no orphan process: once everything is shut down, this process has no descendant it did not have before;
- no leaked threads or file descriptors: counted before (after a warm-up run, so lazily created singletons such as
  multiprocessing's resource tracker do not count) and after. Idle threads of executor pools (asyncio's default
  executor, which `ashutdown` uses, and anyio's worker threads, which uvicorn/Starlette use) are not counted: they are
  created on demand, reused, bounded by the pool size and end on their own after an idle timeout; every other thread
  and every file descriptor must be back to its count — tolerance 0;
- the manager keeps serving after each fault: a fresh job completes.

A violated invariant is recorded in `Outcome.violations` (the test asserts the list is empty; the soak counts it).
"""
from __future__ import annotations
import asyncio, contextlib, json, os, queue, random, signal, socket, subprocess, sys, tempfile, threading, time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import httpx, psutil

from cjm_workers.core.config import RestartPolicy, WorkerConfig
from cjm_workers.stores.sqlite import SQLiteJobStore
from cjm_workers.testing import RecordingBroadcaster, ReferenceRegistry, wait_until
from _a_helpers import gone, sigkill_after_first_line
from _f_plugins import FJobManager, hang_factory_worker

TESTS = Path(__file__).resolve().parent
TERMINAL = ('completed', 'failed', 'cancelled')
T = 60  # seconds any single wait may take before a scenario gives up (a guard, not a measurement)
POOL_THREAD_PREFIXES = ('asyncio_', 'AnyIO worker thread', 'ThreadPoolExecutor')


# ----------------------------------------------------------------------------------------------------------------
# Outcome and the invariant checker

@dataclass
class Outcome:
    "What one scenario did and found (one row of the soak table)."
    scenario: str
    jobs: int = 0  # jobs (or requests/messages, for the doors) the scenario pushed through
    faults: int = 0  # faults injected: kills, crashes, drops, cancels, bad inputs
    lost: int = 0  # finished jobs whose stored state differs from what the manager said (or that vanished)
    orphans: int = 0  # descendants left after shutdown
    leaked_fds: int = 0
    leaked_threads: int = 0
    seconds: float = 0.0
    seed: Optional[int] = None
    violations: List[str] = field(default_factory=list)
    notes: str = ''

    def fail(self, msg:str):
        if len(self.violations) < 50: self.violations.append(msg)
        elif len(self.violations) == 50: self.violations.append('... (more)')


def _pool_thread(t:threading.Thread)->bool: return t.name.startswith(POOL_THREAD_PREFIXES)


def counted_threads()->List[str]:
    "Names of this process's threads, without idle executor-pool threads (see the module docstring)."
    return sorted(t.name for t in threading.enumerate() if not _pool_thread(t))


def fd_count()->int: return len(os.listdir('/proc/self/fd'))


def _descendant_pids()->set:
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE: out.add(p.pid)
        except psutil.NoSuchProcess: pass
    return out


class Invariants:
    "The one invariant checker every scenario uses: `await start()`, the checks, then `await finish()`."
    def __init__(self, out:Outcome): self.out = out

    async def start(self):
        "Warm up (one manager, one job, shut down), then take the baseline: threads, fds, descendants."
        m = FJobManager()
        await m.wait_for_job((await m.start_job('echo', text='warm-up')).id, timeout=T)
        await m.ashutdown()
        await self._settle(lambda: True)
        self.threads, self.fds, self.procs = counted_threads(), fd_count(), _descendant_pids()
        self.t0 = time.monotonic()

    async def _settle(self, ok, timeout:float=10.0):
        "Wait (bounded) for `ok()`; threads and processes take a moment to go after their owner stopped them."
        with contextlib.suppress(TimeoutError): await wait_until(ok, timeout, 0.02)

    def jobs(self, jobs:list, events:Optional[RecordingBroadcaster]=None, allowed=TERMINAL, prefix:str='',
             check=None)->Counter:
        "Every job terminal, once, with a reason; one terminal event each (if `events`); `check(job)` → message or None."
        by = Counter()
        if events is not None:
            for t, d in events.events:
                kind = t.split(':', 1)[1]
                if kind in TERMINAL: by[(d.get('job_id'), kind)] += 1
        statuses = Counter()
        for j in jobs:
            statuses[j.status] += 1
            if j.status not in allowed:
                self.out.fail(f"{prefix}job {j.id} ({j.plugin_id}) ended {j.status!r}, expected one of {allowed}")
                continue
            if j.status in ('failed', 'cancelled') and not j.reason:
                self.out.fail(f"{prefix}job {j.id} is {j.status} without a reason")
            if j.status == 'failed' and not j.error: self.out.fail(f"{prefix}job {j.id} failed without an error")
            if j.status == 'completed' and j.result is None: self.out.fail(f"{prefix}job {j.id} completed without a result")
            if events is not None:
                got = {k: by[(j.id, k)] for k in TERMINAL if by[(j.id, k)]}
                if got != {j.status: 1}:
                    self.out.fail(f"{prefix}job {j.id} is {j.status} but its terminal events were {got}")
            if check is not None and (msg := check(j)): self.out.fail(f"{prefix}job {j.id}: {msg}")
        return statuses

    def stored(self, jobs:list, store)->int:
        "Nothing finished is lost: each job read back from `store` has the status (and result) the manager gave it."
        lost = 0
        for j in jobs:
            s = store.get(j.id)
            if s is None or s.status != j.status or (j.status == 'completed' and s.result != j.result) or s.reason != j.reason:
                lost += 1
                self.out.fail(f"job {j.id} is {j.status} but the store has "
                              f"{None if s is None else (s.status, s.reason)}")
        self.out.lost += lost
        return lost

    async def serves(self, mgr, what:str='', plugin_id:str='echo'):
        "The manager keeps serving: a fresh job completes."
        try:
            j = await mgr.wait_for_job((await mgr.start_job(plugin_id, text='still serving')).id, timeout=T)
            if j.status != 'completed' or j.result['text'] != 'still serving':
                self.out.fail(f"after {what or 'the faults'} a fresh job ended {j.status}: {j.error}")
        except Exception as e:
            self.out.fail(f"after {what or 'the faults'} the manager no longer serves: {type(e).__name__}: {e}")

    async def finish(self)->Outcome:
        "After everything was shut down: no orphan, no leaked thread or fd. Fills the outcome's counts."
        await self._settle(lambda: not (_descendant_pids() - self.procs))
        orphans = _descendant_pids() - self.procs
        for pid in orphans:
            try: self.out.fail(f"orphan process {pid}: {' '.join(psutil.Process(pid).cmdline())[:120]}")
            except psutil.Error: pass
            with contextlib.suppress(psutil.Error): psutil.Process(pid).kill()
        self.out.orphans = len(orphans)
        await self._settle(lambda: counted_threads() == self.threads and fd_count() <= self.fds)
        extra = Counter(counted_threads()) - Counter(self.threads)
        self.out.leaked_threads = sum(extra.values())
        if extra: self.out.fail(f"leaked threads: {dict(extra)}")
        self.out.leaked_fds = max(0, fd_count() - self.fds)
        if self.out.leaked_fds: self.out.fail(f"leaked {self.out.leaked_fds} file descriptors: {_fds()}")
        self.out.seconds = time.monotonic() - self.t0
        return self.out


def _fds()->list:
    out = []
    for fd in os.listdir('/proc/self/fd'):
        with contextlib.suppress(OSError): out.append(os.readlink(f'/proc/self/fd/{fd}'))
    return sorted(out)[-20:]


def reread(db:Path):
    "A fresh store on the file `db` (the reference manager's table), for reading jobs back; close it after use."
    store = SQLiteJobStore(db)
    store.bind('reference')
    return store


def events_of(events:RecordingBroadcaster, job_id:str, kind:str)->list:
    return [d for t, d in events.events if d.get('job_id') == job_id and t.endswith(':' + kind)]


# ----------------------------------------------------------------------------------------------------------------
# 1. workers killed at random moments (SIGKILL and SIGSEGV from outside, os._exit and a segfault from inside)

async def worker_kills(size:int, seed:int)->Outcome:
    "`size` jobs (echo, streamed tokens, progress) on 2 workers while workers are killed at random moments."
    out, rng = Outcome('worker SIGKILL/SIGSEGV/os._exit', seed=seed), random.Random(seed)
    inv = Invariants(out)
    await inv.start()
    events = RecordingBroadcaster()
    mgr = FJobManager(config=dict(max_workers=2, prefetch=4, restart_policy=RestartPolicy.ALWAYS,
                                  max_restart_attempts=10**6), event_broadcaster=events)
    specs, jobs = [], []
    for i in range(size):
        r = rng.random()
        if r < 0.04: specs.append(('crash', dict(mode=rng.choice(['exit', 'segfault']), after=rng.uniform(0, 0.02))))
        elif r < 0.40: specs.append(('tokens', dict(text=' '.join(f"w{i}.{k}" for k in range(rng.randint(1, 12))),
                                                    delay=rng.choice([0, 0.002]))))
        elif r < 0.55: specs.append(('transcribe', dict(steps=rng.randint(1, 4), delay=0.005)))
        else: specs.append(('echo', dict(text=f"job {i}", sleep=rng.choice([0, 0, 0.005, 0.02]))))
    kills = Counter()
    done = asyncio.Event()

    async def killer():
        while not done.is_set():
            await asyncio.sleep(rng.uniform(0.01, 0.25))  # a random moment (fault timing, not synchronisation)
            busy = [s['pid'] for s in mgr.get_worker_stats() if s['status'] in ('busy', 'idle') and s['pid']]
            if not busy: continue
            sig = rng.choice([signal.SIGKILL, signal.SIGSEGV])
            with contextlib.suppress(ProcessLookupError):
                os.kill(rng.choice(busy), sig)
                kills[sig.name] += 1

    k = asyncio.create_task(killer())
    try:
        for plugin, kw in specs:
            jobs.append(await mgr.start_job(plugin, **kw))
            if rng.random() < 0.2: await asyncio.sleep(0)
        for j in jobs: await mgr.wait_for_job(j.id, timeout=T)
    finally:
        done.set()
        await k
    await mgr.flush_events()

    def check(j):
        plugin, kw = j.plugin_id, j.params
        if plugin == 'crash':
            if j.status != 'failed' or 'WorkerDied' not in (j.error or ''): return f"a crash job ended {j.status}: {j.error}"
            return None
        if j.status == 'failed':
            return None if 'WorkerDied' in (j.error or '') else f"failed for another reason: {j.error}"
        if j.status != 'completed': return f"ended {j.status}"
        if plugin == 'tokens':
            if j.result['text'] != kw['text'] or j.output != kw['text']: return f"streamed text {j.output!r} != {kw['text']!r}"
            chunks = ''.join(d['chunk'] for d in events_of(events, j.id, 'chunk'))
            if chunks != kw['text']: return f"chunk events {chunks!r} != {kw['text']!r}"
        if plugin == 'echo' and j.result['text'] != kw['text']: return f"echo result {j.result['text']!r}"
        return None

    st = inv.jobs(jobs, events, allowed=('completed', 'failed'), check=check)
    inv.stored(jobs, mgr.job_store)
    await inv.serves(mgr, 'the kills')
    crashes = sum(1 for p, _ in specs if p == 'crash')
    out.jobs, out.faults = len(jobs), sum(kills.values()) + crashes
    out.notes = (f"{dict(kills)} + {crashes} crash jobs; {st['completed']} completed, {st['failed']} failed; "
                 f"{mgr.restart_count} restarts")
    await mgr.ashutdown()
    return await inv.finish()


# ----------------------------------------------------------------------------------------------------------------
# 2. the app process SIGKILLed with several workers running; 3. the app restarted mid-run (SQLite)

APP = TESTS / '_f_app.py'


def _run_app(db:Path, seed:int, jobs:int)->dict:
    "Start `_f_app.py` on `db`, read its JSON line (printed with several workers running), SIGKILL it."
    return sigkill_after_first_line([sys.executable, str(APP), str(db), str(seed), str(jobs)], str(TESTS))


async def app_sigkill(size:int, seed:int)->Outcome:
    "`size` rounds: an app (subprocess) on a SQLite file, 3 workers busy, SIGKILLed; a new manager takes over."
    out, rng = Outcome('app SIGKILLed, workers running (SQLite)', seed=seed), random.Random(seed)
    inv = Invariants(out)
    await inv.start()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(size):
            db = Path(tmp) / f"jobs{r}.db"
            info = await asyncio.to_thread(_run_app, db, rng.randrange(2**31), 30)
            out.faults += 1
            for pid in info['pids']:  # the workers die with their app (parent-death watchdog)
                try: await wait_until(lambda: gone(pid), 15)
                except TimeoutError: out.fail(f"worker {pid} outlived its SIGKILLed app")
            events = RecordingBroadcaster()
            mgr = FJobManager(SQLiteJobStore(db), config=dict(max_workers=2), event_broadcaster=events)
            before = {j.id: j.status for j in mgr.get_all_jobs()}
            missing = set(info['submitted']) - set(before)
            if missing: out.fail(f"round {r}: {len(missing)} submitted jobs are not in the store")
            await mgr.start(wait=True)
            jobs = [await mgr.wait_for_job(jid, timeout=T) for jid in info['submitted'] if jid not in missing]
            await mgr.flush_events()
            # jobs that had finished before the kill broadcast nothing now; the others exactly one terminal event
            inv.jobs([j for j in jobs if before[j.id] not in TERMINAL], events, prefix=f"round {r}: ")
            inv.jobs([j for j in jobs if before[j.id] in TERMINAL], prefix=f"round {r}: ")
            for j in jobs:
                if before[j.id] in TERMINAL and events_of(events, j.id, j.status):
                    out.fail(f"round {r}: job {j.id} finished before the kill but was broadcast again")
            for jid, text in info['completed'].items():  # nothing the app saw completed is lost
                j = mgr.get_job(jid)
                if j is None or j.status != 'completed' or j.result['text'] != text:
                    out.lost += 1
                    out.fail(f"round {r}: job {jid} completed in the app, now {None if j is None else j.status}")
            for j in jobs:  # running at the kill: failed 'interrupted', or retried if it opted in
                if before[j.id] != 'running': continue
                retried = j.max_retries and [a['reason'] for a in j.attempt_log][:1] == ['interrupted']
                if (j.status, j.reason) != ('failed', 'interrupted') and not retried:
                    out.fail(f"round {r}: job {j.id} was running at the kill but is now {j.status} ({j.reason})")
            await inv.serves(mgr, 'the app was SIGKILLed')
            await mgr.ashutdown()
            reader = reread(db)
            inv.stored(jobs, reader)  # and read back once more from the file
            reader.close()
            out.jobs += len(jobs)
    return await inv.finish()


async def app_restarts(size:int, seed:int)->Outcome:
    """`size` managers in turn on one SQLite file, each shut down mid-run; the next one finishes what was left. Some
    jobs opt into retries: shutdown cancels none of those while it has a retry left (it runs again after a restart)."""
    out, rng = Outcome('app restarted mid-run (SQLite)', seed=seed), random.Random(seed)
    inv = Invariants(out)
    await inv.start()
    with tempfile.TemporaryDirectory() as tmp:
        db, ids = Path(tmp) / 'jobs.db', []
        all_events = []
        for r in range(size + 1):
            events = RecordingBroadcaster()
            all_events.append(events)
            mgr = FJobManager(SQLiteJobStore(db), config=dict(max_workers=2, prefetch=2), event_broadcaster=events)
            await mgr.start()
            last = r == size
            if not last:
                mine = []
                for i in range(20):
                    kw = rng.choice([dict(plugin_id='echo', text=f"r{r} j{i}", sleep=0.01),
                                     dict(plugin_id='tokens', text=f"r{r} j{i} a b c", delay=0.005),
                                     dict(plugin_id='slow', seconds=rng.uniform(0.05, 0.3))])
                    retries = rng.choice([0, 0, 1, 3])
                    mine.append(await mgr.start_job(kw.pop('plugin_id'), max_retries=retries, retry_backoff_seconds=0, **kw))
                ids += [j.id for j in mine]
                await wait_until(lambda: sum(j.status == 'completed' for j in mine) >= 3, T)  # mid-run
            else:
                for jid in ids: await mgr.wait_for_job(jid, timeout=T)
            await mgr.ashutdown()  # jobs still queued stay pending in the file; running ones are cancelled (or, with a
            # retry left, stay pending too)
            out.faults += 0 if last else 1
        reader = reread(db)
        jobs = [reader.get(jid) for jid in ids]
        reader.close()
        merged = RecordingBroadcaster()
        merged.events = [e for ev in all_events for e in ev.events]
        inv.jobs(jobs, merged)
        rerun = sum(1 for j in jobs if j.attempt_log)
        out.notes = (f"{rerun} jobs with retries were cut short by a shutdown and kept for the next start; "
                     f"{sum(j.status == 'cancelled' for j in jobs)} cancelled")
        for j in jobs:
            if j.status == 'cancelled' and j.reason != 'the manager shut down':
                out.fail(f"job {j.id} cancelled for {j.reason!r}")
            if j.status == 'cancelled' and j.attempts <= j.max_retries:
                out.fail(f"job {j.id} was cancelled by a shutdown with a retry left ({j.attempts} of 1 + {j.max_retries} runs)")
            interrupted = [a for a in j.attempt_log if a['reason'] == 'interrupted']
            if len(interrupted) != len(j.attempt_log) or (j.max_retries == 0 and interrupted):
                out.fail(f"job {j.id}: unexpected attempt log {j.attempt_log}")
            if j.status == 'failed': out.fail(f"job {j.id} failed: {j.error}")
        mgr = FJobManager(SQLiteJobStore(db))
        await inv.serves(mgr, 'the restarts')
        await mgr.ashutdown()
        reader = reread(db)
        inv.stored(jobs, reader)
        reader.close()
        out.jobs = len(jobs)
    return await inv.finish()


# ----------------------------------------------------------------------------------------------------------------
# 4. many submissions from many coroutines; 5. cancel-versus-complete races

async def many_submissions(size:int, seed:int, coroutines:int=50)->Outcome:
    "`size` jobs submitted from `coroutines` coroutines at once (2 workers), all awaited."
    out, rng = Outcome('submissions from many coroutines', seed=seed), random.Random(seed)
    inv = Invariants(out)
    await inv.start()
    events = RecordingBroadcaster()
    mgr = FJobManager(config=dict(max_workers=2, job_cache_size=size + 10), event_broadcaster=events)
    per = [size // coroutines + (1 if c < size % coroutines else 0) for c in range(coroutines)]

    async def submitter(c, n):
        mine = []
        for i in range(n):
            mine.append(await mgr.start_job('echo', text=f"{c}:{i}", priority=rng.choice([0, 0, 1])))
            if rng.random() < 0.3: await asyncio.sleep(0)
        return mine
    jobs = [j for js in await asyncio.gather(*(submitter(c, n) for c, n in enumerate(per))) for j in js]
    await asyncio.gather(*(mgr.wait_for_job(j.id, timeout=T * 2) for j in jobs))
    await mgr.flush_events()
    inv.jobs(jobs, events, allowed=('completed',),
             check=lambda j: None if j.result['text'] == j.params['text'] else f"result {j.result['text']!r}")
    if mgr.count_jobs('completed') != size: out.fail(f"the store counts {mgr.count_jobs('completed')} completed of {size}")
    inv.stored(jobs, mgr.job_store)
    await inv.serves(mgr)
    out.jobs = len(jobs)
    await mgr.ashutdown()
    return await inv.finish()


async def cancel_races(size:int, seed:int)->Outcome:
    "`size` jobs each cancelled at a random moment around its completion (queued, sent ahead, running, finishing)."
    out, rng = Outcome('cancel-versus-complete races', seed=seed), random.Random(seed)
    inv = Invariants(out)
    await inv.start()
    events = RecordingBroadcaster()
    mgr = FJobManager(config=dict(max_workers=2, prefetch=3, cancel_grace_seconds=5.0), event_broadcaster=events)
    await mgr.start(wait=True)
    answers: Dict[str, bool] = {}

    async def race(i):
        if rng.random() < 0.25:
            job = await mgr.start_job('tokens', text=' '.join(f"t{i}.{k}" for k in range(8)), delay=rng.choice([0, 0.002]))
        else: job = await mgr.start_job('echo', text=f"r{i}", sleep=rng.choice([0, 0, 0.001, 0.004]))
        how = rng.randrange(4)
        if how == 1:
            for _ in range(rng.randrange(1, 30)): await asyncio.sleep(0)
        elif how == 2:
            with contextlib.suppress(TimeoutError): await wait_until(lambda: job.status != 'pending', 5, 0.0005)
        elif how == 3: await asyncio.sleep(rng.uniform(0, 0.01))
        answers[job.id] = await mgr.cancel_job(job.id)
        return job

    jobs = []
    for b in range(0, size, 10):
        jobs += await asyncio.gather(*(race(i) for i in range(b, min(size, b + 10))))
    for j in jobs: await mgr.wait_for_job(j.id, timeout=T)
    await mgr.flush_events()

    def check(j):
        if answers[j.id] != (j.status == 'cancelled'): return f"cancel_job said {answers[j.id]} but the job is {j.status}"
        if j.plugin_id == 'echo' and j.status == 'completed' and j.result['text'] != j.params['text']: return "wrong result"
        if j.plugin_id == 'tokens':
            got = (j.result or {}).get('text', '') if j.status != 'failed' else ''
            if j.status == 'completed' and got != j.params['text']: return f"stream {got!r}"
            if j.status == 'cancelled' and j.result is not None and not j.params['text'].startswith(got):
                return f"partial output {got!r} is not a prefix of the text"
        return None
    st = inv.jobs(jobs, events, allowed=('completed', 'cancelled'), check=check)
    inv.stored(jobs, mgr.job_store)
    await inv.serves(mgr, 'the races')
    out.jobs, out.faults = len(jobs), len(jobs)
    out.notes = f"{st['cancelled']} cancelled, {st['completed']} completed first; {mgr.restart_count} restarts"
    await mgr.ashutdown()
    return await inv.finish()


# ----------------------------------------------------------------------------------------------------------------
# 6. SSE clients connecting and dropping mid-stream under load

class Tee(RecordingBroadcaster):
    "Records every event (for the invariants) and passes it on to another broadcaster (the SSE one)."
    def __init__(self, to): super().__init__(); self.to = to
    async def broadcast(self, event_type, data):
        await super().broadcast(event_type, data)
        await self.to.broadcast(event_type, data)


@contextlib.asynccontextmanager
async def serve(app, before_exit=None, timeout:float=T):
    """Run an ASGI app under uvicorn on this event loop, on a free 127.0.0.1 port; yields its base URL.
    `before_exit()` runs before the server is told to stop (e.g. a broadcaster's `close()`, ending open streams)."""
    import uvicorn
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # proto set: asyncio then sets TCP_NODELAY on each connection
    sock.bind(('127.0.0.1', 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level='error', lifespan='off'))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await wait_until(lambda: server.started or task.done(), timeout)
    if task.done(): task.result()
    try: yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        if before_exit is not None: before_exit()
        server.should_exit = True
        async with asyncio.timeout(timeout): await task
        sock.close()


async def _sse_events(resp, until=None, limit=None):
    "Parse SSE frames from an httpx streaming response: a list of (event, data) up to `until(data)` or `limit`."
    got, ev = [], {}
    async for line in resp.aiter_lines():
        if line == '':
            if 'data' in ev:
                got.append((ev.get('event'), ev['data']))
                if (limit is not None and len(got) >= limit) or (until is not None and until(got[-1])): return got
            ev = {}
        elif not line.startswith(':'):
            k, _, v = line.partition(':')
            ev[k] = v[1:] if v.startswith(' ') else v
    return got


async def sse_churn(size:int, seed:int)->Outcome:
    "`size` SSE clients connect to job streams and drop mid-stream (closing, or resetting the socket) while jobs stream."
    from fasthtml.common import FastHTML
    from cjm_workers.fasthtml.sse import SSEBroadcaster
    out, rng = Outcome('SSE clients dropping mid-stream', seed=seed), random.Random(seed)
    inv = Invariants(out)
    await inv.start()
    bc = SSEBroadcaster(heartbeat_seconds=0, flush_interval=0.005)
    tee = Tee(bc)
    mgr = FJobManager(config=dict(max_workers=2), event_broadcaster=tee)
    app = FastHTML()
    @app.get('/events')
    def events_route(request, job:str=None): return bc.stream(request, job_id=job)
    n_jobs = max(4, size // 3)
    async with serve(app) as url:
        port = int(url.rsplit(':', 1)[1])
        async with httpx.AsyncClient(base_url=url, timeout=T, limits=httpx.Limits(max_connections=None)) as cli:
            async with cli.stream('GET', '/events') as faithful:  # one client stays to the end and checks the order
                await wait_until(lambda: bc.clients >= 1, T)
                jobs = [await mgr.start_job('tokens', text=' '.join(f"s{i}.{k}" for k in range(20)), delay=0.003)
                        for i in range(n_jobs)]
                ids = {j.id for j in jobs}
                ends = set()
                def until(e):
                    d = json.loads(e[1])
                    if d['type'].split(':')[1] in TERMINAL: ends.add(d['data'].get('job_id'))
                    return ids <= ends
                reader = asyncio.create_task(_sse_events(faithful, until=until))

                async def dropper(i):
                    jid = rng.choice([None, rng.choice(jobs).id])
                    path = '/events' if jid is None else f'/events?job={jid}'
                    if rng.random() < 0.3:  # abrupt: the socket is reset mid-stream
                        r, w = await asyncio.open_connection('127.0.0.1', port)
                        w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                        await w.drain()
                        with contextlib.suppress(Exception):
                            async with asyncio.timeout(2): await r.read(rng.randint(1, 2000))
                        sock = w.get_extra_info('socket')
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\x00\x00\x00\x00\x00\x00\x00')
                        w.transport.abort()
                    else:
                        async with cli.stream('GET', path) as r:
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(2): await _sse_events(r, limit=rng.randint(0, 15))
                    out.faults += 1
                await asyncio.gather(*(dropper(i) for i in range(size)))
                for j in jobs: await mgr.wait_for_job(j.id, timeout=T)
                await mgr.flush_events()
                got = await asyncio.wait_for(reader, T)
            await wait_until(lambda: bc.clients == 0, T)  # every dropped client was unsubscribed
        chunks: Dict[str, str] = {}
        for _, data in got:
            d = json.loads(data)
            if d['type'].endswith(':chunk'): chunks[d['data']['job_id']] = chunks.get(d['data']['job_id'], '') + d['data']['chunk']
        def check(j):
            if j.result['text'] != j.params['text']: return f"result {j.result['text']!r}"
            if chunks.get(j.id) != j.params['text']: return f"the staying SSE client saw {chunks.get(j.id)!r}"
        inv.jobs(jobs, tee, allowed=('completed',), check=check)
        await inv.serves(mgr, 'the SSE drops')
        bc.close()
    out.jobs = len(jobs) + 1
    out.notes = f"{size} clients dropped, {len(got)} events to the client that stayed"
    await mgr.ashutdown()
    return await inv.finish()


# ----------------------------------------------------------------------------------------------------------------
# 7. a 100 MB result; 8. a plugin that ignores cancel; 9. a plugin that hangs in load

async def big_result(size:int, seed:int)->Outcome:
    "A result of `size` MB, then a fresh job."
    out = Outcome(f'{size} MB result', seed=seed)
    inv = Invariants(out)
    await inv.start()
    events = RecordingBroadcaster()
    mgr = FJobManager(event_broadcaster=events)
    n = size * 2**20
    j = await mgr.wait_for_job((await mgr.start_job('big', size=n)).id, timeout=T * 2)
    await mgr.flush_events()
    inv.jobs([j], events, allowed=('completed',),
             check=lambda j: None if len(j.result['text']) == n else f"result of {len(j.result['text'])} bytes")
    inv.stored([j], mgr.job_store)
    await inv.serves(mgr, 'the big result')
    out.jobs, out.faults = 1, 1
    await mgr.ashutdown()
    del j, events
    return await inv.finish()


async def ignores_cancel(size:int, seed:int)->Outcome:
    "`size` times: a job that ignores cancel (and has a child process) is cancelled; jobs queued behind it still run."
    out = Outcome('plugin ignoring cancel', seed=seed)
    inv = Invariants(out)
    await inv.start()
    events = RecordingBroadcaster()
    mgr = FJobManager(config=dict(cancel_grace_seconds=0.3, prefetch=4), event_broadcaster=events)
    jobs = []
    for r in range(size):
        stuck = await mgr.start_job('slow', seconds=300, ignore_cancel=True, spawn_child=True)
        queued = [await mgr.start_job('echo', text=f"{r}.{i}") for i in range(3)]
        await wait_until(lambda: (stuck.progress_message or '').startswith('child:'), T)
        child = psutil.Process(int(stuck.progress_message.split(':')[1]))
        if not await mgr.cancel_job(stuck.id): out.fail(f"cancel_job({stuck.id}) returned False")
        out.faults += 1
        try: await wait_until(lambda: gone(child.pid), 15)
        except TimeoutError: out.fail(f"the plugin's child {child.pid} outlived the hard cancel")
        for q in queued: await mgr.wait_for_job(q.id, timeout=T)
        jobs += [stuck, *queued]
    await mgr.flush_events()
    def check(j):
        if j.plugin_id == 'slow' and (j.status != 'cancelled' or 'ignored the cooperative cancel' not in j.reason):
            return f"{j.status}: {j.reason}"
        if j.plugin_id == 'echo' and j.status != 'completed': return f"a queued job ended {j.status}: {j.reason}"
    inv.jobs(jobs, events, check=check)
    inv.stored(jobs, mgr.job_store)
    await inv.serves(mgr, 'the hard cancels')
    out.jobs = len(jobs)
    await mgr.ashutdown()
    return await inv.finish()


async def hangs_in_load(size:int, seed:int)->Outcome:
    """`size` times: a plugin whose load hangs, stopped by its timeout and by a user's cancel; and once a worker whose
    plugin-manager factory hangs (never ready: killed at the start timeout, then declared failed)."""
    out = Outcome('plugin hanging in load', seed=seed)
    inv = Invariants(out)
    await inv.start()
    events = RecordingBroadcaster()
    mgr = FJobManager(config=dict(cancel_grace_seconds=0.2), event_broadcaster=events)
    jobs = []
    for r in range(size):
        timed = await mgr.start_job('hangload', timeout_seconds=0.3)
        after = await mgr.start_job('echo', text='after the timeout')
        await mgr.wait_for_job(after.id, timeout=T)
        cancelled = await mgr.start_job('hangload')
        await wait_until(lambda: cancelled.status == 'running', T)
        if not await mgr.cancel_job(cancelled.id): out.fail("cancelling a job hanging in load returned False")
        jobs += [timed, after, cancelled]
        out.faults += 2
    await mgr.flush_events()
    def check(j):
        if j.plugin_id == 'echo': return None if j.status == 'completed' else f"ended {j.status}"
        if j.timeout_seconds: return None if (j.status, j.reason) == ('failed', 'timeout') else f"{j.status}: {j.reason}"
        return None if j.status == 'cancelled' else f"{j.status}: {j.reason}"
    inv.jobs(jobs, events, check=check)
    inv.stored(jobs, mgr.job_store)
    await inv.serves(mgr, 'the hanging loads')
    await mgr.ashutdown()
    # a worker that never becomes ready
    ev2 = RecordingBroadcaster()
    bad = FJobManager(config=dict(worker_start_timeout_seconds=0.5, max_restart_attempts=1,
                                  restart_policy=RestartPolicy.ALWAYS), entry_point=hang_factory_worker, event_broadcaster=ev2)
    j = await bad.wait_for_job((await bad.start_job('echo', text='x')).id, timeout=T)
    out.faults += 2
    await bad.flush_events()
    inv.jobs([j], ev2, allowed=('failed',),
             check=lambda j: None if 'did not become ready' in j.error else f"error {j.error!r}")
    await bad.ashutdown()
    out.jobs = len(jobs) + 1
    return await inv.finish()


# ----------------------------------------------------------------------------------------------------------------
# 10. bad input at every door

async def bad_manager_input(size:int, seed:int)->Outcome:
    "Unknown plugins, invalid configs and options, unsendable parameters: each a clear error, and the manager serves on."
    import pytest
    out = Outcome('bad input: manager (plugin, config, options)', seed=seed)
    inv = Invariants(out)
    await inv.start()
    events = RecordingBroadcaster()
    mgr = FJobManager(event_broadcaster=events)
    reg = FJobManager(plugin_registry=ReferenceRegistry(), worker_type='withreg', event_broadcaster=events)
    jobs = []
    def expect(cond, what):
        out.faults += 1
        if not cond: out.fail(what)
    for r in range(size):
        j = await mgr.wait_for_job((await mgr.start_job('nope')).id, timeout=T)
        expect(j.status == 'failed' and "unknown plugin 'nope'" in j.error, f"unknown plugin (worker): {j.error}")
        j2 = await reg.wait_for_job((await reg.start_job('reference_nope')).id, timeout=T)
        expect(j2.status == 'failed' and "unknown plugin 'reference_nope'" in j2.error, f"unknown plugin (registry): {j2.error}")
        j3 = await mgr.wait_for_job((await mgr.start_job('echo', text=threading.Lock())).id, timeout=T)
        expect(j3.status == 'failed' and 'cannot be sent to a worker' in j3.error, f"unpicklable parameter: {j3.error}")
        j4 = await mgr.wait_for_job((await mgr.start_job('noload')).id, timeout=T)
        expect(j4.status == 'failed' and 'failed to load' in j4.error, f"a plugin its manager refuses: {j4.error}")
        j5 = await mgr.wait_for_job((await mgr.start_job('echo', text=1, unknown_kw=[1])).id, timeout=T)
        expect(j5.status in ('completed', 'failed'), f"odd parameters: {j5.status}")
        jobs += [j, j2, j3, j4, j5]
        for bad, err in ((dict(max_workers=0), "max_workers must be >= 1"), (dict(prefetch='x'), "prefetch must be int"),
                         (dict(cancel_grace_seconds=-1), "cancel_grace_seconds must be >= 0"),
                         (dict(restart_policy='sometimes'), "unknown policy 'sometimes'"),
                         (dict(job_timeout_seconds=0), "job_timeout_seconds must be None or"),
                         (dict(worker_env=[{'A': object()}]), "worker_env")):
            try: WorkerConfig(**bad); expect(False, f"WorkerConfig({bad}) was accepted")
            except (TypeError, ValueError) as e: expect(err in str(e), f"WorkerConfig({bad}): unclear error {e}")
        for kw, err in ((dict(priority='high'), 'priority must be an int'), (dict(timeout_seconds=-1), 'timeout_seconds must be'),
                        (dict(max_retries=1.5), 'max_retries must be'), (dict(retry_backoff_seconds='x'), 'retry_backoff_seconds')):
            try: await mgr.start_job('echo', **kw); expect(False, f"start_job({kw}) was accepted")
            except (TypeError, ValueError) as e: expect(err in str(e), f"start_job({kw}): unclear error {e}")
        expect(await mgr.reload_plugin('noload', {'a': 1}) is False, "reloading a plugin that refuses to load said True")
        expect(await mgr.unload_plugin('nope') is False, "unloading an unknown plugin said True")
    await mgr.flush_events()
    inv.jobs(jobs, events)
    await inv.serves(mgr, 'the bad input')
    await inv.serves(reg, 'the bad input', 'reference_echo')
    out.jobs = len(jobs)
    await mgr.ashutdown(); await reg.ashutdown()
    return await inv.finish()


class RemoteWorker:
    "A Universal Worker subprocess (`python -m cjm_workers.remote.worker`), killed with its process group at the end."
    def __init__(self, cls='EchoPlugin', args=(), env=None):
        e = {**os.environ, **(env or {})}
        e.pop('CJM_WORKER_TOKEN', None)
        e.update(env or {})
        self.proc = subprocess.Popen([sys.executable, '-m', 'cjm_workers.remote.worker', '--module', 'cjm_workers.testing',
                                      '--class', cls, '--port', '0', '--ppid', str(os.getpid()), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=e)
    def ready(self)->str:
        line = self.proc.stdout.readline()
        if not line.startswith('CJM_WORKER_READY '): raise RuntimeError(f"worker did not start: {line!r}")
        return f"http://127.0.0.1:{json.loads(line.split(' ', 1)[1])['port']}"
    def stop(self):
        from cjm_workers.core.process import kill_process_group
        if self.proc.poll() is None:
            kill_process_group(self.proc.pid)
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()


async def bad_http_input(size:int, seed:int)->Outcome:
    "Non-JSON, wrongly shaped, oversized and unauthorised requests (and raw garbage) to the HTTP worker; it serves on."
    out, rng = Outcome('bad input: HTTP worker', seed=seed), random.Random(seed)
    inv = Invariants(out)
    await inv.start()
    token = 'tok-' + os.urandom(6).hex()
    w = RemoteWorker(args=['--max-body-bytes', '4096', '--token-env', 'F_TOKEN'], env={'F_TOKEN': token})
    try:
        url = await asyncio.to_thread(w.ready)
        port = int(url.rsplit(':', 1)[1])
        auth = {'Authorization': f'Bearer {token}'}

        async def big_chunks():
            for _ in range(10): yield b'[' + b'1,' * 1000
        cases = [  # (method, path, kwargs, expected status, text the error must contain)
            ('POST', '/execute', dict(content=b'not json', headers=auth), 400, 'not valid JSON'),
            ('POST', '/execute', dict(content=b'\xff\xfe\x00', headers=auth), 400, 'not valid JSON'),
            ('POST', '/execute', dict(json=[1, 2], headers=auth), 400, 'must be a JSON object'),
            ('POST', '/execute', dict(json={'kwargs': []}, headers=auth), 400, 'must be a JSON object, not list'),
            ('POST', '/execute', dict(json={'args': {}, 'x': 1}, headers=auth), 400, 'unknown field'),
            ('POST', '/execute', dict(json={'kwargs': {'text': 'x' * 5000}}, headers=auth), 413, 'exceeds the limit'),
            ('POST', '/execute', dict(content=big_chunks(), headers=auth), 413, 'exceeds the limit'),
            ('POST', '/execute_stream', dict(content=b'{', headers=auth), 400, 'not valid JSON'),
            ('POST', '/initialize', dict(json=[1], headers=auth), 400, 'must be a JSON object'),
            ('POST', '/initialize', dict(content=b'x' * 10000, headers=auth), 413, 'exceeds the limit'),
            ('GET', '/progress?wait=abc', dict(headers=auth), 400, "'wait'"),
            ('GET', '/progress?wait=1e9', dict(headers=auth), 400, "'wait' must be between"),
            ('POST', '/execute', dict(json={}), 401, 'bearer token'),
            ('POST', '/execute', dict(json={}, headers={'Authorization': 'Bearer wrong'}), 401, 'bearer token'),
            ('GET', '/config', dict(headers={'Authorization': token}), 401, 'bearer token'),
            ('GET', '/execute', dict(headers=auth), 405, ''),
            ('POST', '/nope', dict(headers=auth), 404, ''),
        ]
        async with httpx.AsyncClient(base_url=url, timeout=T) as c:
            for r in range(size):
                for method, path, kw, status, text in rng.sample(cases, len(cases)):
                    kw = dict(kw)
                    if hasattr(kw.get('content'), '__anext__'): kw['content'] = big_chunks()  # a fresh one each time
                    try:
                        resp = await c.request(method, path, **kw)
                        if resp.status_code != status or text not in resp.text:
                            out.fail(f"{method} {path} {kw.get('json', '')!r}: {resp.status_code} {resp.text[:120]!r}, "
                                     f"expected {status} with {text!r}")
                    except httpx.HTTPError as e:
                        if status != 413: out.fail(f"{method} {path}: {type(e).__name__}: {e}")  # 413 may close mid-upload
                    out.faults += 1
                a = f'Authorization: Bearer {token}\r\n'
                for garbage, want in ((b'\x00\x01garbage\r\n\r\n', b' 400 '), (b'GET / HTTP/9.9\r\n\r\n', b' 4'),
                                      (f'POST /execute HTTP/1.1\r\nHost: x\r\n{a}Content-Length: abc\r\n\r\n{{}}'.encode(), b' 400 '),
                                      (f'POST /execute HTTP/1.1\r\nHost: x\r\n{a}Content-Length: 99999999999\r\n\r\n'.encode(), b' 413 ')):
                    rd, wr = await asyncio.open_connection('127.0.0.1', port)
                    wr.write(garbage)
                    got = b''
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(5): got = await rd.read(1000)
                    wr.close()
                    if want not in got.split(b'\r\n', 1)[0]: out.fail(f"raw request {garbage[:40]!r}: answered {got[:80]!r}")
                    out.faults += 1
                ok = await c.post('/execute', json={'kwargs': {'text': 'still serving'}}, headers=auth)
                if ok.status_code != 200 or ok.json()['text'] != 'still serving':
                    out.fail(f"the worker no longer serves: {ok.status_code} {ok.text[:200]}")
                out.jobs += len(cases) + 4
    finally:
        await asyncio.to_thread(w.stop)
    return await inv.finish()


async def bad_route_input(size:int, seed:int)->Outcome:
    "Unauthorised requests to every job route, bad job ids, bad bodies and bad stream positions; the app serves on."
    from fasthtml.common import FastHTML
    from cjm_workers.fasthtml.routes import mount_job_routes
    from cjm_workers.fasthtml.sse import SSEBroadcaster
    out, rng = Outcome('bad input: job routes', seed=seed), random.Random(seed)
    inv = Invariants(out)
    await inv.start()
    bc = SSEBroadcaster(heartbeat_seconds=0)
    tee = Tee(bc)
    mgr = FJobManager(event_broadcaster=tee)
    app = FastHTML(default_hdrs=False, secret_key='faults')
    mount_job_routes(app, mgr, bc, prefix='/jobs', authorize=lambda req, job: req.headers.get('x-user') == 'alice')
    me = {'x-user': 'alice'}
    jobs = []
    async with serve(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=T) as c:
            real = (await c.post('/jobs/start', json={'plugin_id': 'echo', 'params': {'text': 'hi'}},
                                 headers={**me, 'accept': 'application/json'})).json()['id']
            jobs.append(await mgr.wait_for_job(real, timeout=T))
            bad_ids = ['nope', '..%2F..%2Fetc%2Fpasswd', 'x' * 3000, '%00', '%E2%98%83', "'%3B--", '%20']
            for r in range(size):
                cases = []
                for path, m in (('/jobs', 'GET'), (f'/jobs/{real}', 'GET'), ('/jobs/start', 'POST'),
                                (f'/jobs/{real}/cancel', 'POST'), ('/jobs/stream', 'GET'), (f'/jobs/{real}/stream', 'GET'),
                                ('/jobs/nope', 'GET'), ('/jobs/nope/cancel', 'POST'), ('/jobs/nope/stream', 'GET')):
                    for h in ({}, {'x-user': 'mallory'}): cases.append((m, path, dict(headers=h), 403, 'forbidden'))
                for b in bad_ids:  # ('%2F' decodes to '/': no route matches, Starlette's own 404)
                    for suffix, m in (('', 'GET'), ('/cancel', 'POST'), ('/stream', 'GET')):
                        cases.append((m, f'/jobs/{b}{suffix}', dict(headers=me), 404, 'Not Found' if '%2F' in b else 'unknown job'))
                cases += [
                    ('POST', '/jobs/start', dict(content=b'{not json', headers={**me, 'content-type': 'application/json'}), 400, ''),
                    ('POST', '/jobs/start', dict(json=[1], headers=me), 400, 'must be an object'),
                    ('POST', '/jobs/start', dict(json={'params': {}}, headers=me), 400, 'plugin_id is required'),
                    ('POST', '/jobs/start', dict(json={'plugin_id': 'echo', 'params': [1]}, headers=me), 400, 'params must be a JSON object'),
                    ('POST', '/jobs/start', dict(data={'plugin_id': 'echo', 'params': '{bad'}, headers=me), 400, 'params must be a JSON object'),
                    ('GET', '/jobs/start', dict(headers=me), 405, 'use POST'),
                    ('GET', '/jobs/stream?after=abc', dict(headers=me), 400, 'after must be an integer'),
                    ('GET', f'/jobs/{real}/stream?after=1e3', dict(headers=me), 400, 'after must be an integer'),
                    ('GET', '/jobs/stream?last_event_id=x', dict(headers=me), 400, 'last_event_id must be an integer'),
                    ('POST', f'/jobs/{real}/cancel', dict(headers=me), 409, 'already ended'),
                ]
                for method, path, kw, status, text in rng.sample(cases, len(cases)):
                    resp = await c.request(method, path, **kw)
                    if resp.status_code != status or text not in resp.text:
                        out.fail(f"{method} {path[:60]}: {resp.status_code} {resp.text[:100]!r}, expected {status} {text!r}")
                    out.faults += 1
                # an unknown plugin through the route: a job that failed with the reason
                resp = await c.post('/jobs/start', json={'plugin_id': 'nope'}, headers={**me, 'accept': 'application/json'})
                if resp.status_code != 201: out.fail(f"start of an unknown plugin: {resp.status_code} {resp.text[:100]}")
                else: jobs.append(await mgr.wait_for_job(resp.json()['id'], timeout=T))
                out.jobs += len(cases) + 1
            await inv.serves(mgr, 'the bad requests')
    await mgr.flush_events()
    inv.jobs(jobs, tee, check=lambda j: None if j.plugin_id == 'echo' or 'unknown plugin' in j.error else j.error)
    bc.close()
    await mgr.ashutdown()
    return await inv.finish()


def protocol_fuzz(size:int, seed:int)->Outcome:
    """`size` hypothesis examples of malformed messages — odd dicts, non-dicts, undecodable frames (random bytes,
    truncated pickles, pickles of classes that do not exist) — sent to a real worker's request and control pipes;
    after each example a real job and a real command still get their answers."""
    import multiprocessing as mp, pickle
    from hypothesis import HealthCheck, given, settings, strategies as st, seed as hseed
    from cjm_workers.core.channel import PipeChannel, dumps
    from cjm_workers.testing import reference_worker
    out = Outcome('bad input: worker protocol (hypothesis)', seed=seed)
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()  # the warm-up: the first 'spawn' of a process starts it, once
    t0 = time.monotonic()
    threads0, fds0, procs0 = counted_threads(), fd_count(), _descendant_pids()
    TYPES = st.sampled_from(['execute', 'reload', 'unload', 'get_state', 'init', 'cancel', 'explode', '', None, 7])
    VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
                       st.binary(max_size=10), st.lists(st.integers(), max_size=3),
                       st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
    PLUGINS = st.sampled_from(['echo', 'tokens', 'noload', 'nope', None, 3, ''])
    DICT = st.fixed_dictionaries({'type': TYPES}, optional={
        'job_id': st.one_of(st.text(max_size=8), st.none(), st.integers(), st.lists(st.integers(), max_size=2)),
        'request_id': st.one_of(st.text(max_size=8), st.none(), st.integers()),
        'plugin_name': PLUGINS, 'plugin_config': st.one_of(VALUES, st.dictionaries(st.text(max_size=5), VALUES, max_size=3)),
        'config': VALUES, 'stream': VALUES, 'text': VALUES, 'fail': st.one_of(st.none(), st.text(max_size=10))})
    good = dumps({'type': 'get_state', 'request_id': 'x'})
    FRAMES = st.one_of(  # raw frames that are not a message at all
        st.binary(max_size=40),
        st.integers(1, len(good) - 1).map(lambda n: good[:n]),  # a truncated pickle
        st.just(b'\x80\x04\x95\x19\x00\x00\x00\x00\x00\x00\x00\x8c\x0bcjm_nowhere\x94\x8c\x01X\x94\x93\x94.'))  # unknown class
    ITEM = st.one_of(DICT.map(lambda m: ('msg', m)), VALUES.map(lambda m: ('msg', m)), FRAMES.map(lambda b: ('raw', b)))
    ctx = mp.get_context('spawn')
    req, res, resp = PipeChannel(ctx, control=True), PipeChannel(ctx), PipeChannel(ctx)
    p = ctx.Process(target=reference_worker, args=(req, res, resp))
    p.start()
    n = {'i': 0}
    try:
        if res.get(timeout=T)['type'] != 'ready': out.fail("the worker did not start")

        @hseed(seed)
        @settings(max_examples=size, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(items=st.lists(ITEM, min_size=1, max_size=6), on_control=st.booleans())
        def fuzz(items, on_control):
            n['i'] += 1
            for kind, m in items:
                ch = req.control if on_control and (kind == 'raw' or (isinstance(m, dict) and m.get('type') == 'cancel')) else req
                if kind == 'raw': ch.put_pickled(m)
                else: ch.put(m)
                out.faults += 1
            i = n['i']
            req.put({'type': 'execute', 'job_id': f'probe{i}', 'plugin_name': 'echo', 'text': 'still here'})
            req.put({'type': 'get_state', 'request_id': f'state{i}'})
            def until(ch, ok):  # the next matching message (fails at once if the worker died)
                while True:
                    try: m = ch.get(timeout=1)
                    except queue.Empty:
                        assert p.is_alive(), f"the worker died (exit code {p.exitcode})"
                        continue
                    if ok(m): return m
            m = until(res, lambda m: m.get('type') == 'result' and m.get('job_id') == f'probe{i}')
            assert m['status'] == 'success' and m['data']['text'] == 'still here', m
            r = until(resp, lambda r: r.get('request_id') == f'state{i}')
            assert r['type'] == 'state' and p.is_alive()
        try: fuzz()
        except Exception as e: out.fail(f"the worker stopped serving after malformed messages: {type(e).__name__}: {e}")
        out.jobs = n['i']
    finally:
        with contextlib.suppress(Exception): req.put({'type': 'stop'})
        p.join(10)
        if p.is_alive(): p.kill(); p.join(10)
        if p.exitcode not in (0, -signal.SIGKILL): out.fail(f"the worker ended with exit code {p.exitcode}")
        for c in (req, res, resp): c.close()
        p.close()
    out.orphans = len(_descendant_pids() - procs0)
    out.leaked_threads = max(0, len(counted_threads()) - len(threads0))
    out.leaked_fds = max(0, fd_count() - fds0)
    if out.orphans or out.leaked_threads or out.leaked_fds:
        out.fail(f"left {out.orphans} processes, {out.leaked_threads} threads, {out.leaked_fds} fds")
    out.seconds = time.monotonic() - t0
    return out


# ----------------------------------------------------------------------------------------------------------------

SCENARIOS = {  # name → (function, CI size, soak size)
    'worker_kills': (worker_kills, 200, 500),
    'app_sigkill': (app_sigkill, 1, 10),
    'app_restarts': (app_restarts, 3, 20),
    'many_submissions': (many_submissions, 2000, 10_000),
    'cancel_races': (cancel_races, 300, 1000),
    'sse_churn': (sse_churn, 60, 300),
    'big_result': (big_result, 100, 100),
    'ignores_cancel': (ignores_cancel, 1, 20),
    'hangs_in_load': (hangs_in_load, 1, 10),
    'bad_manager_input': (bad_manager_input, 1, 20),
    'bad_http_input': (bad_http_input, 1, 50),
    'bad_route_input': (bad_route_input, 1, 20),
    'protocol_fuzz': (protocol_fuzz, 100, 1000),
}


def table(outcomes:List[Outcome])->str:
    "The soak table: one row per scenario."
    head = ('scenario', 'jobs', 'faults injected', 'lost', 'orphans', 'leaked fds/threads', 'violations', 'time')
    rows = [(o.scenario, str(o.jobs), str(o.faults), str(o.lost), str(o.orphans), f"{o.leaked_fds}/{o.leaked_threads}",
             str(len(o.violations)), f"{o.seconds:.1f} s") for o in outcomes]
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: '| ' + ' | '.join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) + ' |'
    return '\n'.join([line(head), '|' + '|'.join('-' * (x + 2) for x in w) + '|', *map(line, rows)])
