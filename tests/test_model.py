"""A model-based test of the job system: a `hypothesis.stateful` machine drives a real `ReferenceJobManager` on a
real `SQLiteJobStore` (a tmp file) with 1-2 real worker processes, and checks the invariants after every step.

The manager lives in a child process (the *host*, `_HOST` below), driven over its stdin/stdout one JSON command at a
time, so that the machine can crash the app for real (SIGKILL of the host: its workers follow) as well as shut it
down cleanly, and open a new manager on the same file. Every plugin appends `<job id> <attempt>` to a run log when
it starts (the reference plugins wrapped by `_PLUGINS`), so the test sees how often each job really ran.

Rules: start jobs (echo, failing echo, slow, slow ignoring cancels, tokens, crash in each mode) with random
priorities, timeouts and retries, optionally waiting until the job is written (`wait_saved`); cancel a known job
(pending, running or finished); change a job's priority; SIGKILL a worker; `restart_workers`; `reload_plugin`; shut
the manager down (at once or with a drain) or SIGKILL it, then open a new one; wait for a job. Invariants: a job
ends in one terminal state and keeps it (across a clean restart; across a crash, every state `wait_for_job` or the
file confirmed); a job the API reports finished is finished in the file with the same result; a job written to the
file is never lost; a cancelled job never runs again; a job runs at most `1 + max_retries` times and never more often
than its `attempts` say; a completed job ran and has the result its plugin makes; `get_job`, `get_all_jobs`,
`count_jobs`, `get_health` and `get_worker_stats` agree; no worker process or `cjm` thread outlives a shutdown, and
the workers of a SIGKILLed app end.

`CJM_MODEL_EXAMPLES` (default 3) and `CJM_MODEL_STEPS` (default 10) set the size of the run; `CJM_MODEL_SEED` a seed
(default: derandomized, the same examples every run).
"""
import json, os, select, signal, subprocess, sys, time
from pathlib import Path

import psutil, pytest
from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

pytestmark = pytest.mark.xdist_group('model')  # one process runs the model (it is heavy: keep it off the others' cores)

TRACE = bool(os.environ.get('CJM_MODEL_TRACE'))  # print each command and its answer
T = 60  # hang guard for one command to the host
TERMINAL = ('completed', 'failed', 'cancelled')

_PLUGINS = r'''
"""The reference plugins, each appending `<job id> <attempt>` to $CJM_MODEL_RUNLOG when a run starts."""
import os
from cjm_workers.core.worker import base_worker_process, current_job
from cjm_workers.testing import REFERENCE_PLUGINS, ReferencePluginManager

def _logged(cls):
    class Logged(cls):
        def _mark(self):
            j = current_job()
            if getattr(self, '_last_run', None) == (j.job_id, j.attempt): return  # (a stream that calls execute)
            self._last_run = (j.job_id, j.attempt)
            fd = os.open(os.environ['CJM_MODEL_RUNLOG'], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try: os.write(fd, f"{j.job_id} {j.attempt}\n".encode())
            finally: os.close(fd)
        def execute(self, **kw):
            self._mark()
            return super().execute(**kw)
        def execute_stream(self, **kw):
            self._mark()
            yield from super().execute_stream(**kw)
    Logged.__name__ = Logged.__qualname__ = cls.__name__
    return Logged

def _pm(): return ReferencePluginManager({n: _logged(c) for n, c in REFERENCE_PLUGINS.items()})

def model_worker(request_queue, result_queue, response_queue):
    base_worker_process(request_queue, result_queue, response_queue, plugin_manager_factory=_pm, supports_streaming=True)
'''

_HOST = r'''
"""The app: a manager on a SQLite store, driven by JSON lines on stdin; answers are stdout lines starting @@RPC."""
import asyncio, json, os, signal, sys, threading, traceback
sys.path.insert(0, sys.argv[1])
import psutil
from cjm_workers.core.config import WorkerConfig, RestartPolicy
from cjm_workers.stores.sqlite import SQLiteJobStore
from cjm_workers.testing import ReferenceJobManager
from model_plugins import model_worker

FIELDS = ('id', 'plugin_id', 'status', 'reason', 'error', 'result', 'attempts', 'max_retries', 'priority', 'attempt_log',
          'worker_pid', 'params', 'timeout_seconds', 'retry_backoff_seconds')
def runs_of(jid):
    try:
        with open(os.environ['CJM_MODEL_RUNLOG']) as f: return sum(1 for l in f if l.split()[0] == jid)
    except FileNotFoundError: return 0
def jd(j): return None if j is None else {**{k: getattr(j, k) for k in FIELDS}, 'output': str(j.output)}
def out(obj): sys.stdout.write('@@RPC ' + json.dumps(obj, default=repr) + '\n'); sys.stdout.flush()

def snapshot(mgr, ids):
    with mgr._lock:  # one consistent view (the loop is here, the management thread waits)
        got = {i: jd(mgr.get_job(i)) for i in ids}
        listed = [jd(j) for j in mgr.get_all_jobs()]
        by_status = {s: [j.id for j in mgr.get_all_jobs(s)] for s in ('pending', 'running', 'completed', 'failed', 'cancelled')}
        counts = {s: mgr.count_jobs(s) for s in by_status}
        health, stats = mgr.get_health(), mgr.get_worker_stats()
        live = {i: j.status for i, j in mgr.jobs.items()}
        waiting = mgr._waiting()
    return dict(got=got, listed=listed, by_status=by_status, counts=counts, health=health, stats=stats, live=live,
                waiting=waiting)

async def handle(mgr, c):
    op = c['op']
    if op == 'start':
        j = await mgr.start_job(c['plugin'], **c['opts'], **c['params'])
        saved = await mgr.wait_saved(j.id, timeout=30) if c['saved'] else None
        return {'job': jd(j), 'saved': saved}
    if op == 'cancel':
        r = await mgr.cancel_job(c['id'])
        return {'cancelled': r, 'job': jd(mgr.get_job(c['id'])), 'runs': runs_of(c['id'])}
    if op == 'wait':
        try: return {'job': jd(await mgr.wait_for_job(c['id'], timeout=c['wait_s']))}
        except (TimeoutError, KeyError, RuntimeError) as e: return {'exc': type(e).__name__, 'msg': str(e), 'job': jd(mgr.get_job(c['id']))}
    if op == 'priority': return {'moved': mgr.set_job_priority(c['id'], c['priority'])}
    if op == 'kill_worker':
        pids = [s['pid'] for s in mgr.get_worker_stats() if s['pid']]
        if not pids: return {'pid': None}
        pid = pids[c['which'] % len(pids)]
        try: os.kill(pid, signal.SIGKILL)
        except ProcessLookupError: pass
        return {'pid': pid}
    if op == 'restart': await mgr.restart_workers(); return {}
    if op == 'reload': return {'reloaded': await mgr.reload_plugin(c['plugin'], c['config'])}
    if op == 'snapshot': return snapshot(mgr, c['ids'])
    if op == 'batch':  # the sub-commands at once, each after its delay; a cancel may name a start of the batch ('ref')
        started = {}
        async def one(i, sub):
            await asyncio.sleep(sub.get('delay', 0))
            if 'ref' in sub:
                ref = await started.setdefault(sub['ref'], asyncio.get_running_loop().create_future())
                if ref is None: return {'skipped': True}
                sub = {**sub, 'id': ref}
            try: r = await handle(mgr, sub)
            except Exception as e: r = {'exc': type(e).__name__, 'msg': str(e)}
            if sub['op'] == 'start':
                f = started.setdefault(i, asyncio.get_running_loop().create_future())
                f.set_result(r['job']['id'] if 'job' in r else None)
            return r
        for i, sub in enumerate(c['ops']):
            if sub['op'] == 'start': started.setdefault(i, asyncio.get_running_loop().create_future())
        return {'results': await asyncio.gather(*(one(i, sub) for i, sub in enumerate(c['ops'])))}
    if op == 'pids': return {'pids': [s['pid'] for s in mgr.get_worker_stats() if s['pid']]}
    if op == 'shutdown':
        pids = [s['pid'] for s in mgr.get_worker_stats() if s['pid']]
        await mgr.ashutdown(drain_timeout=c['drain'])
        kids = [(p.pid, p.cmdline()) for p in psutil.Process().children(recursive=True)  # (not multiprocessing's own)
                if p.status() != psutil.STATUS_ZOMBIE and 'resource_tracker' not in ' '.join(p.cmdline())]
        threads = [t.name for t in threading.enumerate() if t.name.startswith('cjm')]
        return {'pids': pids, 'children': kids, 'threads': threads}
    raise ValueError(f"unknown op {op!r}")

async def main(db, cfg):
    cfg = dict(cfg, restart_policy=RestartPolicy(cfg['restart_policy']))
    mgr = ReferenceJobManager(worker_config=WorkerConfig(**cfg), entry_point=model_worker, job_store=SQLiteJobStore(db))
    await mgr.start(wait=True, timeout=120)
    out({'ok': True, 'pids': [s['pid'] for s in mgr.get_worker_stats() if s['pid']]})
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line: return
        c = json.loads(line)
        try: out({'ok': True, **await handle(mgr, c)})
        except Exception as e: out({'ok': False, 'exc': type(e).__name__, 'msg': str(e), 'tb': traceback.format_exc()})
        if c['op'] == 'shutdown' or any(s['op'] == 'shutdown' for s in c.get('ops', ())): return

if __name__ == '__main__':
    asyncio.run(main(sys.argv[2], json.loads(sys.argv[3])))
    os._exit(0)  # (the executor thread blocked in readline)
'''


def gone(pid: int) -> bool:
    try: return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return True


class Host:
    "The app process: a manager on the database, driven one command at a time."
    def __init__(self, d: Path, db: Path, cfg: dict):
        self.err = open(d / 'host.err', 'ab')
        env = {**os.environ, 'CJM_MODEL_RUNLOG': str(d / 'runs.log'),
               'PYTHONPATH': os.pathsep.join(filter(None, [str(d), os.environ.get('PYTHONPATH')]))}
        self.p = subprocess.Popen([sys.executable, str(d / 'model_host.py'), str(d), str(db), json.dumps(cfg)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env, cwd=str(d))
        self.d, self.buf = d, b''
        self.pids = set(self._read(180, 'start')['pids'])

    def tail(self) -> str:
        self.err.flush()
        return (self.d / 'host.err').read_bytes()[-3000:].decode(errors='replace')

    def _read(self, timeout: float, what: str) -> dict:
        end = time.monotonic() + timeout
        while True:
            while b'\n' in self.buf:
                line, self.buf = self.buf.split(b'\n', 1)
                if line.startswith(b'@@RPC '):
                    r = json.loads(line[6:])
                    if not r['ok']: raise AssertionError(f"{what} raised in the app: {r['exc']}: {r['msg']}\n{r.get('tb')}")
                    return r
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the app did not answer {what} within {timeout}s (a hang)\n{self.tail()}")
            if select.select([self.p.stdout], [], [], left)[0]:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk: raise AssertionError(f"the app died during {what} ({self.p.poll()})\n{self.tail()}")
                self.buf += chunk

    def call(self, op: str, timeout: float = T, **kw) -> dict:
        self.p.stdin.write((json.dumps({'op': op, **kw}) + '\n').encode())
        self.p.stdin.flush()
        r = self._read(timeout, op)
        if TRACE and op != 'snapshot': print(f"  {op} {kw} -> {json.dumps(r, default=repr)[:300]}", file=sys.stderr, flush=True)
        if 'pids' in r and op != 'shutdown': self.pids |= set(r['pids'])
        return r

    def note_pids(self): self.pids |= set(self.call('pids')['pids'])

    def kill(self):
        try: self.pids |= {c.pid for c in psutil.Process(self.p.pid).children(recursive=True)}  # workers, store writer
        except psutil.NoSuchProcess: pass
        self.p.kill()
        self.p.wait(30)
        self.close()

    def close(self):
        for f in (self.p.stdin, self.p.stdout):
            try: f.close()
            except OSError: pass
        self.err.close()


def wait_gone(pids, timeout: float = 30) -> list:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        left = [p for p in pids if not gone(p)]
        if not left: return []
        time.sleep(0.05)
    return [p for p in pids if not gone(p)]


# --------------------------------------------------------------------------------------------------------------
# the model

configs = st.fixed_dictionaries({
    'max_workers': st.integers(1, 2),
    'restart_policy': st.sampled_from(['always', 'on_cancellation', 'backoff']),
    'prefetch': st.sampled_from([1, 16]),
    'cancel_grace_seconds': st.sampled_from([0.0, 0.3]),
})
job_opts = st.fixed_dictionaries({
    'priority': st.integers(-2, 2),
    'timeout_seconds': st.sampled_from([None, None, 0.25, 3.0]),
    'max_retries': st.sampled_from([0, 0, 1, 2]),
    'retry_backoff_seconds': st.sampled_from([0.0, 0.1]),
})
jobs = st.one_of(
    st.builds(lambda t: ('echo', {'text': t}), st.sampled_from(['a', 'bb', 'ccc'])),
    st.builds(lambda t, s: ('echo', {'text': t, 'sleep': s}), st.sampled_from(['d', 'e']), st.sampled_from([0.05, 0.3])),
    st.builds(lambda m: ('echo', {'text': 'f', 'fail': m}), st.just('boom')),
    st.builds(lambda s, i: ('slow', {'seconds': s, 'ignore_cancel': i}), st.sampled_from([0.1, 0.4, 1.5]), st.booleans()),
    st.builds(lambda d: ('tokens', {'text': 'one two three four', 'delay': d}), st.sampled_from([0.0, 0.05, 0.2])),
    st.builds(lambda m, a: ('crash', {'mode': m, 'after': a}), st.sampled_from(['sigkill', 'segfault', 'exit', 'abort']),
              st.sampled_from([0.0, 0.1])),
)


delays = st.sampled_from([0, 0, 0.005, 0.02, 0.1, 0.3])
sub_ops = st.one_of(
    st.builds(lambda job, opts, saved, d: {'op': 'start', 'plugin': job[0], 'params': job[1], 'opts': opts, 'saved': saved,
                                           'delay': d}, jobs, job_opts, st.booleans(), delays),
    st.builds(lambda ref, d: {'op': 'cancel', 'ref': ref, 'delay': d}, st.integers(0, 4), delays),
    st.builds(lambda ref, p, d: {'op': 'priority', 'ref': ref, 'priority': p, 'delay': d}, st.integers(0, 4),
              st.integers(-3, 3), delays),
    st.builds(lambda ref, d: {'op': 'wait', 'ref': ref, 'wait_s': 0.3, 'delay': d}, st.integers(0, 4), delays),
    st.builds(lambda w, d: {'op': 'kill_worker', 'which': w, 'delay': d}, st.integers(0, 1), delays),
    st.builds(lambda d: {'op': 'restart', 'delay': d}, delays),
)

def batch(ops):
    "Point each `ref` at a start of the batch (or drop the sub-command if the batch starts nothing)."
    starts = [i for i, o in enumerate(ops) if o['op'] == 'start']
    out = []
    for o in ops:
        if 'ref' in o:
            if not starts: continue
            o = {**o, 'ref': starts[o['ref'] % len(starts)]}
        out.append(o)
    return out

batches = st.lists(sub_ops, min_size=2, max_size=6).map(batch)


def expected_result(plugin: str, params: dict):
    "The `result['text']` of a completed job, or None if it must never complete."
    if plugin == 'echo': return None if params.get('fail') else params['text']
    if plugin == 'slow': return f"slept {params['seconds']}s"
    if plugin == 'tokens': return params['text']
    return None  # crash


class JobModel(RuleBasedStateMachine):
    "The job system under random operations; `tmp` is set by the test."
    tmp: Path = None
    counter = 0
    total_steps = 0  # invariant checks (≈ steps), over all examples

    def __init__(self):
        super().__init__()
        JobModel.counter += 1
        self.d = self.tmp / f"ex{JobModel.counter}"
        self.d.mkdir()
        (self.d / 'model_plugins.py').write_text(_PLUGINS)
        (self.d / 'model_host.py').write_text(_HOST)
        self.db = self.d / 'jobs.db'
        self.host = None
        self.reader = None
        self.known = {}       # job id → (plugin, params, opts)
        self.saved = set()    # jobs the file is known to hold (wait_saved said so, or they were read from it)
        self.seen = {}        # job id → the terminal (status, result) seen for it
        self.durable = {}     # job id → the terminal (status, result) the file is known to hold
        self.cancelled_runs = {}  # job id → its runs when cancel_job said it ended cancelled
        self.lost = set()     # jobs a crash may have lost (never known to be in the file) and that are gone
        self.steps = 0
        self.starts = 0       # start_job calls

    # ---- helpers ----
    def open(self, cfg):
        self.cfg = dict(cfg, restart_backoff_base_seconds=0.05, restart_backoff_max_seconds=0.2,
                        worker_start_timeout_seconds=60, shutdown_timeout_seconds=10)
        self.host = Host(self.d, self.db, self.cfg)
        if self.reader is None:
            from cjm_workers.stores.sqlite import SQLiteJobStore
            self.reader = SQLiteJobStore(self.db, worker_type='reference')

    def runs(self) -> dict:
        log, out = self.d / 'runs.log', {}
        if log.exists():
            for line in log.read_text().splitlines():
                jid, attempt = line.split()
                out.setdefault(jid, []).append(int(attempt))
        return out

    def note_terminal(self, j: dict, durable: bool):
        "A terminal state was seen (durable: in the file); it must match what was seen before."
        jid = j['id']
        key = (j['status'], (j['result'] or {}).get('text') if j['status'] == 'completed' else None)
        prev = self.seen.get(jid)
        assert prev is None or prev == key, f"job {jid} was {prev}, now {key}: {j}"
        self.seen[jid] = key
        if durable: self.durable[jid] = key
        plugin, params, opts = self.known[jid]
        if j['status'] == 'completed':
            want = expected_result(plugin, params)
            assert want is not None, f"a {plugin} job {params} completed: {j}"
            assert j['result']['text'] == want, (j, want)
        runs = self.runs().get(jid, [])
        if j['status'] == 'completed': assert runs, f"job {jid} completed without running: {j}"
        assert len(runs) <= j['attempts'] <= 1 + opts['max_retries'], (jid, runs, j)
        assert len(runs) == len(set(runs)), f"job {jid} ran one attempt twice: {runs} {j}"
        if not opts['max_retries']: assert len(runs) <= 1, (jid, runs, j)
        if j['status'] == 'cancelled' and (j['reason'] or '').startswith('cancelled before it started'):
            assert not runs, f"job {jid} ran but says it was cancelled before it started: {runs} {j}"

    def check_file(self, j: dict):
        "A job the API reports finished is finished in the file with the same result."
        f = self.reader.get(j['id'])
        assert f is not None, f"job {j['id']} is {j['status']} but not in the file"
        assert (f.status, f.result, f.attempts) == (j['status'], j['result'], j['attempts']), \
            (j, {'status': f.status, 'result': f.result, 'attempts': f.attempts, 'reason': f.reason})
        self.saved.add(j['id'])

    # ---- rules ----
    @initialize(cfg=configs)
    def start_app(self, cfg):
        self.open(cfg)

    @precondition(lambda self: self.starts < 30)  # (not len(known): a crash may add jobs a batch started)
    @rule(job=jobs, opts=job_opts, saved=st.booleans())
    def start_job(self, job, opts, saved):
        self.starts += 1
        plugin, params = job
        r = self.host.call('start', plugin=plugin, params=params, opts=opts, saved=saved)
        j = r['job']
        self.known[j['id']] = (plugin, params, opts)
        if r['saved']: self.saved.add(j['id'])

    def pick(self, i):
        "A known job (None if there are none, or it was lost): drawn by index, so no draw depends on what the app did."
        jid = sorted(self.known)[i % len(self.known)] if self.known else None
        return None if jid in self.lost else jid

    @rule(i=st.integers(0, 63))
    def cancel_job(self, i):
        if (jid := self.pick(i)) is None: return
        before = self.seen.get(jid)
        r = self.host.call('cancel', id=jid)
        j = r['job']
        assert j is not None and j['status'] in TERMINAL, f"cancel_job returned before the job ended: {r}"
        if before is not None: assert not r['cancelled'], f"cancel_job of a job that had ended said True: {r}"
        else: assert r['cancelled'] == (j['status'] == 'cancelled'), r  # (only cancel_job cancels these plugins' jobs)
        if r['cancelled']: self.cancelled_runs.setdefault(jid, len(self.runs().get(jid, [])))
        self.note_terminal(j, durable=True)  # (cancel_job returns once the job's end is written, as wait_for_job does)

    @rule(i=st.integers(0, 63), priority=st.integers(-3, 3))
    def change_priority(self, i, priority):
        if (jid := self.pick(i)) is None: return
        r = self.host.call('priority', id=jid, priority=priority)
        if r['moved']: self.known[jid][2]['priority'] = priority

    @rule(which=st.integers(0, 1))
    def kill_worker(self, which):
        r = self.host.call('kill_worker', which=which)
        if r['pid']: self.host.pids.add(r['pid'])

    @rule()
    def restart_workers(self):
        self.host.call('restart')

    @rule(plugin=st.sampled_from(['echo', 'slow']))
    def reload_plugin(self, plugin):
        self.host.call('reload', plugin=plugin, config={'prefix': ''} if plugin == 'echo' else {}, timeout=120)

    @rule(i=st.integers(0, 63), timeout=st.sampled_from([0.2, 1.0, 5.0]))
    def wait_for_job(self, i, timeout):
        if (jid := self.pick(i)) is None: return
        r = self.host.call('wait', id=jid, wait_s=timeout)
        assert r.get('exc') in (None, 'TimeoutError'), r
        if 'exc' not in r:
            self.note_terminal(r['job'], durable=True)
            self.check_file(r['job'])

    @rule(drain=st.sampled_from([0, 0, 0.5]), cfg=configs)
    def shutdown_and_reopen(self, drain, cfg):
        self.shutdown(drain)
        self.open(cfg)
        self.check_resumed()

    @rule(cfg=configs, pause=st.sampled_from([0.0, 0.05, 0.3]))
    def crash_and_reopen(self, cfg, pause):
        self.host.note_pids()
        if pause: time.sleep(pause)
        self.crash(cfg)

    @rule(ops=batches)
    def burst(self, ops):
        "Several commands at once, on the app's event loop."
        self.absorb(ops, self.host.call('batch', ops=ops, timeout=120)['results'])

    @rule(ops=batches, drain=st.sampled_from([0, 0.5]), at=delays, cfg=configs)
    def shutdown_during_burst(self, ops, drain, at, cfg):
        self.host.note_pids()
        ops = ops + [{'op': 'shutdown', 'drain': drain, 'delay': at}]
        r = self.host.call('batch', ops=ops, timeout=120)['results']
        self.absorb(ops, r, shut=True)
        assert not r[-1]['children'] and not r[-1]['threads'], f"left after the shutdown: {r[-1]}"
        self.host.p.wait(30)
        self.host.close()
        left = wait_gone(self.host.pids, 10)
        assert not left, f"workers {left} outlived the shutdown"
        self.host = None
        self.open(cfg)
        self.check_resumed()

    @rule(ops=batches, at=st.sampled_from([0.0, 0.01, 0.05, 0.2]), cfg=configs)
    def crash_during_burst(self, ops, at, cfg):
        self.host.note_pids()
        self.host.p.stdin.write((json.dumps({'op': 'batch', 'ops': ops}) + '\n').encode())
        self.host.p.stdin.flush()
        time.sleep(at)
        self.crash(cfg)

    @rule(drain=st.sampled_from([0, 0.5]), at=st.sampled_from([0.0, 0.01, 0.05, 0.2]), cfg=configs)
    def crash_during_shutdown(self, drain, at, cfg):
        "The app dies while it shuts down (a second signal, an OOM kill)."
        self.host.note_pids()
        self.host.p.stdin.write((json.dumps({'op': 'shutdown', 'drain': drain}) + '\n').encode())
        self.host.p.stdin.flush()
        time.sleep(at)
        self.crash(cfg)

    def absorb(self, ops, results, shut=False):
        "Check the answers of a batch and learn its jobs."
        pairs = sorted(zip(ops, results), key=lambda p: p[0]['op'] != 'start')  # (its jobs first)
        for o, r in pairs:
            if TRACE: print(f"    {o} -> {json.dumps(r, default=repr)[:200]}", file=sys.stderr)
            if r.get('skipped'): continue
            if 'exc' in r and o['op'] != 'wait':  # (wait answers its TimeoutError itself)
                assert shut and r['exc'] == 'RuntimeError', f"{o} raised {r}"
                continue
            if o['op'] == 'start':
                self.known[r['job']['id']] = (o['plugin'], o['params'], dict(o['opts']))
                if r['saved']: self.saved.add(r['job']['id'])
            elif o['op'] == 'cancel':
                j = r['job']
                assert j is not None and j['status'] in TERMINAL, f"cancel_job returned before the job ended: {r}"
                if r['cancelled']:
                    assert j['status'] == 'cancelled', r
                    self.cancelled_runs.setdefault(j['id'], r['runs'])
                self.note_terminal(j, durable=True)
            elif o['op'] == 'wait':
                assert r.get('exc') in (None, 'TimeoutError') or (shut and r['exc'] == 'RuntimeError'), r
                if 'exc' not in r:
                    self.note_terminal(r['job'], durable=True)
                    self.check_file(r['job'])

    def crash(self, cfg):
        self.host.kill()
        left = wait_gone(self.host.pids)
        assert not left, f"workers {left} outlived their SIGKILLed app"
        self.host = None
        self.seen = dict(self.durable)  # what was only seen in memory may be undone (documented: write-behind)
        self.open(cfg)
        self.check_resumed()

    def shutdown(self, drain):
        self.host.note_pids()
        r = self.host.call('shutdown', drain=drain, timeout=120)
        assert not r['children'], f"worker processes {r['children']} outlived the shutdown"
        assert not r['threads'], f"threads {r['threads']} outlived the shutdown"
        self.host.p.wait(30)
        self.host.close()
        left = wait_gone(self.host.pids, 10)
        assert not left, f"workers {left} outlived the shutdown"
        self.host = None

    def check_resumed(self):
        "After a restart: every job the file held is still there, and every terminal state the file held is kept."
        snap = self.host.call('snapshot', ids=sorted(self.known))
        for j in snap['listed']:  # jobs of a batch whose answer the crash lost
            if j['id'] not in self.known:
                self.known[j['id']] = (j['plugin_id'], j['params'], {'max_retries': j['max_retries']})
                snap['got'][j['id']] = j
        for jid in sorted(self.known):
            j = snap['got'][jid]
            if j is None:
                assert jid not in self.saved, f"job {jid} was in the file, and is lost after a restart"
                self.lost.add(jid)
            elif jid in self.durable:
                assert j['status'] in TERMINAL, (jid, self.durable[jid], j)

    # ---- invariants ----
    @invariant()
    def consistent(self):
        if self.host is None: return
        self.steps += 1
        JobModel.total_steps += 1
        snap = self.host.call('snapshot', ids=sorted(self.known))
        runs = self.runs()
        for jid, j in snap['got'].items():
            if jid in self.lost:
                assert j is None, f"job {jid} came back: {j}"
                continue
            assert j is not None, f"job {jid} is unknown to get_job"
            if j['status'] in TERMINAL: self.note_terminal(j, durable=False)
            else: assert jid not in self.seen, f"job {jid} was {self.seen[jid]}, now {j['status']}: {j}"
            if jid in self.cancelled_runs:
                assert len(runs.get(jid, [])) == self.cancelled_runs[jid], f"cancelled job {jid} ran again: {runs.get(jid)}"
        listed = {j['id']: j for j in snap['listed']}
        assert set(listed) == set(self.known) - self.lost, (set(listed) ^ (set(self.known) - self.lost))
        for jid, j in listed.items():
            assert j['status'] == snap['got'][jid]['status'], (j, snap['got'][jid])
        for s, ids in snap['by_status'].items():
            assert sorted(ids) == sorted(i for i, j in listed.items() if j['status'] == s), (s, ids)
            assert snap['counts'][s] == len(ids), (s, snap['counts'][s], ids)
        h, stats = snap['health'], snap['stats']
        running = {i for i, j in listed.items() if j['status'] == 'running'}
        assert {s['current_job_id'] for s in stats if s['current_job_id']} == running, (stats, running)
        assert h['running'] == len(running), (h, running)
        assert h['workers']['ready'] == sum(s['status'] in ('idle', 'busy') for s in stats), (h, stats)
        assert snap['waiting'] == sum(1 for j in listed.values() if j['status'] == 'pending'), (snap['waiting'], listed)
        all_failed = all(s['status'] == 'failed' for s in stats)
        assert h['ok'] == (not all_failed and h['store'].get('ok', True)), (h, stats)

    def teardown(self):
        try:
            if self.host is not None:
                self.host.call('restart')
                for jid in sorted(self.known):
                    if jid in self.lost: continue
                    r = self.host.call('wait', id=jid, wait_s=T, timeout=T + 30)
                    assert 'exc' not in r, f"job {jid} did not end: {r}"
                    self.note_terminal(r['job'], durable=True)
                    self.check_file(r['job'])
                self.consistent()
                self.shutdown(0)
        finally:
            if self.host is not None: self.host.kill()
            if self.reader is not None: self.reader.close()


def test_the_job_system_against_its_model(tmp_path):
    JobModel.tmp = tmp_path
    seed = os.environ.get('CJM_MODEL_SEED')
    s = settings(max_examples=int(os.environ.get('CJM_MODEL_EXAMPLES', 3)),
                 stateful_step_count=int(os.environ.get('CJM_MODEL_STEPS', 10)),
                 deadline=None, derandomize=seed is None, database=None, print_blob=True,
                 phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
                 suppress_health_check=list(HealthCheck))
    if seed is not None:
        from hypothesis import seed as hseed
        hseed(int(seed))(JobModel)
    run_state_machine_as_test(JobModel, settings=s)


# --------------------------------------------------------------------------------------------------------------
# regressions the model found (each minimised from a failing sequence)

async def test_a_job_cancelled_while_waiting_for_its_retry_no_longer_counts_as_waiting(make_manager):
    """Model finding: `cancel_job` of a job waiting for its retry left the retry's entry in the manager's heap until it
    fell due, and `_waiting()` counted it: the health invariant saw one job "waiting" and none pending, and with
    `max_waiting_jobs=1` every `start_job` raised `QueueFull` for the rest of the backoff (30 s here) though nothing
    waited. Now the cancel takes the entry out."""
    from cjm_workers.testing import wait_until
    m = make_manager(config=dict(max_waiting_jobs=1))
    j = await m.start_job('echo', fail='boom', max_retries=1, retry_backoff_seconds=30)
    await wait_until(lambda: j.attempts == 1 and j.status == 'pending', 30)  # its first run failed: its retry is 30 s away
    assert await m.cancel_job(j.id) and j.reason == 'cancelled while waiting for its retry'
    assert m._waiting() == 0
    assert (await m.wait_for_job((await m.start_job('echo', text='x')).id, timeout=30)).result['text'] == 'x'
