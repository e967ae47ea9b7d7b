"""Process helpers shared by the tests that kill, watch and count processes (and by the fault scenarios), and the
tests' servers: in a thread (`served`) or a subprocess (`UvicornOutput`)."""
import contextlib, json, os, re, signal, subprocess, sys, threading, time
import psutil
from cjm_workers.testing import RecordingBroadcaster, serve_in_thread, wait_until


def is_resource_tracker(p: psutil.Process) -> bool:
    "multiprocessing's resource tracker (started once per test process by the first 'spawn'); not a leak."
    try: return any('resource_tracker' in part for part in p.cmdline())
    except psutil.Error: return False


def live_descendants():
    "Live (non-zombie) descendants of this process, without multiprocessing's resource tracker."
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and not is_resource_tracker(p): out.append(p)
        except psutil.NoSuchProcess: pass
    return out


def gone(proc) -> bool:
    "True once `proc` (a `psutil.Process` or a pid) has exited (a zombie waiting for a reaper counts as gone)."
    try:
        if not isinstance(proc, psutil.Process): proc = psutil.Process(proc)
        return (not proc.is_running()) or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return True


def wait_gone(procs, timeout: float = 10.0) -> list:
    """Wait until every process in `procs` (pids or `psutil.Process`es) has exited; returns those still there.
    A process SIGKILLed by someone else is not gone the instant the signal is sent: on a busy machine it may still
    have to be scheduled to die, so tests that did not reap a process themselves wait for it with this."""
    try: psutil.wait_procs([p if isinstance(p, psutil.Process) else psutil.Process(p) for p in procs if not gone(p)],
                           timeout=timeout)
    except psutil.NoSuchProcess: pass  # one ended between the two looks: the answer below still counts
    return [p for p in procs if not gone(p)]


def sigkill_after_first_line(cmd: list, cwd: str) -> dict:
    "Run an app script `cmd`, read the JSON line it prints once it is mid-run, SIGKILL it; returns that JSON."
    app = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    try:
        line = app.stdout.readline()
        if not line.strip():
            app.kill(); app.wait(10)
            raise RuntimeError(f"the app printed nothing; stderr:\n{app.stderr.read()}")
        info = json.loads(line)
        os.kill(app.pid, signal.SIGKILL)
        app.wait(10)
    finally:
        if app.poll() is None: app.kill(); app.wait(10)
        app.stdout.close(); app.stderr.close()
    return info


def cjm_threads():
    "Names of this process's threads started by cjm_workers."
    return sorted(t.name for t in threading.enumerate() if t.name.startswith('cjm-'))


def fd_count() -> int: return len(os.listdir('/proc/self/fd'))


def worker_pid(mgr, i: int = 0): return mgr.get_worker_stats()[i]['pid']


def worker_status(mgr, i: int = 0): return mgr.get_worker_stats()[i]['status']


class TimedBroadcaster(RecordingBroadcaster):
    "RecordingBroadcaster that also records the monotonic time each event was broadcast."
    def __init__(self, **kw):
        super().__init__(**kw)
        self.times = []
    async def broadcast(self, event_type, data):
        self.times.append(time.monotonic())
        await super().broadcast(event_type, data)

    def named(self, name):
        "Data of every event `<worker_type>:<name>`, in order."
        return [d for t, d in self.events if t.split(':', 1)[1] == name]


async def child_pid_of(job, timeout=30):
    "The pid the `slow` plugin reports (spawn_child=True) as progress message 'child:<pid>'."
    await wait_until(lambda: (job.progress_message or '').startswith('child:'), timeout)
    return int(job.progress_message.split(':', 1)[1])


def exit_before_ready_worker(request_queue, result_queue, response_queue):
    "Worker entry point that exits with code 1 before it reports ready (as a script without a __main__ guard does)."
    raise SystemExit(1)


def none_factory_worker(request_queue, result_queue, response_queue):
    "Worker entry point whose plugin-manager factory returns None (`def make_plugin_manager(): ...`, as a placeholder)."
    from cjm_workers.core.worker import base_worker_process
    base_worker_process(request_queue, result_queue, response_queue, plugin_manager_factory=lambda: None)


_STRANGER = '''
import subprocess as s, sys
want, tries = int(sys.argv[1]), int(sys.argv[2])
for i in range(tries):  # another process may take the pid first: try again
    try:
        with open('/proc/sys/kernel/ns_last_pid', 'w') as f: f.write(str(want - 1))
    except OSError: pass
    p = s.Popen(['sleep', '300'], start_new_session=True, stdin=s.DEVNULL, stdout=s.DEVNULL, stderr=s.DEVNULL)
    if p.pid == want or i == tries - 1: break
    p.kill(); p.wait()
print(p.pid)
'''

def can_choose_pids() -> bool:
    "Can this process have the kernel give a chosen pid to the next process (root: /proc/sys/kernel/ns_last_pid)?"
    return os.access('/proc/sys/kernel/ns_last_pid', os.W_OK)


def stranger_with_pid(pid: int, tries: int = 20) -> int:
    """Start an unrelated process (`sleep 300`, leading a session and group of its own, not our child), asking the
    kernel for `pid` (needs `can_choose_pids()`), and return the pid it got: `pid` unless that id is still taken."""
    out = subprocess.run([sys.executable, '-c', _STRANGER, str(pid), str(tries)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


@contextlib.contextmanager
def paused(pid: int):
    """The process `pid` stopped (SIGSTOP) for the block, as a process stuck on a slow disk or an overloaded machine
    would be, then continued (unless it has ended meanwhile: e.g. a shutdown killed it)."""
    os.kill(pid, signal.SIGSTOP)
    try: yield pid
    finally:
        try: os.kill(pid, signal.SIGCONT)
        except ProcessLookupError: pass


@contextlib.contextmanager
def served(app, broadcaster=None):
    """`app` under uvicorn in a thread (`serve_in_thread`): its base URL for the block; then the server is stopped,
    the `broadcaster`'s streams ended (a server in a thread gets no signal that would end them) and its thread joined."""
    server, t, base = serve_in_thread(app)
    try: yield base
    finally:
        server.should_exit = True
        if broadcaster is not None: broadcaster.close()
        t.join(30)


class UvicornOutput:
    """For a test's server in a subprocess, `self.proc` (uvicorn's output on its stdout, as text): `_follow()` reads that
    output in a thread of its own into `lines`, sets `port` once uvicorn says where it serves, and `_ready` then (or
    when the output ends: the server exited, `port` None)."""
    def _follow(self):
        self.lines, self.port, self._ready = [], None, threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := re.search(r'Uvicorn running on http://127\.0\.0\.1:(\d+)', line):
                self.port = int(m.group(1))
                self._ready.set()
        self.proc.stdout.close()  # end of its output: the server has exited
        self._ready.set()
