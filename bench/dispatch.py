"""Dispatch benchmark for cjm_workers: raw IPC baselines, job round trip, throughput, cancel, crash, spawn and
parent-death latencies, all measured in one run and printed as one table.

Run from the repository root:  python bench/dispatch.py
(progress goes to stderr, the table to stdout; about 10-15 s on 2 cores; exit code 1 only if a
measurement failed to run, not for a missed target)
"""
from __future__ import annotations
import asyncio, gc, multiprocessing as mp, os, platform, random, select, signal, subprocess, sys, time, traceback
from dataclasses import dataclass, field
from typing import Optional

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path: sys.path.insert(0, HERE)
import _bench_helpers as helpers  # noqa: E402  (spawned children import their bodies from here)

from cjm_workers.core.config import RestartPolicy, WorkerConfig  # noqa: E402
from cjm_workers.testing import ReferenceJobManager  # noqa: E402

clock = time.perf_counter

# ---------------------------------------------------------------------------------------------------------- sizes
RT_WARMUP, RT_N = 300, 2000            # rows 1-3
TP_JOBS, TP_REPS = 10_000, 3           # row 4 (median of TP_REPS runs after a warm-up run)
COOP_N, HARD_N, CRASH_N, SPAWN_N, PD_N = 20, 5, 10, 5, 5
PAYLOAD = {'type': 'execute', 'job_id': '0' * 32, 'plugin_name': 'echo', 'text': 'x'}  # raw-IPC message, job-sized

# --------------------------------------------------------------------------------------------------------- helpers
def log(*a): print(*a, file=sys.stderr, flush=True)

def pct(xs, q:float)->float:
    "q-th percentile (0..100) with linear interpolation."
    s = sorted(xs)
    if not s: return float('nan')
    k = (len(s) - 1) * q / 100
    lo = int(k); hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)

def fmt_t(sec:Optional[float])->str:
    if sec is None or sec != sec: return '—'
    if sec < 1e-3: return f"{sec * 1e6:.1f} µs"
    if sec < 1: return f"{sec * 1e3:.2f} ms"
    return f"{sec:.2f} s"

@dataclass
class Row:
    num: str
    name: str
    n: int
    p50: Optional[float] = None
    p99: Optional[float] = None
    value: str = ''          # the figure judged against the target when it is not p50 (ratio, jobs/s)
    target: str = '—'
    ok: Optional[bool] = None
    notes: list = field(default_factory=list)

def verdict(ok): return '—' if ok is None else ('PASS' if ok else 'MISS')

def machine()->list:
    model = '?'
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'): model = line.split(':', 1)[1].strip(); break
    except OSError: pass
    la = ', '.join(f"{x:.2f}" for x in os.getloadavg())
    return [f"CPU     : {model}",
            f"cores   : {os.cpu_count()} logical ({psutil.cpu_count(logical=False) or '?'} physical)",
            f"Python  : {platform.python_implementation()} {platform.python_version()} on {platform.platform()}",
            f"load avg: {la} (at start)"]

async def until(pred, timeout=30.0, interval=0.001, what='condition'):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end: raise TimeoutError(f"{what} not met within {timeout}s")
        await asyncio.sleep(interval)

# ------------------------------------------------------------------------------ 1, 2, 3a, 3: round trips, interleaved
# The four round trips are measured in turns (ROUNDS rounds; in each, RT_N / ROUNDS round trips of each kind, the
# order rotating), with every child process alive throughout. A machine whose speed drifts during the run (other
# tenants, frequency changes) then slows every kind alike, and the ratios compare like with like.

class QueueEcho:
    "Row 1: a raw `multiprocessing.Queue` round trip to a spawned child."
    def __init__(self):
        ctx = mp.get_context('spawn')
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.p = ctx.Process(target=helpers.queue_echo, args=(self.inbox, self.outbox), daemon=True)
        self.p.start()
    async def trip(self)->float:
        put, get = self.inbox.put, self.outbox.get
        t0 = clock(); put(PAYLOAD); get(); return clock() - t0
    async def close(self):
        self.inbox.put(None); self.p.join(5)
        if self.p.is_alive(): self.p.kill(); self.p.join()
        for q in (self.inbox, self.outbox): q.close(); q.join_thread()

class PipeEcho:
    "Row 2: a raw `multiprocessing.Pipe` round trip to a spawned child."
    def __init__(self):
        ctx = mp.get_context('spawn')
        self.a, b = ctx.Pipe()
        self.p = ctx.Process(target=helpers.pipe_echo, args=(b,), daemon=True)
        self.p.start(); b.close()
    async def trip(self)->float:
        t0 = clock(); self.a.send(PAYLOAD); self.a.recv(); return clock() - t0
    async def close(self):
        self.a.send(None); self.p.join(5)
        if self.p.is_alive(): self.p.kill(); self.p.join()
        self.a.close()

class FloorEcho:
    """Row 3a: a job round trip stripped to its protocol, for scale. The event loop pickles a request and writes it to
    a pipe; the worker's main thread reads it and writes `started` and `result`; the event loop reads the results
    pipe itself (`add_reader`) and resolves the caller's future. No job object, states, queue, store, management
    thread, cancel channel or plugin: everything row 3 does beyond this is the job system's own work."""
    def __init__(self):
        ctx, self.loop = mp.get_context('spawn'), asyncio.get_running_loop()
        req_r, self.req_w = ctx.Pipe(duplex=False)
        self.res_r, res_w = ctx.Pipe(duplex=False)
        self.p = ctx.Process(target=helpers.floor_worker, args=(req_r, res_w), daemon=True)
        self.p.start(); req_r.close(); res_w.close()
        self.wfd, self.rfd, self.buf, self.waiting = self.req_w.fileno(), self.res_r.fileno(), bytearray(), {}
        os.set_blocking(self.rfd, False)
        self.loop.add_reader(self.rfd, self.readable)
    def readable(self):  # the event loop reads the results pipe itself: no thread between the worker and the waiter
        try: self.buf.extend(os.read(self.rfd, 65536))
        except BlockingIOError: return
        for msg in helpers.take_frames(self.buf):
            if msg['type'] == 'result' and (f := self.waiting.pop(msg['job_id'], None)) is not None: f.set_result(msg)
    async def trip(self)->float:
        import uuid
        t0 = clock()
        jid, f = uuid.uuid4().hex, self.loop.create_future()
        self.waiting[jid] = f
        os.writev(self.wfd, helpers.frame({'type': 'execute', 'job_id': jid, 'plugin_name': 'echo', 'text': 'x', 'plugin_config': {}}))
        await f
        return clock() - t0
    async def close(self):
        self.loop.remove_reader(self.rfd)
        os.writev(self.wfd, helpers.frame(None))
        self.p.join(5)
        if self.p.is_alive(): self.p.kill(); self.p.join()
        self.req_w.close(); self.res_r.close()

class JobEcho:
    "Row 3: a trivial job's round trip through the job system: `start_job` -> `wait_for_job` returns it completed."
    def __init__(self): self.mgr = ReferenceJobManager(WorkerConfig())
    async def trip(self)->float:
        t0 = clock()
        job = await self.mgr.start_job('echo', text='x')
        j = await self.mgr.wait_for_job(job.id)
        t1 = clock()
        if j.status != 'completed': raise RuntimeError(f"echo job ended {j.status}: {j.error}")
        return t1 - t0
    async def close(self): await self.mgr.ashutdown()

ROUNDS = 8

async def bench_round_trips()->dict:
    "Rows 1, 2, 3a and 3: {kind: [round trip seconds]}, and 'rounds': [{kind: p50 of that round}]."
    kinds = {}
    try:
        kinds['queue'], kinds['pipe'], kinds['floor'], kinds['job'] = QueueEcho(), PipeEcho(), FloorEcho(), JobEcho()
        await kinds['job'].mgr.start(wait=True)
        for k in kinds.values():
            for _ in range(RT_WARMUP): await k.trip()
        out, rounds, names = {k: [] for k in kinds}, [], list(kinds)
        for r in range(ROUNDS):
            this = {}
            for name in names[r % 4:] + names[:r % 4]:  # rotate the order: no kind always goes first
                xs = [await kinds[name].trip() for _ in range(RT_N // ROUNDS)]
                out[name] += xs
                this[name] = pct(xs, 50)
            rounds.append(this)
        out['rounds'] = rounds
        return out
    finally:
        for k in kinds.values(): await k.close()

# -------------------------------------------------------------------------------------------- 4: throughput
async def bench_throughput()->list:
    mgr = ReferenceJobManager(WorkerConfig())
    try:
        await mgr.start(wait=True)
        rates = []
        for rep in range(TP_REPS + 1):  # rep 0 is a warm-up
            gc.collect()
            t0 = clock()
            jobs = [await mgr.start_job('echo', text='x') for _ in range(TP_JOBS)]
            await mgr.wait_for_job(jobs[-1].id, timeout=120)
            t1 = clock()
            bad = [j for j in jobs if j.status != 'completed']
            if bad: raise RuntimeError(f"{len(bad)} of {TP_JOBS} pipelined jobs did not complete "
                                       f"(first: {bad[0].status} {bad[0].error})")
            if rep: rates.append(TP_JOBS / (t1 - t0))
            mgr.clear_completed_jobs()
        return rates
    finally: await mgr.ashutdown()

# ------------------------------------------------------------------------------------------------ 5-6: cancel
async def _running(mgr, **params):
    job = await mgr.start_job('slow', **params)
    await until(lambda: job.status == 'running', what='slow job running')
    return job

async def bench_coop_cancel()->list:
    mgr = ReferenceJobManager(WorkerConfig())
    out = []
    try:
        await mgr.start(wait=True)
        for _ in range(COOP_N):
            job = await _running(mgr, seconds=30)
            await asyncio.sleep(random.uniform(0.01, 0.02))  # random phase against the plugin's 5 ms cancel poll
            t0 = clock(); ok = await mgr.cancel_job(job.id); t1 = clock()
            if not ok or job.status != 'cancelled': raise RuntimeError(f"cooperative cancel ended {job.status}")
            out.append(t1 - t0)
    finally: await mgr.ashutdown()
    return out

async def bench_hard_cancel():
    mgr = ReferenceJobManager(WorkerConfig(cancel_grace_seconds=0))
    lat, ready, pids = [], [], set()
    try:
        await mgr.start(wait=True)
        for _ in range(HARD_N):
            job = await _running(mgr, seconds=30, ignore_cancel=True)
            pids.add(job.worker_pid)
            await asyncio.sleep(0.01)
            t0 = clock(); ok = await mgr.cancel_job(job.id); t1 = clock()
            if not ok or job.status != 'cancelled': raise RuntimeError(f"hard cancel ended {job.status}")
            await mgr.wait_until_ready(30); t2 = clock()
            lat.append(t1 - t0); ready.append(t2 - t0)
        restarts = mgr.get_worker_stats()[0]['restarts']
    finally: await mgr.ashutdown()
    return lat, ready, restarts, len(pids)

# ------------------------------------------------------------------------------------------------ 7: crash
async def bench_crash():
    mgr = ReferenceJobManager(WorkerConfig(restart_policy=RestartPolicy.ALWAYS, max_restart_attempts=10_000))
    lat, ready = [], []
    try:
        await mgr.start(wait=True)
        for _ in range(CRASH_N):
            job = await _running(mgr, seconds=30)
            await asyncio.sleep(0.01)
            pid = job.worker_pid
            t0 = clock(); os.kill(pid, signal.SIGKILL)
            j = await mgr.wait_for_job(job.id, timeout=30); t1 = clock()
            if j.status != 'failed': raise RuntimeError(f"killed worker's job ended {j.status}")
            await mgr.wait_until_ready(30); t2 = clock()
            lat.append(t1 - t0); ready.append(t2 - t0)
    finally: await mgr.ashutdown()
    return lat, ready

# ------------------------------------------------------------------------------------------------ 8: spawn
async def bench_spawn()->list:
    out = []
    for _ in range(SPAWN_N):
        mgr = ReferenceJobManager(WorkerConfig())
        try:
            t0 = clock(); await mgr.start(wait=True); t1 = clock()
            if mgr.get_worker_stats()[0]['status'] != 'idle': raise RuntimeError("worker did not become ready")
            out.append(t1 - t0)
        finally: await mgr.ashutdown()
    return out

# ------------------------------------------------------------------------------------------ 9: parent death
def _gone(pid:int)->bool:
    "True once `pid` has exited (a zombie nobody reaped yet counts as gone)."
    if not psutil.pid_exists(pid): return True
    try: return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return True

def bench_parent_death():
    out, stuck = [], 0
    for _ in range(PD_N):
        app = subprocess.Popen([sys.executable, '-c', 'import _bench_helpers as h; h.app_main()'], cwd=HERE,
                               stdout=subprocess.PIPE, text=True)
        try:
            r, _, _ = select.select([app.stdout], [], [], 60)
            line = app.stdout.readline() if r else ''
            if not line.strip(): raise RuntimeError("the app subprocess did not report its worker pid")
            wpid = int(line.split()[0])
            t0 = clock()
            os.kill(app.pid, signal.SIGKILL)
            while not _gone(wpid):
                if clock() - t0 > 5: break
                time.sleep(0.001)
            t1 = clock()
            if _gone(wpid): out.append(t1 - t0)
            else:
                stuck += 1
                try: os.kill(wpid, signal.SIGKILL)
                except ProcessLookupError: pass
        finally:
            if app.poll() is None: app.kill()
            app.wait()
            app.stdout.close()
    return out, stuck

# ---------------------------------------------------------------------------------------------------- main
def table(rows:list)->str:
    head = ('#', 'measurement', 'n', 'p50', 'p99', 'value', 'target', 'result')
    cells = [head] + [(r.num, r.name, str(r.n), fmt_t(r.p50), fmt_t(r.p99), r.value or '—', r.target,
                       'ERROR' if r.value.startswith('ERROR') else verdict(r.ok))
                      for r in rows]
    right = {2, 3, 4, 5}
    w = [max(len(c[i]) for c in cells) for i in range(len(head))]
    line = lambda c: '  '.join(s.rjust(w[i]) if i in right else s.ljust(w[i]) for i, s in enumerate(c)).rstrip()
    out = [line(cells[0]), '  '.join('-' * x for x in w)] + [line(c) for c in cells[1:]]
    for r in rows:
        for n in r.notes: out.append(f"  [{r.num}] {n}")
    return '\n'.join(out)

def _section(label, fn, *args):
    "Run one measurement; on failure log it and return None so the other rows are still measured."
    log(label + " ...")
    try: return asyncio.run(fn(*args)) if asyncio.iscoroutinefunction(fn) else fn(*args)
    except Exception:
        log(f"  FAILED: {label}\n" + traceback.format_exc())
        return None

def _err(num, name): return Row(num, name, 0, value='ERROR (see stderr)', ok=False)

def main():
    t_start = clock()
    info = machine()
    rt = _section("1, 2, 3a, 3: round trips, interleaved", bench_round_trips)
    rates = _section("4: pipelined throughput", bench_throughput)
    coop = _section("5: cooperative cancel", bench_coop_cancel)
    hard = _section("6: hard cancel", bench_hard_cancel)
    crash = _section("7: crash -> failed", bench_crash)
    spawn = _section("8: spawn", bench_spawn)
    pdeath = _section("9: parent death", bench_parent_death)

    rows = []
    q, pp, floor, jobs = (rt or {}).get('queue'), (rt or {}).get('pipe'), (rt or {}).get('floor'), (rt or {}).get('job')
    q50 = pct(q, 50) if q else None
    rows.append(Row('1', 'raw mp.Queue round trip (spawn)', len(q), q50, pct(q, 99),
                    notes=[f"rows 1, 2, 3a and 3 were measured in turns: {ROUNDS} rounds of {RT_N // ROUNDS} round trips "
                           "of each kind, the order rotating, after a warm-up of each"]) if q else _err('1', 'raw mp.Queue'))
    rows.append(Row('2', 'raw mp.Pipe round trip (spawn)', len(pp), pct(pp, 50), pct(pp, 99)) if pp else _err('2', 'raw mp.Pipe'))
    if floor:
        f50 = pct(floor, 50)
        rows.append(Row('3a', "floor: bare job protocol, no job system", len(floor), f50, pct(floor, 99),
                        f"{f50 / q50:.2f}x Queue p50" if q50 else '—',
                        notes=["pickle + pipe write; worker's main thread reads, writes `started` and `result`; the event "
                               "loop reads the results pipe itself (add_reader) and resolves a future (see FloorEcho)"]))
    else: rows.append(_err('3a', 'protocol floor'))
    if jobs:
        j50 = pct(jobs, 50)
        ratio = j50 / q50 if q50 else float('nan')
        per_round = sorted(r['job'] / r['queue'] for r in rt['rounds'])
        rows.append(Row('3', "trivial job round trip (echo)", len(jobs), j50, pct(jobs, 99), f"{ratio:.2f}x Queue p50",
                        '<= 1.0x Queue', ratio <= 1.0,
                        notes=[f"ratio in each of the {ROUNDS} rounds (job p50 / Queue p50 of that round): "
                               + ', '.join(f"{x:.2f}" for x in per_round)]))
    else: rows.append(_err('3', 'trivial job round trip'))
    if rates:
        rate = pct(rates, 50)
        rows.append(Row('4', f"pipelined throughput, 1 worker ({TP_JOBS:,} jobs)", TP_REPS, value=f"{rate:,.0f} jobs/s",
                        target='>= 30,000/s', ok=rate >= 30_000,
                        notes=[f"median of {TP_REPS} runs after a warm-up run; runs: "
                               + ', '.join(f"{x:,.0f}" for x in rates) + " jobs/s"]))
    else: rows.append(_err('4', 'pipelined throughput'))
    rows.append(Row('5', 'cooperative cancel -> cancelled', len(coop), pct(coop, 50), pct(coop, 99),
                    target='p50 <= 20 ms', ok=pct(coop, 50) <= 0.020,
                    notes=["`slow` checks for a cancel every 5 ms, so ~2.5 ms of this is the plugin's own poll"])
                if coop else _err('5', 'cooperative cancel'))
    if hard:
        lat, ready, restarts, npids = hard
        rows.append(Row('6', 'hard cancel (grace 0) -> cancelled', len(lat), pct(lat, 50), pct(lat, 99),
                        notes=[f"each hard cancel kills the worker, which then restarts ({restarts} restarts, "
                               f"{npids} distinct pids); cancel_job call -> restarted worker ready: "
                               f"p50 {fmt_t(pct(ready, 50))}, max {fmt_t(max(ready))}"]))
    else: rows.append(_err('6', 'hard cancel'))
    if crash:
        lat, ready = crash
        rows.append(Row('7', 'crash (SIGKILL) -> failed', len(lat), pct(lat, 50), pct(lat, 99),
                        target='p50 <= 50 ms', ok=pct(lat, 50) <= 0.050,
                        notes=["t0 just before os.kill(worker, SIGKILL) from the benchmark; RestartPolicy.ALWAYS; "
                               f"kill -> restarted worker ready: p50 {fmt_t(pct(ready, 50))}"]))
    else: rows.append(_err('7', 'crash -> failed'))
    rows.append(Row('8', 'spawn: start(wait=True) -> worker ready', len(spawn), pct(spawn, 50), pct(spawn, 99))
                if spawn else _err('8', 'spawn'))
    if pdeath:
        pd, stuck = pdeath
        rows.append(Row('9', 'parent SIGKILL -> worker exited', len(pd), pct(pd, 50) if pd else None,
                        pct(pd, 99) if pd else None, target='p50 <= 100 ms',
                        ok=bool(pd) and not stuck and pct(pd, 50) <= 0.100,
                        notes=["app subprocess killed with SIGKILL; worker polled with psutil every 1 ms "
                               "(a zombie counts as exited)"]
                              + ([f"{stuck} worker(s) still alive 5 s after their parent died"] if stuck else [])))
    else: rows.append(_err('9', 'parent death'))

    print("cjm_workers dispatch benchmark")
    print('\n'.join(info))
    print()
    print(table(rows))
    print(f"\ntotal benchmark time {clock() - t_start:.1f} s; load avg at end: "
          + ', '.join(f"{x:.2f}" for x in os.getloadavg()))
    return 1 if any(r.value.startswith('ERROR') for r in rows) else 0  # a MISS is reported, not an error

if __name__ == '__main__':
    sys.exit(main())
