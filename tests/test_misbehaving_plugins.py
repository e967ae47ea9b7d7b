"""Plugins that misbehave must not take their worker down, hide a second worker in it, lose what they said, report on
the wrong job, or keep it alive after its app died: each case runs in real worker processes (through a job manager,
or driven by hand over the worker's pipes as the worker notebook does)."""
import multiprocessing as mp, os, signal, subprocess, sys, time
from pathlib import Path
import psutil, pytest
from cjm_workers.core.channel import PipeChannel
from cjm_workers.testing import wait_until
from _a_helpers import gone, live_descendants, wait_gone, worker_pid
from _b_entry import slow_start_worker
from _m_plugins import m_worker

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def by_hand():
    "Start `m_worker` in a spawned process and hand back its channels; it is stopped (or killed) afterwards."
    made = []
    def start(entry=m_worker):
        ctx = mp.get_context('spawn')
        req, res, resp = PipeChannel(ctx, control=True), PipeChannel(ctx), PipeChannel(ctx)
        p = ctx.Process(target=entry, args=(req, res, resp)); p.start()
        made.append((p, (req, res, resp)))
        return p, req, res, resp
    yield start
    for p, chans in made:
        if p.is_alive():
            try: chans[0].put({'type': 'stop'})
            except OSError: pass
            p.join(10)
        if p.is_alive(): p.kill(); p.join(10)
        for c in chans: c.close()


def until_result(res, job_id, timeout=30):
    "Messages read from `res` up to and including the result of `job_id`."
    out = []
    while True:
        m = res.get(timeout=timeout)
        out.append(m)
        if m.get('type') == 'result' and m.get('job_id') == job_id: return out


# 1. exceptions a worker must survive

async def test_exception_whose_str_raises_fails_its_job_and_the_worker_serves_on(make_manager):
    mgr = make_manager(entry_point=m_worker)
    await mgr.start(wait=True)
    pid0 = worker_pid(mgr)
    job = await mgr.wait_for_job((await mgr.start_job('badstr')).id, timeout=30)
    assert job.status == 'failed', (job.status, job.reason)
    assert job.error == 'Unprintable (its str() raised RuntimeError)', job.error
    nxt = await mgr.wait_for_job((await mgr.start_job('echo', text='next')).id, timeout=30)
    assert nxt.status == 'completed' and nxt.result['metadata']['pid'] == pid0
    assert mgr.get_worker_stats()[0]['restarts'] == 0


@pytest.mark.parametrize('plugin, params, expect', [
    ('bail', dict(how='exit', code=0), 'SystemExit: 0 (the plugin called sys.exit; the worker serves on)'),
    ('bail', dict(how='exit', code=3), 'SystemExit: 3 (the plugin called sys.exit; the worker serves on)'),
    ('bail', dict(how='interrupt'), 'KeyboardInterrupt (raised by the plugin; the worker serves on)'),
    ('bail', dict(how='genexit'), 'GeneratorExit (raised by the plugin; the worker serves on)'),
    ('bail', dict(how='exit', code=None), 'SystemExit (the plugin called sys.exit; the worker serves on)'),
    ('bailstream', {}, 'SystemExit: 0 (the plugin called sys.exit; the worker serves on)'),
])
async def test_plugin_raising_a_base_exception_fails_its_job_and_the_worker_serves_on(make_manager, plugin, params, expect):
    mgr = make_manager(entry_point=m_worker)
    await mgr.start(wait=True)
    pid0 = worker_pid(mgr)
    job = await mgr.wait_for_job((await mgr.start_job(plugin, **params)).id, timeout=30)
    assert job.status == 'failed', (job.status, job.reason)
    assert job.error == expect, job.error
    nxt = await mgr.wait_for_job((await mgr.start_job('echo', text='next')).id, timeout=30)
    assert nxt.status == 'completed' and nxt.result['metadata']['pid'] == pid0
    stats = mgr.get_worker_stats()[0]
    assert stats['pid'] == pid0 and stats['restarts'] == 0 and stats['status'] != 'failed'


async def test_plugin_load_calling_sys_exit_fails_the_reload_and_the_worker_serves_on(make_manager):
    mgr = make_manager(entry_point=m_worker)
    await mgr.start(wait=True)
    pid0 = worker_pid(mgr)
    assert await mgr.reload_plugin('bail', {'exit_on_load': True}) is False
    nxt = await mgr.wait_for_job((await mgr.start_job('echo', text='next')).id, timeout=30)
    assert nxt.status == 'completed' and nxt.result['metadata']['pid'] == pid0
    assert mgr.get_worker_stats()[0]['restarts'] == 0


# 2. a plugin that forks and returns in the child

@pytest.mark.parametrize('fail', [False, True])
async def test_forked_copy_of_the_worker_leaves_at_once(make_manager, fail):
    before = {p.pid for p in live_descendants()}
    mgr = make_manager(entry_point=m_worker)
    await mgr.start(wait=True)
    pid0 = worker_pid(mgr)
    jobs = []
    for i in range(4):
        jobs.append(await mgr.wait_for_job((await mgr.start_job('forker', fail=fail)).id, timeout=30))
        jobs.append(await mgr.wait_for_job((await mgr.start_job('echo', text=f"e{i}")).id, timeout=30))
    for j in jobs:
        assert j.worker_pid == pid0, (j.plugin_id, j.worker_pid, pid0)
        if j.plugin_id == 'forker' and fail:
            assert j.status == 'failed' and j.error == f"RuntimeError: failed in {pid0}", j.error
        else:
            assert j.status == 'completed', (j.status, j.reason)
            assert j.result['metadata']['pid'] == pid0, (j.plugin_id, j.result['metadata'], pid0)
    copies = [j.result['metadata']['child'] for j in jobs if j.plugin_id == 'forker' and not fail]
    assert not wait_gone(copies, 5), "a forked copy of the worker is still running"
    assert mgr.get_worker_stats()[0]['restarts'] == 0
    await mgr.ashutdown()
    left = [p for p in live_descendants() if p.pid not in before]
    assert not wait_gone(left, 5), f"left after shutdown: {left}"


# 3. JobCancelledError raised by the plugin on its own

def test_plugin_giving_up_on_its_own_says_why_and_a_requested_cancel_does_not(by_hand):
    p, req, res, resp = by_hand()
    assert res.get(timeout=60)['type'] == 'ready'
    req.put({'type': 'execute', 'job_id': 'g1', 'plugin_name': 'giveup'})
    r = until_result(res, 'g1')[-1]
    assert (r['status'], r['error']) == ('cancelled', 'JobCancelledError: the plugin gave up'), r
    req.put({'type': 'execute', 'job_id': 's1', 'plugin_name': 'slow', 'seconds': 30})
    assert res.get(timeout=10)['type'] == 'started'
    req.control.put({'type': 'cancel', 'job_id': 's1'})
    r = until_result(res, 's1')[-1]
    assert (r['status'], r['error']) == ('cancelled', None), r


async def test_the_manager_says_a_plugin_gave_up_on_its_own_and_a_cancel_hook_that_exits_leaves_cancels_working(make_manager):
    "The reason names the plugin's words; a `cancel()` that calls sys.exit does not end the worker's control thread."
    mgr = make_manager(entry_point=m_worker, config=dict(cancel_grace_seconds=5.0))
    j = await mgr.wait_for_job((await mgr.start_job('giveup')).id, timeout=30)
    assert (j.status, j.reason) == ('cancelled', 'cancelled by the plugin (JobCancelledError: the plugin gave up)'), j.reason
    pid = worker_pid(mgr)
    for _ in range(2):  # twice: the control thread survived the first hook's sys.exit
        j = await mgr.start_job('exitcancel')
        await wait_until(lambda: j.status == 'running', 30)
        t0 = time.monotonic()
        assert await mgr.cancel_job(j.id) and time.monotonic() - t0 < 3  # cooperative: well inside the 5 s grace
        assert j.reason == 'cancelled on request', j.reason
    assert worker_pid(mgr) == pid and mgr.get_worker_stats()[0]['restarts'] == 0


# 4. progress from a plugin's own thread after its job returned

def test_late_progress_from_a_plugins_thread_is_dropped(by_hand):
    p, req, res, resp = by_hand()
    assert res.get(timeout=60)['type'] == 'ready'
    req.put({'type': 'execute', 'job_id': 'c1', 'plugin_name': 'chatty', 'linger': 1.0})
    req.put({'type': 'execute', 'job_id': 'e1', 'plugin_name': 'echo', 'text': 'second', 'sleep': 0.8})
    msgs = until_result(res, 'c1') + until_result(res, 'e1')
    after = msgs[[m['type'] for m in msgs].index('result') + 1:]
    late = [m for m in after if m['type'] == 'progress']
    assert not late, f"{len(late)} progress messages after the chatty job's result, e.g. {late[:2]}"
    assert msgs[-1]['status'] == 'success'


async def test_late_progress_does_not_land_on_the_next_job(make_manager):
    mgr = make_manager(entry_point=m_worker)
    await mgr.start(wait=True)
    first = await mgr.start_job('chatty', linger=1.0)
    second = await mgr.start_job('echo', text='second', sleep=0.8)
    first = await mgr.wait_for_job(first.id, timeout=30)
    second = await mgr.wait_for_job(second.id, timeout=30)
    assert first.status == second.status == 'completed'
    assert second.progress is None and not second.progress_message, (second.progress, second.progress_message)


# 5. the app went away while the worker was starting

def test_worker_that_cannot_say_ready_exits_quietly(by_hand, capfd):
    p, req, res, resp = by_hand(slow_start_worker)  # its plugin manager takes a while to build
    res.close()  # the app's end of the results pipe is gone before the worker is ready: sending 'ready' breaks the pipe
    p.join(30)
    err = capfd.readouterr().err
    assert p.exitcode == 0, (p.exitcode, err)
    assert 'Traceback' not in err and 'BrokenPipeError' not in err, err


# 6. parent death while a plugin holds the GIL

def _pgid(pid):
    try: return os.getpgid(pid)
    except OSError: return None


def test_sigkilled_app_ends_its_worker_while_a_plugin_holds_the_gil():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get('PYTHONPATH')])))
    app = subprocess.Popen([sys.executable, '-c', 'import asyncio, _m_plugins; asyncio.run(_m_plugins.gil_app())'],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(TESTS.parent))
    procs = []
    try:
        line = app.stdout.readline()  # printed once the plugin is about to enter its C call
        assert line.strip(), f"the app printed nothing; stderr:\n{app.stderr.read() if app.poll() is not None else ''}"
        worker = psutil.Process(int(line))
        procs = [p for p in psutil.process_iter(['name']) if _pgid(p.pid) == worker.pid]  # its process group
        assert [p.name() for p in worker.children()] == ['cjm-backstop']  # the worker's own child
        (backstop,) = worker.children()
        assert _pgid(backstop.pid) == backstop.pid  # in a group of its own (a kill of the worker's group leaves it its work)
        procs.append(backstop)
        c0, until = worker.cpu_times().user, time.monotonic() + 20  # well inside the C call once it has run 0.5 s of CPU
        while worker.cpu_times().user - c0 < 0.5 and time.monotonic() < until: time.sleep(0.05)  # (on a busy machine
        assert not gone(worker) and worker.cpu_times().user - c0 >= 0.5, "the plugin is not busy in its C call"  # it waits longer)
        t0 = time.monotonic()
        os.kill(app.pid, signal.SIGKILL)
        app.wait(10)
        while [p for p in procs if not gone(p)] and time.monotonic() - t0 < 2: time.sleep(0.005)
        took, left = time.monotonic() - t0, [p for p in procs if not gone(p)]
        assert not left, f"still alive {took:.1f} s after the app was SIGKILLed: {left}"
        print(f"worker (GIL held in C) gone {took * 1000:.0f} ms after its app was SIGKILLed")
    finally:
        if app.poll() is None: app.kill(); app.wait(10)
        for p in procs:
            try: p.kill()
            except psutil.Error: pass
        app.stdout.close(); app.stderr.close()


async def test_a_worker_that_ends_normally_reaps_its_backstop_and_its_memory_is_counted_once(track):
    """The backstop is the worker's child: a worker stopped by the manager kills and reaps it (no zombie for a PID 1
    that never reaps, as an app running as a container's PID 1), and the worker's memory figure leaves it out (it
    shares the worker's pages copy-on-write: counted, it doubled the figure)."""
    from cjm_workers.testing import ReferenceJobManager
    m = track(ReferenceJobManager())
    await m.start(wait=True)
    worker = psutil.Process(m.get_worker_stats()[0]['pid'])
    (backstop,) = [c for c in worker.children() if c.name() == 'cjm-backstop']
    stats = m.get_worker_stats()[0]
    assert stats['rss_bytes'] < worker.memory_info().rss + backstop.memory_info().rss // 2, (stats['rss_bytes'], worker.memory_info().rss)
    await m.ashutdown()
    assert not psutil.pid_exists(backstop.pid), backstop  # not even a zombie: reaped by the worker on its way out
