"""A model-based test of the job system: a `hypothesis.stateful` machine drives a real `ReferenceJobManager` on a
real `SQLiteJobStore` (a tmp file) with 1-2 real worker processes, and checks the invariants after every step.

The manager lives in a child process (the *host*, `_HOST` below), driven over its stdin/stdout one JSON command at a
time, so that the machine can crash the app for real (SIGKILL of the host: its workers follow) as well as shut it
down cleanly, and open a new manager on the same file. Every plugin appends `<job id> <attempt> <worker pid>` to a
run log when it starts (the reference plugins wrapped by `_PLUGINS`, plus `gate`, which runs until a file exists),
so the test sees how often, in which order and on which worker each job really ran.

Rules: start jobs (echo, failing echo, slow, slow ignoring cancels, tokens, crash in each mode) with random
priorities, timeouts and retries, optionally waiting until the job is written (`wait_saved`); cancel a known job
(pending, running or finished); change a job's priority; SIGKILL a worker; SIGKILL the store's writer process (also
its replacements, and inside bursts and shutdowns); `restart_workers`; `reload_plugin`; shut the manager down (at
once or with a drain) or SIGKILL it, then open a new one; wait for a job; queue jobs with random priorities behind
one gate job per worker, cancel or re-prioritise some, kill a worker or the writer, then open the gates (or crash or
shut down the app, before or while the queue drains) and check the order they started in. Invariants: a job
ends in one terminal state and keeps it (across a clean restart; across a crash, every state `wait_for_job` or the
file confirmed); a job the API reports finished is finished in the file with the same result; a job written to the
file is never lost; a cancelled job never runs again; a job runs at most `1 + max_retries` times and never more often
than its `attempts` say; a completed job ran and has the result its plugin makes; `get_job`, `get_all_jobs`,
`count_jobs`, `get_health` and `get_worker_stats` agree; no worker process or `cjm` thread outlives a shutdown, and
the workers of a SIGKILLed app end; a clean shutdown leaves no job state unwritten (`store.unwritten`), writer deaths
or not; after writer kills `wait_saved` still says True, the job is in the file and the store is healthy again;
jobs that waited together start in (-priority, age) order on each worker (one worker: in all), `started_at` too.

`CJM_MODEL_EXAMPLES` (default 3) and `CJM_MODEL_STEPS` (default 10) set the size of the run; `CJM_MODEL_SEED` a seed
(default: derandomized, the same examples every run); `CJM_MODEL_TRACE=1` prints each command, its answer and time;
`CJM_MODEL_FOCUS=1` turns off the rules other than start, worker and writer kills, the priority queue, bursts and
restarts (and allows 100 starts per example), to hunt those.
Long hunts need `--timeout=0` (pytest-timeout's 300 s).
"""
import json, os, select, signal, subprocess, sys, time
from pathlib import Path

import psutil, pytest
from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

pytestmark = pytest.mark.xdist_group('model')  # one process runs the model (it is heavy: keep it off the others' cores)

TRACE = bool(os.environ.get('CJM_MODEL_TRACE'))  # print each command and its answer
FOCUS = bool(os.environ.get('CJM_MODEL_FOCUS'))  # hunt the writer-kill and priority rules: the other rules are off
MAX_STARTS = 100 if FOCUS else 30  # start_job calls per example
unfocused = precondition(lambda self: not FOCUS)
T = 60  # hang guard for one command to the host
TERMINAL = ('completed', 'failed', 'cancelled')

_PLUGINS = r'''
"""The reference plugins and `gate`, each appending `<job id> <attempt> <pid>` to $CJM_MODEL_RUNLOG when a run starts."""
import os, time
from cjm_workers.core.worker import base_worker_process, check_cancelled, current_job
from cjm_workers.testing import REFERENCE_PLUGINS, ReferencePlugin, ReferencePluginManager

class GatePlugin(ReferencePlugin):
    "Runs until the file `path` exists (a gate the test opens), honouring cancel; two minutes at most."
    name = 'gate'
    def execute(self, path='', **kwargs):
        end = time.monotonic() + 120
        while not os.path.exists(path):
            check_cancelled()
            if time.monotonic() > end: raise TimeoutError(f"the gate {path} was never opened")
            time.sleep(0.005)
        return {'text': 'opened', 'metadata': {}}

def _logged(cls):
    class Logged(cls):
        def _mark(self):
            j = current_job()
            if getattr(self, '_last_run', None) == (j.job_id, j.attempt): return  # (a stream that calls execute)
            self._last_run = (j.job_id, j.attempt)
            fd = os.open(os.environ['CJM_MODEL_RUNLOG'], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try: os.write(fd, f"{j.job_id} {j.attempt} {os.getpid()}\n".encode())
            finally: os.close(fd)
        def execute(self, **kw):
            self._mark()
            return super().execute(**kw)
        def execute_stream(self, **kw):
            self._mark()
            yield from super().execute_stream(**kw)
    Logged.__name__ = Logged.__qualname__ = cls.__name__
    return Logged

def _pm(): return ReferencePluginManager({n: _logged(c) for n, c in {**REFERENCE_PLUGINS, 'gate': GatePlugin}.items()})

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
          'worker_pid', 'params', 'timeout_seconds', 'retry_backoff_seconds', 'started_at')
def runs_of(jid):
    try:
        with open(os.environ['CJM_MODEL_RUNLOG']) as f: return sum(1 for l in f if l.split()[0] == jid)
    except FileNotFoundError: return 0
def jd(j): return None if j is None else {**{k: getattr(j, k) for k in FIELDS}, 'output': str(j.output), 'seq': j._seq}
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

def loop_time(): return asyncio.get_running_loop().time()

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
    if op == 'kill_writer':  # SIGKILL the job store's writer process, then (n > 1) its replacements as they appear
        killed, end = [], loop_time() + 5  # (first until the last batch is committed: at most n deaths in a row, and
        while mgr.job_store.failures and loop_time() < end: await asyncio.sleep(0.005)  # the store promises to hide 3)
        started = []
        for _ in range(c['n']):
            if killed:  # a batch to write: the store starts a new writer for it (killed in turn)
                started.append((await mgr.start_job('echo', text='w', retry_backoff_seconds=0.0)).id)
            end = loop_time() + (2 if killed else 0)
            while (pid := mgr.job_store.writer_pid) in killed or pid is None:
                if loop_time() >= end: return {'killed': killed, 'started': started}
                await asyncio.sleep(0.002)
            try: os.kill(pid, signal.SIGKILL)
            except ProcessLookupError: pass
            killed.append(pid)
        return {'killed': killed, 'started': started}
    if op == 'settle':  # wait for every unfinished job (up to wait_s in all), cancel what is left; all workers up
        end, ended = loop_time() + c['wait_s'], []
        for j in list(mgr.jobs.values()):
            if j.is_terminal: continue
            try: ended.append(jd(await mgr.wait_for_job(j.id, timeout=max(end - loop_time(), 0.01))))
            except TimeoutError:
                await mgr.cancel_job(j.id)
                ended.append(jd(mgr.get_job(j.id)))
        await mgr.restart_workers()
        await mgr.wait_until_ready(timeout=120)
        return {'ended': ended}
    if op == 'running':  # wait until the jobs run, then a moment (no job is sent ahead to a worker past the first 10 ms
        end = loop_time() + 60      # of its job: `prefetch_max_job_seconds`)
        while not all(mgr.get_job(i).status == 'running' for i in c['ids']):
            if loop_time() >= end or any(mgr.get_job(i).is_terminal for i in c['ids']): break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        return {'jobs': [jd(mgr.get_job(i)) for i in c['ids']]}
    if op == 'queued':  # the jobs still in the manager's queue (not sent to a worker)
        with mgr._lock: return {'queued': [i for i in mgr._pending]}
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
        return {'pids': pids, 'children': kids, 'threads': threads, 'unwritten': list(mgr.job_store.unwritten)}
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
        t0 = time.monotonic()
        r = self._read(timeout, op)
        if TRACE and op != 'snapshot':
            print(f"  {op} {kw} -> {json.dumps(r, default=repr)[:300]} ({time.monotonic() - t0:.2f}s)", file=sys.stderr, flush=True)
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
    st.builds(lambda n, d: {'op': 'kill_writer', 'n': n, 'delay': d}, st.integers(1, 2), delays),
)

def batch(ops):
    """Point each `ref` at a start of the batch (or drop the sub-command if the batch starts nothing); keep one writer
    kill (the store hides three writer deaths in a row, no more: then it is `failing`, as for a full disk)."""
    kills = [i for i, o in enumerate(ops) if o['op'] == 'kill_writer']
    ops = [o for i, o in enumerate(ops) if i not in kills[1:]]
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
    if plugin == 'gate': return 'opened'
    return None  # crash


class JobModel(RuleBasedStateMachine):
    "The job system under random operations; `tmp` is set by the test."
    tmp: Path = None
    counter = 0
    total_steps = 0  # invariant checks (≈ steps), over all examples
    episodes = 0  # priority_queue runs (their gate files are named after it)

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
                jid, attempt, _ = line.split()
                out.setdefault(jid, []).append(int(attempt))
        return out

    def run_order(self) -> list:
        "(job id, attempt, worker pid) of every run, in the order the runs started."
        log = self.d / 'runs.log'
        return [(l.split()[0], int(l.split()[1]), int(l.split()[2])) for l in log.read_text().splitlines()] if log.exists() else []

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
        if TRACE: print(f"example {JobModel.counter} at {time.strftime('%H:%M:%S')}: {cfg}", file=sys.stderr, flush=True)
        self.open(cfg)

    @precondition(lambda self: self.starts < MAX_STARTS)  # (not len(known): a crash may add jobs a batch started)
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

    @unfocused
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

    @unfocused
    @rule(i=st.integers(0, 63), priority=st.integers(-3, 3))
    def change_priority(self, i, priority):
        if (jid := self.pick(i)) is None: return
        r = self.host.call('priority', id=jid, priority=priority)
        if r['moved']: self.known[jid][2]['priority'] = priority

    @rule(which=st.integers(0, 1))
    def kill_worker(self, which):
        r = self.host.call('kill_worker', which=which)
        if r['pid']: self.host.pids.add(r['pid'])

    @unfocused
    @rule()
    def restart_workers(self):
        self.host.call('restart')

    QUIET = dict(priority=0, timeout_seconds=None, max_retries=0, retry_backoff_seconds=0.0)

    @rule(n=st.integers(1, 3))
    def kill_writer(self, n):
        """SIGKILL the SQLite store's writer process (and, n > 1, its replacements as they appear). The store's promise
        (docs/architecture.md, the job store): a new writer is started at once and the batch written again; nothing is
        lost, `wait_saved` and `wait_for_job` still return only once the state is in the file, and the store is healthy
        again after the next commit. (The invariants and restarts check the rest: every terminal state kept.)"""
        ended = dict(self.seen)  # the terminal states seen so far: saved before the job below, so written with it
        r = self.host.call('kill_writer', n=n)
        killed = r['killed']
        self.host.pids.update(killed)
        for jid in r['started']: self.known[jid] = ('echo', {'text': 'w'}, dict(self.QUIET))
        self.starts += 1
        r = self.host.call('start', plugin='echo', params={'text': 'w'}, opts=dict(self.QUIET), saved=True)
        j = r['job']
        self.known[j['id']] = ('echo', {'text': 'w'}, dict(self.QUIET))
        assert r['saved'] is True, f"after writer kills, wait_saved said the store failed to write: {r}"
        self.saved.add(j['id'])
        for jid, key in ended.items():  # (wait_saved waited for every state saved before it)
            f = self.reader.get(jid)
            assert f is not None and key == (f.status, (f.result or {}).get('text') if f.status == 'completed' else None), \
                f"after writer kills, job {jid} was {key} but the file holds {f and (f.status, f.result)}"
            self.durable[jid] = key
        r = self.host.call('wait', id=j['id'], wait_s=30)
        assert 'exc' not in r, r
        self.note_terminal(r['job'], durable=True)
        self.check_file(r['job'])
        h = self.host.call('snapshot', ids=[])['health']['store']
        assert h['ok'] and h['failures'] == 0, f"the store is not healthy after a commit: {h}"
        assert h['writer_pid'] not in killed, f"the store names a writer process it has replaced: {h} {killed}"

    @precondition(lambda self: self.starts < MAX_STARTS)
    @rule(queue=st.lists(st.tuples(st.integers(-2, 2), st.booleans(), st.sampled_from([0, 0, 0.02])), min_size=2, max_size=8),
          acts=st.lists(st.one_of(st.tuples(st.just('cancel'), st.integers(0, 15)),
                                  st.tuples(st.just('priority'), st.integers(0, 15), st.integers(-3, 3)),
                                  st.tuples(st.just('kill_worker'), st.integers(0, 1)),
                                  st.tuples(st.just('kill_writer'), st.integers(1, 2)),
                                  st.tuples(st.just('more'), st.integers(-2, 2))), max_size=5),
          end=st.sampled_from(['open', 'open', 'kill_while_draining', 'crash', 'shutdown', 'crash_while_draining',
                               'shutdown_while_draining']),
          cfg=configs)
    def priority_queue(self, queue, acts, end, cfg):
        """Jobs queued behind one gate job per worker (each runs until the test opens its gate), with random
        priorities; some cancelled or re-prioritised, a worker or the store's writer killed, while they wait; then the
        gates open (a worker possibly killed while it drains the queue), or the app crashes or shuts down (before or
        while the queue drains) and a new one takes the queue over. The promise (`start_job`, `_PendingQueue`): of
        the jobs that waited together, one is handed out only after every job of a higher priority and every older
        job of its own; a worker runs its jobs in the order it got them; so the jobs one worker process ran started
        in (-priority, age) order (one worker, none killed: all of them), and their `started_at` times follow."""
        JobModel.episodes += 1
        r = self.host.call('settle', wait_s=5, timeout=T + 150)
        for j in r['ended']:
            self.note_terminal(j, durable=True)
            if j['status'] == 'cancelled': self.cancelled_runs.setdefault(j['id'], len(self.runs().get(j['id'], [])))
        mine, gates = [], []

        def start(plugin, params, priority, saved=False):
            self.starts += 1
            opts = dict(self.QUIET, priority=priority)
            j = self.host.call('start', plugin=plugin, params=params, opts=opts, saved=saved)['job']
            self.known[j['id']] = (plugin, params, opts)
            if saved: self.saved.add(j['id'])
            return j['id']
        for k in range(self.cfg['max_workers']):
            path = str(self.d / f"gate{JobModel.episodes}-{k}")
            gates.append((start('gate', {'path': path}, 3), path))
        gate_jobs = {j['id']: j for j in self.host.call('running', ids=[g for g, _ in gates])['jobs']}
        for p, saved, sleep in queue:
            mine.append(start('echo', {'text': 'q', 'sleep': sleep} if sleep else {'text': 'q'}, p, saved))
        for act in acts:
            if act[0] == 'cancel':
                jid = mine[act[1] % len(mine)]
                r = self.host.call('cancel', id=jid)
                assert r['job']['status'] in TERMINAL, r
                if r['cancelled']: self.cancelled_runs.setdefault(jid, r['runs'])
                self.note_terminal(r['job'], durable=True)
            elif act[0] == 'priority':
                jid = mine[act[1] % len(mine)]
                if self.host.call('priority', id=jid, priority=act[2])['moved']: self.known[jid][2]['priority'] = act[2]
            elif act[0] == 'kill_worker':
                pid = gate_jobs[gates[act[1] % len(gates)][0]]['worker_pid']
                if pid:
                    self.host.pids.add(pid)
                    try: os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError: pass
            elif act[0] == 'kill_writer':
                r = self.host.call('kill_writer', n=act[1])
                self.host.pids.update(r['killed'])
                for jid in r['started']: self.known[jid] = ('echo', {'text': 'w'}, dict(self.QUIET))
                mine += r['started']
            else: mine.append(start('echo', {'text': 'q'}, act[1]))
        queued = set(self.host.call('queued')['queued'])  # these waited together: from now on, no priority changes
        one_worker, old_pids = self.cfg['max_workers'] == 1, set()
        if end.startswith(('crash', 'shutdown')):
            if end.endswith('draining'):  # (the first jobs run, others are sent ahead: the new app takes over the rest)
                self.host.call('restart')
                for _, path in gates: Path(path).touch()
                time.sleep(0.01)
            self.host.note_pids()
            old_pids = set(self.host.pids)
            if end.startswith('crash'):
                self.host.note_pids()
                self.crash(cfg)
            else:
                self.shutdown(0)
                self.open(cfg)
                self.check_resumed()
            one_worker = False  # (the jobs a worker of the old app ran, then the new app's)
        else:
            self.host.call('restart')  # (a killed worker that its restart policy leaves stopped)
            for _, path in gates: Path(path).touch()
            if end == 'kill_while_draining':  # (while it runs the queue's first jobs, or has others sent ahead)
                time.sleep(0.01)
                self.kill_worker(0)
                self.host.call('restart')
                one_worker = False
        for _, path in gates: Path(path).touch()  # (a new app: gates that run again)
        for jid in [g for g, _ in gates] + mine:
            if jid in self.lost: continue
            r = self.host.call('wait', id=jid, wait_s=T, timeout=T + 30)
            assert 'exc' not in r, f"job {jid} did not end: {r}"
            self.note_terminal(r['job'], durable=True)
            self.check_file(r['job'])
        snap = self.host.call('snapshot', ids=sorted(queued - self.lost))['got']
        def rank(jid, pid):  # (a run in the old app: the priority it had there; the file may hold an older one)
            return (-(self.known[jid][2]['priority'] if pid in old_pids else snap[jid]['priority']), snap[jid]['seq'])
        order = [(jid, pid) for jid, _, pid in self.run_order() if jid in snap]
        by_pid = {}
        for jid, pid in order: by_pid.setdefault(pid, []).append(jid)
        if end == 'kill_while_draining' and self.cfg['max_workers'] > 1:  # a job the killed worker held goes back to
            by_pid = {}  # the queue after the other worker may have started a younger one (not a fault: what it started
                         # cannot be undone; found by the first hunt, 2026-12-07, as a false alarm of this check)
        for pid, ids in [(None, [jid for jid, _ in order])] * one_worker + list(by_pid.items()):
            ranks = [rank(i, pid) for i in ids]
            assert ranks == sorted(ranks), (f"jobs that waited together started out of priority order on "
                                            f"{'the worker' if pid is None else f'worker {pid}'}: "
                                            f"{[(i[:8], -r[0], r[1]) for i, r in zip(ids, ranks)]}")
            started = [snap[i]['started_at'] for i in ids if snap[i]['started_at']]
            assert started == sorted(started), f"started_at does not follow the order the jobs started in: {list(zip(ids, started))}"

    @unfocused
    @rule(plugin=st.sampled_from(['echo', 'slow']))
    def reload_plugin(self, plugin):
        self.host.call('reload', plugin=plugin, config={'prefix': ''} if plugin == 'echo' else {}, timeout=120)

    @unfocused
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

    @unfocused
    @rule(ops=batches, drain=st.sampled_from([0, 0.5]), at=delays, cfg=configs)
    def shutdown_during_burst(self, ops, drain, at, cfg):
        self.host.note_pids()
        ops = ops + [{'op': 'shutdown', 'drain': drain, 'delay': at}]
        r = self.host.call('batch', ops=ops, timeout=120)['results']
        self.absorb(ops, r, shut=True)
        assert not r[-1]['children'] and not r[-1]['threads'], f"left after the shutdown: {r[-1]}"
        assert not r[-1]['unwritten'], f"a clean shutdown left job states unwritten: {r[-1]['unwritten']}"
        self.host.p.wait(30)
        self.host.close()
        left = wait_gone(self.host.pids, 10)
        assert not left, f"workers {left} outlived the shutdown"
        self.host = None
        self.open(cfg)
        self.check_resumed()

    @unfocused
    @rule(ops=batches, at=st.sampled_from([0.0, 0.01, 0.05, 0.2]), cfg=configs)
    def crash_during_burst(self, ops, at, cfg):
        self.host.note_pids()
        self.host.p.stdin.write((json.dumps({'op': 'batch', 'ops': ops}) + '\n').encode())
        self.host.p.stdin.flush()
        time.sleep(at)
        self.crash(cfg)

    @unfocused
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
            elif o['op'] == 'kill_writer':
                self.host.pids.update(r['killed'])
                for jid in r['started']: self.known[jid] = ('echo', {'text': 'w'}, dict(self.QUIET))
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
        assert not r['unwritten'], f"a clean shutdown left job states unwritten: {r['unwritten']}"
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


def test_writer_kills_and_priority_order_on_a_fixed_sequence(tmp_path):
    """The writer-kill and priority rules once, on a fixed sequence: the derandomized examples above may reach neither.
    One worker; jobs queued behind a gate, one cancelled, one moved up, the store's writer killed twice in a row, one
    more queued; then the gate opens and the worker is killed while it drains the queue."""
    JobModel.tmp = tmp_path
    m = JobModel()
    cfg = {'max_workers': 1, 'restart_policy': 'always', 'prefetch': 16, 'cancel_grace_seconds': 0.0}
    try:
        m.start_app(cfg)
        m.priority_queue(queue=[(0, False, 0), (2, True, 0), (-1, False, 0), (2, False, 0), (1, False, 0), (0, True, 0)],
                         acts=[('cancel', 2), ('priority', 0, 3), ('kill_writer', 2), ('more', 1)],
                         end='kill_while_draining', cfg=cfg)
        m.consistent()
        m.teardown()
    finally:
        if m.host is not None: m.host.kill()


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
