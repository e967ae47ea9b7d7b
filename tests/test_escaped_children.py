"""Processes a plugin started that left its worker's process group (`start_new_session=True`, a double-forked daemon,
one that closed every descriptor, a shell's `setsid cmd &`) end with the worker however it ends: a crash (SIGKILL,
segfault, `os._exit`), a hard cancel, a stop, the app's death. The worker marks what it starts (`WORKER_MARK_ENV` in
the environment, a mapped memfd); its backstop kills the marked processes once the worker is dead, a worker ending on
its own does it on its way out. A detached process started with an environment without the mark is left alone."""
import asyncio, json, os, signal, subprocess, sys, time
from pathlib import Path
import psutil, pytest
from cjm_workers.core.config import RestartPolicy
from cjm_workers.testing import wait_until
from _a_helpers import gone, worker_pid

pytestmark = pytest.mark.backends('local', 'ray')  # the backstop lives in the worker process on both backends

ESCAPED = ('session', 'daemon', 'closed', 'shell')  # the kinds `escapees` leaves that must die with the worker


def _pids(pidfile):
    with open(pidfile) as f: return json.load(f)


def _alive(pids):
    return {k: p for k, p in pids.items() if not gone(p)}


def _kill(pids):
    for p in pids.values():
        try: os.kill(p, signal.SIGKILL)
        except ProcessLookupError: pass


async def _escapees(make_manager, tmp_path, end, **config):
    from _f_plugins import f_worker
    mgr = make_manager(dict(restart_policy=RestartPolicy.ALWAYS, **config), entry_point=f_worker)
    await mgr.start(wait=True)
    pidfile = str(tmp_path / 'pids.json')
    job = await mgr.start_job('escapees', pidfile=pidfile, end=end)
    await wait_until(lambda: os.path.exists(pidfile) or job.status not in ('pending', 'running'), 60)
    assert os.path.exists(pidfile), (job.status, job.error)
    pids = _pids(pidfile)
    for k in ESCAPED: assert os.getsid(pids[k]) != os.getsid(0), k  # (they did leave: a session of their own)
    return mgr, job, pids


async def _gone_within(pids, timeout=10):
    "Hang guard only: the escapees must end; the one started without the mark must not."
    escaped = {k: pids[k] for k in ESCAPED}
    try: await wait_until(lambda: not _alive(escaped), timeout)
    except (AssertionError, TimeoutError, asyncio.TimeoutError): pass
    assert not _alive(escaped), f"still running after their worker ended: {_alive(escaped)}"
    assert not gone(pids['unmarked']), "a process started without the worker's mark was killed"


@pytest.mark.parametrize('end, expect', [('sigkill', 'SIGKILL'), ('segfault', 'SIGSEGV'), ('exit', 'code 3')])
async def test_a_crashed_workers_escaped_children_are_killed(make_manager, tmp_path, end, expect):
    mgr, job, pids = await _escapees(make_manager, tmp_path, end)
    try:
        job = await mgr.wait_for_job(job.id, timeout=30)
        assert job.status == 'failed' and 'WorkerDied' in job.error and expect in job.error, (job.status, job.error)
        await _gone_within(pids)
        nxt = await mgr.wait_for_job((await mgr.start_job('echo', text='after')).id, timeout=30)  # restarted (ALWAYS)
        assert nxt.status == 'completed', (nxt.status, nxt.reason)
        assert mgr.get_worker_stats()[0]['restarts'] == 1
    finally: _kill(pids)


async def test_a_hard_cancelled_workers_escaped_children_are_killed(make_manager, tmp_path):
    "On Ray the manager and the actor both kill the tree: neither kills the backstop (see the test below)."
    mgr, job, pids = await _escapees(make_manager, tmp_path, 'sleep', cancel_grace_seconds=0)
    try:
        await mgr.cancel_job(job.id)
        job = await mgr.wait_for_job(job.id, timeout=30)
        assert job.status == 'cancelled', (job.status, job.error)
        await _gone_within(pids)
        nxt = await mgr.wait_for_job((await mgr.start_job('echo', text='after')).id, timeout=30)
        assert nxt.status == 'completed', (nxt.status, nxt.reason)
    finally: _kill(pids)


def test_a_tree_kill_spares_a_backstop_whose_worker_dies_as_it_lists_the_tree(monkeypatch):
    """The tree kills (`kill_process_tree`, the Ray actor's `kill_worker`) list a worker's descendants, its backstop left
    out, then kill them. On Ray the manager SIGKILLs the worker while its actor lists the tree: a worker that dies between
    the listing and the test of who is its backstop must not turn its backstop (by then reparented) into a descendant
    to kill, or the backstop dies before its walk and the escaped children run on (about 1 Ray hard cancel in 10)."""
    from cjm_workers.core.process import BACKSTOP_NAME, _tree_of
    code = ("import os, sys, time\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            f"    open('/proc/self/comm', 'w').write({BACKSTOP_NAME!r}); time.sleep(120); os._exit(0)\n"
            "print(pid, flush=True); time.sleep(120)\n")
    worker = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    backstop = int(worker.stdout.readline())
    try:
        deadline = time.monotonic() + 30  # hang guard
        while psutil.Process(backstop).name() != BACKSTOP_NAME and time.monotonic() < deadline: time.sleep(0.01)
        children = psutil.Process.children
        def worker_dies_as_the_tree_is_listed(self, *a, **kw):
            kids = children(self, *a, **kw)
            if self.pid == worker.pid:  # the tree is listed: now the worker dies, its backstop is reparented
                worker.kill(); worker.wait(30)
                while psutil.Process(backstop).ppid() == worker.pid and time.monotonic() < deadline: time.sleep(0.01)
            return kids
        monkeypatch.setattr(psutil.Process, 'children', worker_dies_as_the_tree_is_listed)
        listed = _tree_of(psutil.Process(worker.pid))
        assert backstop not in [p.pid for p in listed], "the backstop would be killed with the worker's tree"
    finally:
        worker.kill(); worker.wait(30)
        try: os.kill(backstop, signal.SIGKILL)
        except ProcessLookupError: pass


async def test_a_stopped_workers_escaped_children_are_killed(make_manager, tmp_path):
    "The worker serves on after the job (its children may run meanwhile); a stop ends them."
    mgr, job, pids = await _escapees(make_manager, tmp_path, 'return')
    try:
        job = await mgr.wait_for_job(job.id, timeout=30)
        assert job.status == 'completed', (job.status, job.error)
        assert set(_alive(pids)) == {*ESCAPED, 'unmarked'}  # the worker lives: so do they
        await mgr.ashutdown()
        await _gone_within(pids)
    finally: _kill(pids)


async def test_a_sigkilled_apps_workers_escaped_children_are_killed(backend, tmp_path):
    "The app dies (SIGKILL) while its worker's plugin has children outside the worker's group: they go with it."
    pidfile, tests = str(tmp_path / 'pids.json'), str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get('PYTHONPATH')])))
    if backend == 'ray':  # the session's cluster
        import ray
        env['RAY_ADDRESS'] = ray.get_runtime_context().gcs_address
    code = f"import asyncio, _f_plugins; asyncio.run(_f_plugins.escapees_app({backend!r}, {pidfile!r}))"
    app = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env, cwd=str(Path(tests).parent))
    pids = {}
    try:
        line = app.stdout.readline()  # once the escapees run
        assert line.strip(), f"the app printed nothing; stderr:\n{app.stderr.read() if app.poll() is not None else ''}"
        pids = _pids(pidfile)
        worker = int(line)
        assert not gone(worker) and set(_alive(pids)) == {*ESCAPED, 'unmarked'}
        os.kill(app.pid, signal.SIGKILL)
        app.wait(10)
        await _gone_within(pids, 20)
        await wait_until(lambda: gone(worker), 20)
    finally:
        if app.poll() is None: app.kill(); app.wait(10)
        app.stdout.close(); app.stderr.close()
        _kill(pids)
