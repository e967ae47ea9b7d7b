"""Plugins and worker entry points for the fault-injection suite (tests/test_faults.py, bench/soak.py), importable by
spawned workers.

- `big`: returns a result of `size` bytes (the 100 MB result).
- `bomb`: returns a result the worker can pickle but the app cannot unpickle (its class's loader raises), as a
  result holding an object from a package installed only in the worker's environment would.
- `hangload`: a plugin whose `initialize` never returns (a model load that hangs).
- `polite`: streams words and stops when its own `cancelled` flag is set, which it never clears itself (the pattern
  docs/plugins.md shows: the worker clears the flag before the plugin's next job).
- `escape`: leaves a daemon holding the worker's descriptors, then SIGKILLs its worker (a crash the sentinel alone
  would not show).
- `groupchild`: leaves a child in its worker's group, ends the worker's backstop, then SIGKILLs its worker.
- `escapees`: leaves processes outside its worker's group (a `start_new_session` child, a double-forked daemon, a
  shell's `setsid cmd &`, and such a daemon started without the worker's mark), then ends its worker as `end` says.
- `f_worker`: the reference plugins plus those; `hang_factory_worker`: a worker whose plugin-manager factory hangs.
- `escapees_app`: an app whose worker runs `escapees` and sleeps (for a test that SIGKILLs the app).
"""
import asyncio, os, signal, sys, time

from cjm_workers.core.config import WorkerConfig
from cjm_workers.core.worker import base_worker_process
from cjm_workers.testing import REFERENCE_PLUGINS, ReferencePlugin, ReferencePluginManager, ReferenceJobManager, fork_daemon


class BigPlugin(ReferencePlugin):
    "Returns `{'text': 'x' * size}`."
    name = 'big'
    def execute(self, size=100 * 2**20, **kwargs): return {'text': 'x' * size, 'metadata': {'size': size}}


class Unloadable:
    "Pickles anywhere; unpickling it raises (as an instance of a class only the other side's environment has would)."
    def __reduce__(self): return (int, ('an Unloadable cannot be rebuilt here',))


class BombPlugin(ReferencePlugin):
    "Returns a result holding an `Unloadable`."
    name = 'bomb'
    def execute(self, **kwargs): return {'text': 'bomb', 'metadata': {'obj': Unloadable()}}


class HangLoadPlugin(ReferencePlugin):
    "A plugin whose load (`initialize`) never returns."
    name = 'hangload'
    def initialize(self, config=None):
        while True: time.sleep(3600)
    def execute(self, **kwargs): return {'text': 'never', 'metadata': {}}


class PolitePlugin(ReferencePlugin):
    "Streams `text` word by word, `delay` apart, until its `cancelled` flag is set."
    name, streams = 'polite', True
    def execute_stream(self, text='a b c', delay=0.05, **kwargs):
        for w in text.split():
            if self.cancelled: return
            yield w + ' '
            time.sleep(delay)
    def execute(self, **kwargs): return {'text': ''.join(self.execute_stream(**kwargs)), 'metadata': {}}


class EscapePlugin(ReferencePlugin):
    """Leaves a daemon in a session of its own that keeps every descriptor the worker had (the process's sentinel pipe
    among them) for `linger` seconds, writes its pid to `pidfile`, then SIGKILLs its worker (as the OOM killer would)."""
    name = 'escape'
    def execute(self, pidfile='', linger=120.0, **kwargs):
        def report(pid):
            with open(pidfile + '.tmp', 'w') as f: f.write(str(pid))
            os.rename(pidfile + '.tmp', pidfile)
        fork_daemon(report, linger)
        while not os.path.exists(pidfile): time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)


class GroupChildPlugin(ReferencePlugin):
    """Starts `sleep` in its worker's group (pid to `pidfile`), ends the worker's backstop (as where there is none: no
    pidfd), then SIGKILLs its worker once `go` exists: the manager alone must kill what the plugin left in the group."""
    name = 'groupchild'
    def execute(self, pidfile='', go='', **kwargs):
        import subprocess, psutil
        child = subprocess.Popen(['sleep', '300'])
        for c in psutil.Process().children():
            if c.name() == 'cjm-backstop': c.kill(); c.wait(5)
        with open(pidfile + '.tmp', 'w') as f: f.write(str(child.pid))
        os.rename(pidfile + '.tmp', pidfile)
        while not os.path.exists(go): time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)


class EscapeesPlugin(ReferencePlugin):
    """Leaves processes that left its worker's process group, writes their pids to `pidfile` (JSON), then ends its
    worker as `end` says (sigkill, segfault, exit: `os._exit(3)`; sleep: until a hard cancel kills it; return: the job
    completes, the worker serves on):
    `session`: `sleep` started with `start_new_session=True`; `daemon`: a double fork into a session of its own, no
    exec (`fork_daemon`); `closed`: the same, closing every descriptor it has; `shell`: `setsid sleep &` from a shell
    that exits (a double fork that execs);
    `unmarked`: the same as `shell`, started with an environment without the worker's mark (opted out)."""
    name = 'escapees'
    def execute(self, pidfile='', end='sigkill', **kwargs):
        import ctypes, json, subprocess
        try: from cjm_workers.core.process import WORKER_MARK_ENV
        except ImportError: WORKER_MARK_ENV = 'CJM_WORKER_MARK'  # (a version without marks: the test runs, and fails)
        pids = {'session': subprocess.Popen(['sleep', '300'], start_new_session=True).pid}
        daemon = pidfile + '.daemon'
        def report(pid):
            with open(daemon + '.tmp', 'w') as f: f.write(str(pid))
            os.rename(daemon + '.tmp', daemon)
        fork_daemon(report, 300)
        while not os.path.exists(daemon): time.sleep(0.01)
        pids['daemon'] = int(open(daemon).read())
        r, w = os.pipe()
        middle = os.fork()
        if middle == 0:  # a double fork whose daemon closes every descriptor it has (as a daemon library does)
            try:
                os.setsid()
                if os.fork() == 0:
                    os.write(w, b'%d\n' % os.getpid())
                    os.closerange(0, 65536)
                    time.sleep(300)
            finally: os._exit(0)
        os.waitpid(middle, 0)
        os.close(w)
        pids['closed'] = int(os.read(r, 100))
        os.close(r)
        def shell_daemon(env=None):
            pid = int(subprocess.run(['sh', '-c', 'setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $!'],
                                     capture_output=True, text=True, check=True, env=env).stdout)
            end = time.monotonic() + 30  # until it has left the worker's group (`setsid` may not have run yet)
            while os.getsid(pid) != pid and time.monotonic() < end: time.sleep(0.005)
            return pid
        pids['shell'] = shell_daemon()
        pids['unmarked'] = shell_daemon({k: v for k, v in os.environ.items() if k != WORKER_MARK_ENV})
        with open(pidfile + '.tmp', 'w') as f: json.dump(pids, f)
        os.rename(pidfile + '.tmp', pidfile)
        if end == 'sigkill': os.kill(os.getpid(), signal.SIGKILL)
        elif end == 'segfault': ctypes.string_at(0)
        elif end == 'exit': os._exit(3)
        elif end == 'sleep': time.sleep(300)  # until its worker is killed (a hard cancel)
        return {'text': json.dumps(pids), 'metadata': pids}


F_PLUGINS = {**REFERENCE_PLUGINS, 'big': BigPlugin, 'bomb': BombPlugin, 'hangload': HangLoadPlugin, 'polite': PolitePlugin,
             'escape': EscapePlugin, 'groupchild': GroupChildPlugin,
             'escapees': EscapeesPlugin}


def _pm(): return ReferencePluginManager(F_PLUGINS)


def f_worker(request_queue, result_queue, response_queue):
    "Worker entry point: the reference plugins plus `big`, `bomb` and `hangload` (streaming on)."
    base_worker_process(request_queue, result_queue, response_queue, plugin_manager_factory=_pm, supports_streaming=True)


def _hanging_factory():
    while True: time.sleep(3600)


def hang_factory_worker(request_queue, result_queue, response_queue):
    "Worker entry point whose plugin-manager factory never returns (the worker never becomes ready)."
    base_worker_process(request_queue, result_queue, response_queue, plugin_manager_factory=_hanging_factory)


class FJobManager(ReferenceJobManager):
    "The reference manager running `f_worker`, with a job store and WorkerConfig keywords."
    def __init__(self, job_store=None, config=None, entry_point=f_worker, **kw):
        super().__init__(worker_config=WorkerConfig(**(config or {})), entry_point=entry_point, **kw)
        if job_store is not None: self.job_store = job_store


async def escapees_app(backend, pidfile):
    """An app (`python -c`): one worker on `backend` ('local' or 'ray': the session's cluster, `RAY_ADDRESS`) runs
    `escapees` with `end='sleep'`; prints the worker's pid once their pids are in `pidfile`, then waits to be killed."""
    if backend == 'ray':
        import ray
        tests = os.path.dirname(os.path.abspath(__file__))
        ray.init(address=os.environ['RAY_ADDRESS'], logging_level='warning', log_to_driver=False,
                 runtime_env={'env_vars': {'PYTHONPATH': os.pathsep.join(filter(None, [tests, os.environ.get('PYTHONPATH')]))}})
    mgr = FJobManager(config=dict(backend=backend))
    await mgr.start(wait=True)
    job = await mgr.start_job('escapees', pidfile=pidfile, end='sleep')
    while not os.path.exists(pidfile): await asyncio.sleep(0.01)
    print(job.worker_pid, flush=True)
    await asyncio.sleep(600)
