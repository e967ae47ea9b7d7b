"""Shutdown and lifetime: what shutdown does to running and pending jobs, that it leaves no process, thread or fd
behind, the context-manager and Starlette-lifespan forms, the finalizer of a dropped manager, and that importing the
library has no global side effects."""
import asyncio, gc, json, os, subprocess, sys, textwrap, time, weakref
from multiprocessing import resource_tracker
import psutil, pytest
from cjm_workers.core.config import RestartPolicy, WorkerConfig
from cjm_workers.testing import ReferenceJobManager, wait_until
from conftest import descendants, resource_counts
from _a_helpers import (can_choose_pids, child_pid_of, cjm_threads, gone, is_resource_tracker, stranger_with_pid,
                         wait_gone, worker_pid)

pytestmark = pytest.mark.backends('local', 'ray')  # each test using make_manager runs on both backends

FD_SLACK = 0  # measured: a shut-down manager leaves exactly the fds it found (raise only with a reason)


def take_baseline():
    """Processes, threads and fds before a manager exists. Taken inside the test (so the test's event loop, with its
    epoll fd and self-pipe, already exists), after starting multiprocessing's resource tracker (started once by the
    first 'spawn' of this test process and kept for its life, so not a leak)."""
    resource_tracker.ensure_running()
    gc.collect()
    threads, fds = resource_counts()
    return dict(threads=threads, fds=fds, cjm=cjm_threads(), procs={p.pid for p in descendants()})


def assert_clean(baseline, what):
    gc.collect()
    extra = [p for p in descendants() if p.pid not in baseline['procs'] and not is_resource_tracker(p)]
    assert not extra, f"{what}: processes left: {extra}"
    assert cjm_threads() == baseline['cjm'], f"{what}: threads left: {cjm_threads()}"
    _, fds = resource_counts()
    assert fds <= baseline['fds'] + FD_SLACK, f"{what}: {fds - baseline['fds']} fds leaked"


async def test_shutdown_cancels_jobs_and_leaves_nothing():
    baseline = take_baseline()
    mgr = ReferenceJobManager(WorkerConfig(cancel_grace_seconds=0.5, shutdown_timeout_seconds=5.0))
    await mgr.start(wait=True)
    running = await mgr.start_job('slow', seconds=120, spawn_child=True)
    pending = [await mgr.start_job('echo', text=f"p{i}") for i in range(6)]  # 3 inside the worker, 3 in the queue
    grandchild = psutil.Process(await child_pid_of(running))
    worker = psutil.Process(worker_pid(mgr))
    assert cjm_threads() == sorted(baseline['cjm'] + ['cjm-manager-reference'])
    waiters = [asyncio.create_task(mgr.wait_for_job(j.id, timeout=30)) for j in [running] + pending]
    t0 = time.monotonic()
    await mgr.ashutdown()
    print(f"shutdown took {time.monotonic() - t0:.3f} s")
    assert running.status == 'cancelled'
    for j in pending:
        assert j.status == 'cancelled' and 'shut down' in j.reason, (j.status, j.reason)
    assert gone(worker) and wait_gone([grandchild]) == []  # SIGKILLed, not ours to reap: it may take a moment to die
    assert [w.status for w in await asyncio.gather(*waiters)] == ['cancelled'] * 7  # waiters are not left hanging
    assert_clean(baseline, "after shutdown")
    # idempotent, both forms
    mgr.shutdown()
    await mgr.ashutdown()
    assert_clean(baseline, "after a second shutdown")
    with pytest.raises(RuntimeError):
        await mgr.start_job('echo', text='too late')
    assert 'shut down' in (running.reason or ''), f"running job's reason: {running.reason!r}"


async def test_shutdown_of_job_ignoring_cancel_still_finishes():
    baseline = take_baseline()
    mgr = ReferenceJobManager(WorkerConfig(shutdown_timeout_seconds=0.5, cancel_grace_seconds=30.0))
    await mgr.start(wait=True)
    job = await mgr.start_job('slow', seconds=120, ignore_cancel=True, spawn_child=True)
    grandchild = psutil.Process(await child_pid_of(job))
    worker = psutil.Process(worker_pid(mgr))
    t0 = time.monotonic()
    await asyncio.wait_for(mgr.ashutdown(), 60)  # bounded: shutdown must not wait for the plugin
    print(f"shutdown with a plugin ignoring the cancel took {time.monotonic() - t0:.3f} s (timeout 0.5 s)")
    assert job.status == 'cancelled' and 'shut down' in job.reason, (job.status, job.reason)
    assert gone(worker) and wait_gone([grandchild]) == []  # SIGKILLed, not ours to reap: it may take a moment to die
    assert_clean(baseline, "after shutdown")


async def test_shutdown_during_backoff_wait_restarts_nothing():
    baseline = take_baseline()
    mgr = ReferenceJobManager(WorkerConfig(restart_policy=RestartPolicy.BACKOFF, restart_backoff_base_seconds=0.5))
    await mgr.start(wait=True)
    crash = await mgr.wait_for_job((await mgr.start_job('crash', mode='sigkill')).id, timeout=30)
    assert crash.status == 'failed'
    queued = await mgr.start_job('echo', text='never runs')
    assert mgr.get_worker_stats()[0]['status'] == 'restarting'
    await mgr.ashutdown()
    assert queued.status == 'cancelled' and 'shut down' in queued.reason
    await asyncio.sleep(0.8)  # past the moment the restart was due
    assert mgr.get_worker_stats()[0]['status'] != 'starting' and mgr.get_worker_stats()[0]['restarts'] == 0
    assert_clean(baseline, "after shutdown during a backoff wait")


async def test_drain_lets_the_running_job_finish_and_the_durable_store_keeps_the_queued_ones(make_manager, tmp_path):
    from cjm_workers.stores.sqlite import SQLiteJobStore
    db = str(tmp_path / 'jobs.db')
    mgr = make_manager(config=dict(drain_timeout_seconds=60), job_store=SQLiteJobStore(db))
    await mgr.start(wait=True)
    running = await mgr.start_job('slow', seconds=1.0)
    queued = [await mgr.start_job('echo', text=f"q{i}") for i in range(3)]  # sent ahead to the worker, not started
    await wait_until(lambda: running.status == 'running', 60)
    await mgr.ashutdown()  # drains for up to WorkerConfig.drain_timeout_seconds
    assert (running.status, running.result['text']) == ('completed', 'slept 1.0s')
    assert [j.status for j in queued] == ['pending'] * 3  # not started, not cancelled: kept for the next start
    again = make_manager(job_store=SQLiteJobStore(db))
    await again.start(wait=True)
    done = [await again.wait_for_job(j.id, timeout=60) for j in queued]
    assert [(j.status, j.result['text']) for j in done] == [('completed', f"q{i}") for i in range(3)]
    assert again.get_job(running.id).status == 'completed'


async def test_a_job_still_running_when_the_drain_time_is_up_is_cancelled_with_that_reason(make_manager, backend):
    baseline = take_baseline()
    mgr = make_manager(config=dict(cancel_grace_seconds=5.0))
    await mgr.start(wait=True)
    job = await mgr.start_job('slow', seconds=120)
    await wait_until(lambda: job.status == 'running', 60)
    t0 = time.monotonic()
    await mgr.ashutdown(drain_timeout=0.5)
    took = time.monotonic() - t0
    print(f"shutdown with a 0.5 s drain took {took:.3f} s")
    assert job.status == 'cancelled' and 'drain timeout (0.5s)' in job.reason, (job.status, job.reason)
    assert took >= 0.5  # it did wait for the job
    if backend == 'local':  # (Ray's client opens connections at its first actor that stay open for the session)
        assert_clean(baseline, "after a drain that ran out")


async def test_a_worker_that_dies_during_the_drain_fails_its_job_and_is_not_restarted(track):
    baseline = take_baseline()
    mgr = track(ReferenceJobManager(WorkerConfig(restart_policy=RestartPolicy.ALWAYS)))
    await mgr.start(wait=True)
    job = await mgr.start_job('crash', mode='sigkill', after=0.5)
    await wait_until(lambda: job.status == 'running', 60)
    await mgr.ashutdown(drain_timeout=60)
    assert job.status == 'failed' and 'SIGKILL' in job.error, (job.status, job.error)
    assert mgr.get_worker_stats()[0]['restarts'] == 0
    assert_clean(baseline, "after a worker died during the drain")


async def test_end_drain_before_the_shutdown_leaves_its_drain_alone(track):
    """Found here (2026-12-07): `end_drain()` called while no drain ran (an app's early call, a signal handler of its
    own) was remembered, and the later shutdown skipped its drain: the running job was cancelled at once, "its drain
    was cut short before the job finished", though no drain had begun. Now `end_drain` ends only a drain in progress:
    the shutdown after it drains, and the job finishes."""
    mgr = track(ReferenceJobManager(WorkerConfig(drain_timeout_seconds=60)))
    await mgr.start(wait=True)
    job = await mgr.start_job('slow', seconds=1.0)
    await wait_until(lambda: job.status == 'running', 60)
    mgr.end_drain()  # no drain is in progress: nothing to end
    await mgr.ashutdown()
    assert (job.status, job.reason) == ('completed', None), (job.status, job.reason)


async def test_a_second_signal_during_a_lifespans_shutdown_cuts_the_drains_still_to_come(track):
    """The lifespan's second Ctrl-C (or SIGTERM) means "stop now" for the whole shutdown: while the last manager of
    `managers_lifespan(a, b)` (shut down first) drains, it cuts that drain and the drain `a` has not begun yet (which
    `end_drain()`, ending only a drain in progress, would leave to run its full minute)."""
    import signal, threading
    from cjm_workers.managers.base import managers_lifespan
    if threading.current_thread() is not threading.main_thread(): pytest.skip("signal handlers need the main thread")
    a, b = [track(ReferenceJobManager(WorkerConfig(drain_timeout_seconds=60), worker_type=t)) for t in 'ab']
    lifespan = managers_lifespan(a, b)()
    await lifespan.__aenter__()
    ja, jb = await a.start_job('slow', seconds=120), await b.start_job('slow', seconds=120)
    await wait_until(lambda: ja.status == 'running' and jb.status == 'running', 60)
    noted = []
    server = signal.signal(signal.SIGTERM, lambda *_: noted.append('SIGTERM'))  # the server's own (uvicorn's notes it)
    def second_signal():  # once b drains (a's shutdown comes after b's)
        end = time.monotonic() + 60
        while b._drain_fds is None and time.monotonic() < end: time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=second_signal, daemon=True).start()
    try: await asyncio.wait_for(lifespan.__aexit__(None, None, None), 30)  # (the drains: 60 s each)
    finally: signal.signal(signal.SIGTERM, server)
    cut = 'the manager shut down: its drain was cut short before the job finished'
    assert [(j.status, j.reason) for j in (jb, ja)] == [('cancelled', cut)] * 2, [(j.status, j.reason) for j in (jb, ja)]
    assert noted == ['SIGTERM'] and signal.getsignal(signal.SIGTERM) is server


async def test_a_running_job_that_opted_into_retries_is_run_again_after_a_restart_not_cancelled(make_manager, tmp_path):
    """Shutdown stops two running jobs. With a durable store, the one that opted into retries stays `pending` (its
    cut-short run recorded as `interrupted`) and runs after the next start; the other is cancelled as before."""
    from cjm_workers.stores.sqlite import SQLiteJobStore
    db = str(tmp_path / 'jobs.db')
    mgr = make_manager(config=dict(max_workers=2), job_store=SQLiteJobStore(db))
    await mgr.start(wait=True)
    kept = await mgr.start_job('slow', seconds=1.5, max_retries=2)
    plain = await mgr.start_job('slow', seconds=1.5)
    await wait_until(lambda: kept.status == plain.status == 'running', 60)
    waiter = asyncio.create_task(mgr.wait_for_job(kept.id, timeout=30))
    await mgr.ashutdown()
    assert (plain.status, plain.reason) == ('cancelled', 'the manager shut down')
    assert (kept.status, kept.attempts) == ('pending', 1)
    [run] = kept.attempt_log
    assert run['reason'] == 'interrupted' and 'the manager shut down' in run['error'] and run['worker_pid'], run
    with pytest.raises(RuntimeError, match='stays pending'): await waiter  # not left hanging
    again = make_manager(job_store=SQLiteJobStore(db))
    assert [j.id for j in again.get_all_jobs(status='pending')] == [kept.id]  # in the file (read before any start)
    await again.start(wait=True)
    done = await again.wait_for_job(kept.id, timeout=60)
    assert (done.status, done.attempts, done.result['text']) == ('completed', 2, 'slept 1.5s')
    assert [a['reason'] for a in done.attempt_log] == ['interrupted']
    assert again.get_job(plain.id).status == 'cancelled'


async def test_what_shutdown_does_to_a_running_job_with_retries_when_it_cannot_keep_it(track, tmp_path):
    """The exceptions, each cancelled: the memory store (nothing survives the process), a job whose retries are used
    up, a job the app had asked to cancel. And a drain that runs out keeps a retry-opted job with that reason."""
    from cjm_workers.stores.sqlite import SQLiteJobStore
    mem = track(ReferenceJobManager(WorkerConfig()))
    await mem.start(wait=True)
    job = await mem.start_job('slow', seconds=60, max_retries=3)
    await wait_until(lambda: job.status == 'running', 60)
    await mem.ashutdown()
    assert (job.status, job.reason) == ('cancelled', 'the manager shut down')

    db = str(tmp_path / 'jobs.db')
    mgr = track(ReferenceJobManager(WorkerConfig(max_workers=3, restart_policy=RestartPolicy.ALWAYS,
                                                 cancel_grace_seconds=30.0, shutdown_timeout_seconds=0.5)))
    mgr.job_store = SQLiteJobStore(db)
    await mgr.start(wait=True)
    used_up = await mgr.start_job('crash', mode='sigkill', after=1.0, max_retries=1, retry_backoff_seconds=0)
    last = await mgr.start_job('slow', seconds=60, max_retries=1)
    asked = await mgr.start_job('slow', seconds=60, ignore_cancel=True, max_retries=1)
    await wait_until(lambda: last.status == asked.status == 'running', 60)
    await wait_until(lambda: used_up.attempts == 2 and used_up.status == 'running', 60)  # its retry, after a crash
    cancelling = asyncio.create_task(mgr.cancel_job(asked.id))  # the plugin ignores it: still running at shutdown
    await asyncio.sleep(0.2)
    await mgr.ashutdown(drain_timeout=0.3)
    assert (used_up.status, len(used_up.attempt_log)) == ('cancelled', 1), (used_up.status, used_up.attempt_log)
    assert (asked.status, await cancelling) == ('cancelled', True)  # the app's cancel is not undone
    assert last.status == 'pending' and 'drain timeout (0.3s)' in last.attempt_log[-1]['error'], last.attempt_log


async def test_a_bad_drain_timeout_is_refused_and_the_manager_keeps_working(track):
    mgr = track(ReferenceJobManager())
    await mgr.start(wait=True)
    for bad in (-1, 'soon', True, float('nan')):
        with pytest.raises(ValueError, match='drain_timeout'): mgr.shutdown(drain_timeout=bad)
    job = await mgr.wait_for_job((await mgr.start_job('echo', text='still here')).id, timeout=30)
    assert (job.status, job.result['text']) == ('completed', 'still here')
    with pytest.raises(ValueError, match='drain_timeout_seconds'): WorkerConfig(drain_timeout_seconds=-1)


async def test_async_with_form():
    baseline = take_baseline()
    async with ReferenceJobManager(WorkerConfig()) as m:
        job = await m.wait_for_job((await m.start_job('echo', text='hi')).id, timeout=30)
        assert job.status == 'completed'
        worker = psutil.Process(worker_pid(m))
        assert not gone(worker)
    assert gone(worker)
    assert_clean(baseline, "after async with")


async def test_with_form():
    baseline = take_baseline()
    with ReferenceJobManager(WorkerConfig()) as m:
        await m.start(wait=True)
        worker = psutil.Process(worker_pid(m))
        job = await m.wait_for_job((await m.start_job('echo', text='hi')).id, timeout=30)
        assert job.status == 'completed' and job.result['metadata']['pid'] == worker.pid
        pend = await m.start_job('slow', seconds=60)
    assert gone(worker)
    assert pend.status == 'cancelled'
    assert_clean(baseline, "after with")


def test_starlette_lifespan():
    baseline = take_baseline()
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient
    mgr = ReferenceJobManager(WorkerConfig())

    async def run(request):
        job = await mgr.start_job('echo', text=request.query_params.get('text', ''))
        job = await mgr.wait_for_job(job.id, timeout=30)
        return JSONResponse({'status': job.status, 'text': (job.result or {}).get('text'), 'pid': job.worker_pid})

    app = Starlette(routes=[Route('/run', run)], lifespan=mgr.lifespan)
    assert worker_pid(mgr) is None  # nothing runs before the app starts
    with TestClient(app) as client:
        pid = worker_pid(mgr)
        assert pid is not None
        worker = psutil.Process(pid)
        assert not gone(worker)
        r = client.get('/run', params={'text': 'via the app'}).json()
        assert r == {'status': 'completed', 'text': 'via the app', 'pid': pid}
    assert gone(worker)
    assert not [p for p in descendants() if p.pid not in baseline['procs'] and not is_resource_tracker(p)]
    assert cjm_threads() == baseline['cjm']


@pytest.mark.parametrize('busy', [False, True], ids=['idle', 'busy-ignoring-cancel'])
async def test_dropped_manager_stops_its_workers(busy):
    """A manager dropped without shutdown stops its workers. The busy case (a job that ignores the stop and has a
    grandchild) shows it is the finalizer that does it: closing the pipes alone would not stop that worker."""
    baseline = take_baseline()
    mgr = ReferenceJobManager(WorkerConfig())
    await mgr.start(wait=True)
    job = await mgr.wait_for_job((await mgr.start_job('echo', text='x')).id, timeout=30)
    assert job.status == 'completed'
    procs = [psutil.Process(worker_pid(mgr))]
    if busy:
        job = await mgr.start_job('slow', seconds=120, ignore_cancel=True, spawn_child=True)
        procs.append(psutil.Process(await child_pid_of(job)))
    ref = weakref.ref(mgr)
    del mgr, job
    # The management thread holds the manager for the few microseconds it handles a wake-up, so a collection may
    # have to be retried; anything that keeps holding it (e.g. a callback queued on the loop) fails this.
    for _ in range(500):
        gc.collect()
        if ref() is None: break
        await asyncio.sleep(0.01)
    assert ref() is None, f"something keeps the manager alive: {[type(r) for r in gc.get_referrers(ref())]}"
    t0 = time.monotonic()
    await wait_until(lambda: all(gone(p) for p in procs), 15)
    print(f"dropped manager's processes gone {time.monotonic() - t0:.3f} s after gc.collect() returned")
    await wait_until(lambda: cjm_threads() == baseline['cjm'], 15)
    assert not [p for p in descendants() if p.pid not in baseline['procs'] and not is_resource_tracker(p)]


async def test_manager_left_running_at_exit_is_closed_by_its_finalizer_without_an_error(caplog):
    """A manager still running when the interpreter exits is closed by its finalizer (an atexit callback that holds no
    reference to the manager, so it closes the wake pipe without the manager's lock). The management thread must then
    end quietly: it used to read the cleared wake-pipe list and log "unexpected error" (IndexError) on its way out.
    Calling the finalizer here is what the interpreter does at exit."""
    baseline = take_baseline()
    mgr = ReferenceJobManager(WorkerConfig())
    await mgr.start(wait=True)
    job = await mgr.wait_for_job((await mgr.start_job('echo', text='x')).id, timeout=30)
    assert job.status == 'completed'
    worker, thread = psutil.Process(worker_pid(mgr)), mgr._thread
    caplog.set_level('ERROR', logger='cjm_workers')
    mgr._finalizer()
    await wait_until(lambda: not thread.is_alive(), 15)
    assert gone(worker)
    errors = [r for r in caplog.records if r.levelname in ('ERROR', 'CRITICAL')]
    assert not errors, [r.getMessage() for r in errors]
    await mgr.ashutdown()  # after the finalizer: a no-op that raises nothing
    assert_clean(baseline, "manager closed by its finalizer")


def test_import_has_no_global_side_effects():
    script = textwrap.dedent("""
        import json, threading, multiprocessing, psutil
        threads0 = threading.active_count()
        import cjm_workers.managers.base
        import cjm_workers, cjm_workers.testing
        from cjm_workers.core.config import RestartPolicy, WorkerConfig
        from cjm_workers.testing import ReferenceJobManager
        mgr = ReferenceJobManager(WorkerConfig())  # creating a manager starts nothing either
        out = dict(start_method=multiprocessing.get_start_method(allow_none=True), threads0=threads0,
                   threads=threading.active_count(), thread_names=[t.name for t in threading.enumerate()],
                   children=[p.pid for p in psutil.Process().children(recursive=True)],
                   mp_children=len(multiprocessing.active_children()))
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(out)
    assert out['start_method'] is None
    assert out['threads'] == out['threads0'], out['thread_names']
    assert out['children'] == [] and out['mp_children'] == 0


async def test_a_worker_waiting_out_its_backoff_at_shutdown_is_stopped_not_restarting(make_manager):
    "Race review (2026-12-07): it stayed `restarting` after shutdown, a restart that would never come."
    mgr = make_manager(dict(restart_policy=RestartPolicy.BACKOFF, restart_backoff_base_seconds=30))
    await mgr.start(wait=True)
    crashed = await mgr.wait_for_job((await mgr.start_job('crash', mode='sigkill')).id, timeout=30)
    assert crashed.status == 'failed'
    await wait_until(lambda: mgr.get_worker_stats()[0]['status'] == 'restarting', 10)
    await mgr.ashutdown()
    assert mgr.get_worker_stats()[0]['status'] == 'stopped'
    with pytest.raises(RuntimeError, match='has been shut down'): await mgr.restart_workers()


@pytest.mark.skipif(not can_choose_pids(), reason="giving a process a chosen pid needs root (ns_last_pid)")
def test_kill_process_tree_of_a_reaped_worker_spares_the_process_now_given_its_pid():
    """Pid-reuse review (2026-12-07): `kill_process_tree` (and the manager's end of a worker) SIGKILLed the process
    group with the worker's id after the worker was reaped, when that id may lead another process's group. Now a
    group is signalled only while its leader is our child not yet reaped."""
    import multiprocessing as mp
    from cjm_workers.core.process import kill_process_tree
    p = mp.get_context('spawn').Process(target=time.sleep, args=(0,))
    p.start(); p.join()  # it ended and was reaped
    stranger = stranger_with_pid(p.pid)
    try:
        if stranger != p.pid: pytest.skip(f"another process took pid {p.pid} first")
        kill_process_tree(p)
        assert wait_gone([stranger], 1), "kill_process_tree killed the process group now led by the worker's old pid"
    finally: os.kill(stranger, 9)
