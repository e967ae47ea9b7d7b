"""Worker crashes and restart policies: how a death is reported, which policy restarts when, exponential backoff
(without blocking the event loop), the crash-loop limit, the healthy-uptime reset and hard cancels not counting."""
import asyncio, os, signal, time
import psutil, pytest
from cjm_workers.core.config import RestartPolicy
from cjm_workers.testing import failing_factory_worker, wait_until
from _a_helpers import TimedBroadcaster, gone, worker_pid, worker_status

pytestmark = pytest.mark.backends('local', 'ray')  # each test using make_manager runs on both backends


@pytest.mark.parametrize('mode, expect', [('sigkill', 'SIGKILL'), ('segfault', 'SIGSEGV'), ('exit', 'code 3'),
                                          ('abort', 'SIGABRT')])
async def test_worker_death_is_reported_and_worker_restarted(make_manager, mode, expect):
    mgr = make_manager(dict(restart_policy=RestartPolicy.ALWAYS))
    await mgr.start(wait=True)
    pid0 = worker_pid(mgr)
    job = await mgr.start_job('crash', mode=mode)
    t0 = time.monotonic()
    job = await mgr.wait_for_job(job.id, timeout=30)
    print(f"{mode}: job failed {(time.monotonic() - t0) * 1000:.1f} ms after it was submitted")
    assert job.status == 'failed'
    assert expect in job.error, job.error
    assert 'WorkerDied' in job.error
    nxt = await mgr.start_job('echo', text='next')
    nxt = await mgr.wait_for_job(nxt.id, timeout=30)
    assert nxt.status == 'completed', (nxt.status, nxt.reason)
    pid1 = nxt.result['metadata']['pid']
    assert pid1 != pid0 and pid1 == worker_pid(mgr)
    stats = mgr.get_worker_stats()[0]
    assert stats['restarts'] == 1 and stats['consecutive_crashes'] == 1


async def test_external_sigkill_of_worker_running_a_job(make_manager):
    mgr = make_manager(dict(restart_policy=RestartPolicy.ALWAYS))
    await mgr.start(wait=True)
    pid0 = worker_pid(mgr)
    job = await mgr.start_job('slow', seconds=60)
    await wait_until(lambda: job.status == 'running', 30)
    os.kill(pid0, signal.SIGKILL)
    t0 = time.monotonic()
    job = await mgr.wait_for_job(job.id, timeout=30)
    print(f"external SIGKILL noticed after {(time.monotonic() - t0) * 1000:.1f} ms")
    assert job.status == 'failed' and 'SIGKILL' in job.error, (job.status, job.error)
    nxt = await mgr.wait_for_job((await mgr.start_job('echo', text='x')).id, timeout=30)
    assert nxt.status == 'completed' and nxt.result['metadata']['pid'] != pid0


async def test_a_crash_is_noticed_while_a_daemon_holds_the_workers_descriptors(make_manager, tmp_path):
    "A worker killed while a daemon its plugin left (in a session of its own) keeps the worker's sentinel pipe open."
    from _f_plugins import f_worker
    mgr = make_manager(dict(restart_policy=RestartPolicy.ALWAYS), entry_point=f_worker)
    await mgr.start(wait=True)
    pidfile = str(tmp_path / 'daemon.pid')
    job = await mgr.start_job('escape', pidfile=pidfile, linger=120)
    try:
        job = await mgr.wait_for_job(job.id, timeout=60)  # (the daemon lives 120 s: before, the crash showed only then)
        assert job.status == 'failed' and 'SIGKILL' in job.error, (job.status, job.error)
        nxt = await mgr.wait_for_job((await mgr.start_job('echo', text='after')).id, timeout=30)
        assert nxt.status == 'completed', (nxt.status, nxt.reason)
    finally:
        if os.path.exists(pidfile):
            try: os.kill(int(open(pidfile).read()), signal.SIGKILL)
            except ProcessLookupError: pass


@pytest.mark.parametrize('policy', [RestartPolicy.NEVER, RestartPolicy.ON_CANCELLATION])
async def test_policies_that_do_not_restart_after_crash(make_manager, policy):
    rec = TimedBroadcaster()
    mgr = make_manager(dict(restart_policy=policy), event_broadcaster=rec)
    await mgr.start(wait=True)
    worker0 = psutil.Process(worker_pid(mgr))
    crash = await mgr.start_job('crash', mode='sigkill', after=0.2)
    behind = [await mgr.start_job('echo', text=f"b{i}") for i in range(6)]
    crash = await mgr.wait_for_job(crash.id, timeout=30)
    assert crash.status == 'failed' and 'SIGKILL' in crash.error
    for b in behind:
        b = await mgr.wait_for_job(b.id, timeout=10)
        assert b.status == 'failed'
        assert policy.value in b.reason, b.reason
    assert worker_status(mgr) == 'failed'
    assert policy.value in mgr.get_worker_stats()[0]['failure']
    assert gone(worker0)
    await asyncio.sleep(0.3)  # nothing comes back on its own
    assert worker_status(mgr) == 'failed' and mgr.get_worker_stats()[0]['restarts'] == 0
    late = await mgr.start_job('echo', text='late')
    assert late.status == 'failed'
    await mgr.flush_events()
    assert rec.named('worker_failed') and not rec.named('worker_restarting')


async def test_always_restarts_at_once(make_manager):
    rec = TimedBroadcaster()
    mgr = make_manager(dict(restart_policy=RestartPolicy.ALWAYS, max_restart_attempts=5), event_broadcaster=rec)
    await mgr.start(wait=True)
    crashes = [await mgr.start_job('crash', mode='exit') for _ in range(3)]
    ok = await mgr.start_job('echo', text='survivor')
    for c in crashes: assert (await mgr.wait_for_job(c.id, timeout=30)).status == 'failed'
    ok = await mgr.wait_for_job(ok.id, timeout=30)
    assert ok.status == 'completed'
    await mgr.flush_events()
    rs = rec.named('worker_restarting')
    assert [r['attempt'] for r in rs] == [1, 2, 3]
    assert all(r['delay'] == 0.0 for r in rs)
    assert mgr.get_worker_stats()[0]['restarts'] == 3


@pytest.mark.backends('local')  # manager logic only (timers, counting): the backend adds time, not coverage
async def test_backoff_delays_grow_exponentially_and_are_capped(make_manager):
    base, cap = 0.1, 0.25
    rec = TimedBroadcaster()
    mgr = make_manager(dict(restart_policy=RestartPolicy.BACKOFF, max_restart_attempts=6,
                            restart_backoff_base_seconds=base, restart_backoff_max_seconds=cap), event_broadcaster=rec)
    await mgr.start(wait=True)
    t0 = time.monotonic()
    crashes = [await mgr.start_job('crash', mode='sigkill') for _ in range(4)]
    ok = await mgr.start_job('echo', text='after backoff')
    for c in crashes:
        c = await mgr.wait_for_job(c.id, timeout=30)
        assert c.status == 'failed' and 'SIGKILL' in c.error
    ok = await mgr.wait_for_job(ok.id, timeout=30)
    elapsed = time.monotonic() - t0
    assert ok.status == 'completed', (ok.status, ok.reason)
    await mgr.flush_events()
    rs = rec.named('worker_restarting')
    print('worker_restarting:', [(r['attempt'], r['delay']) for r in rs], f"total {elapsed:.2f} s")
    assert [r['attempt'] for r in rs] == [1, 2, 3, 4]
    expected = [min(base * 2 ** n, cap) for n in range(4)]
    assert [r['delay'] for r in rs] == pytest.approx(expected)
    assert expected == pytest.approx([0.1, 0.2, 0.25, 0.25])
    # the delays were really waited (a lower bound, so not a speed assertion)
    assert elapsed >= sum(expected) * 0.95
    assert mgr.get_worker_stats()[0]['restarts'] == 4


@pytest.mark.backends('local')  # manager logic only (timers, counting): the backend adds time, not coverage
async def test_backoff_wait_does_not_block_the_event_loop(make_manager):
    base = 1.5
    rec = TimedBroadcaster()
    slow_mgr = make_manager(dict(restart_policy=RestartPolicy.BACKOFF, restart_backoff_base_seconds=base,
                                 restart_backoff_max_seconds=base), event_broadcaster=rec)
    other = make_manager()
    await asyncio.gather(slow_mgr.start(wait=True), other.start(wait=True))
    crash = await slow_mgr.start_job('crash', mode='sigkill')
    queued = await slow_mgr.start_job('echo', text='after the wait')
    crash = await slow_mgr.wait_for_job(crash.id, timeout=30)
    t_crash = time.monotonic()
    assert crash.status == 'failed'
    assert worker_status(slow_mgr) == 'restarting'
    # while the restart waits, the loop is responsive and the other manager's results keep arriving
    lags = []
    for _ in range(5):
        t = time.monotonic()
        await asyncio.sleep(0.01)
        lags.append(time.monotonic() - t)
    results = []
    for i in range(5):
        j = await other.start_job('echo', text=f"o{i}")
        results.append(await other.wait_for_job(j.id, timeout=30))
    during = time.monotonic() - t_crash
    still_waiting = worker_status(slow_mgr) == 'restarting'
    print(f"sleep(0.01) took at most {max(lags) * 1000:.1f} ms; 5 jobs of another manager done "
          f"{during:.3f} s into a {base} s backoff; still restarting: {still_waiting}")
    assert all(r.status == 'completed' for r in results)
    assert max(lags) <= 1.0
    if during < base * 0.8:  # only meaningful if this machine was not stalled for the whole backoff
        assert still_waiting
    assert queued.status == 'pending'
    queued = await slow_mgr.wait_for_job(queued.id, timeout=30)
    assert queued.status == 'completed'
    assert time.monotonic() - t_crash >= base * 0.95
    await slow_mgr.flush_events()
    assert [r['delay'] for r in rec.named('worker_restarting')] == [base]


async def test_crash_loop_limit_with_failing_factory(make_manager, backend):
    rec = TimedBroadcaster()
    mgr = make_manager(dict(restart_policy=RestartPolicy.ALWAYS, max_restart_attempts=2),
                       event_broadcaster=rec, entry_point=failing_factory_worker)
    jobs = [await mgr.start_job('echo', text=f"j{i}") for i in range(3)]  # queued before any worker is ready
    await mgr.start()
    assert await mgr.wait_until_ready(180) is False  # no worker ever became ready
    for j in jobs:
        j = await mgr.wait_for_job(j.id, timeout=30)
        assert j.status == 'failed'
        assert 'model weights not found' in j.reason, j.reason
    stats = mgr.get_worker_stats()[0]
    assert stats['status'] == 'failed'
    assert stats['pid'] is not None or backend == 'ray'  # an actor's worker pid is known once the actor runs
    assert 'model weights not found' in stats['failure'] and 'max_restart_attempts=2' in stats['failure']
    assert stats['restarts'] == 2
    await mgr.flush_events()
    failed = rec.named('worker_failed')
    assert len(failed) == 1 and 'model weights not found' in failed[0]['reason']
    assert [r['attempt'] for r in rec.named('worker_restarting')] == [1, 2]
    late = await mgr.start_job('echo', text='late')
    assert late.status == 'failed' and 'model weights not found' in late.reason
    # restart_workers clears the count and tries again (and, with this factory, fails again the same way)
    await mgr.restart_workers()
    assert await mgr.wait_until_ready(180) is False
    stats = mgr.get_worker_stats()[0]
    assert stats['status'] == 'failed' and stats['restarts'] == 2 + 1 + 2
    await mgr.flush_events()
    assert len(rec.named('worker_failed')) == 2


async def test_restart_workers_brings_a_failed_worker_back(make_manager):
    mgr = make_manager(dict(restart_policy=RestartPolicy.NEVER))
    await mgr.start(wait=True)
    pid0 = worker_pid(mgr)
    crash = await mgr.wait_for_job((await mgr.start_job('crash', mode='sigkill')).id, timeout=30)
    assert crash.status == 'failed'
    assert worker_status(mgr) == 'failed'
    assert (await mgr.start_job('echo', text='x')).status == 'failed'
    await mgr.restart_workers()
    assert await mgr.wait_until_ready(30) is True
    assert worker_status(mgr) == 'idle'
    job = await mgr.wait_for_job((await mgr.start_job('echo', text='back')).id, timeout=30)
    assert job.status == 'completed' and job.result['metadata']['pid'] not in (None, pid0)
    assert mgr.get_worker_stats()[0]['failure'] is None


async def test_a_failed_worker_is_started_again_after_failed_retry_seconds(make_manager):
    """A burst of crashing jobs used up the crash limit and left the app without workers until someone called
    `restart_workers()` (found by an operations review of the demo). With `failed_retry_seconds` the manager starts a
    failed worker again by itself; meanwhile new jobs fail at once, saying when to try again."""
    rec = TimedBroadcaster()
    mgr = make_manager(dict(restart_policy=RestartPolicy.ALWAYS, max_restart_attempts=1, failed_retry_seconds=1.0),
                       event_broadcaster=rec)
    await mgr.start(wait=True)
    crashes = [await mgr.start_job('crash', mode='sigkill') for _ in range(3)]
    crashes = [await mgr.wait_for_job(j.id, timeout=30) for j in crashes]
    assert [j.status for j in crashes] == ['failed'] * 3
    assert worker_status(mgr) == 'failed' and not mgr.get_health()['ok']
    refused = await mgr.start_job('echo', text='too soon')
    assert refused.status == 'failed' and 'it is started again in' in refused.error, refused.error
    await wait_until(lambda: worker_status(mgr) in ('idle', 'starting'), 30)  # by itself, about a second later
    assert await mgr.wait_until_ready(30) is True
    job = await mgr.wait_for_job((await mgr.start_job('echo', text='back')).id, timeout=30)
    assert job.status == 'completed' and mgr.get_health()['ok']
    stats = mgr.get_worker_stats()[0]
    assert stats['failure'] is None and stats['consecutive_crashes'] == 0
    await mgr.flush_events()
    assert len(rec.named('worker_failed')) == 1


async def test_a_worker_that_cannot_be_started_fails_with_the_reason_and_nothing_hangs(track, caplog):
    "An entry point spawn cannot pickle: start() does not raise half-way; the worker is failed with the error, jobs fail."
    from cjm_workers.testing import ReferenceJobManager
    def nested(request_queue, result_queue, response_queue): pass  # not importable by a spawned child
    mgr = track(ReferenceJobManager(entry_point=nested))
    first = await mgr.start_job('echo', text='x')
    assert first.status == 'failed' and 'could not be started' in first.reason and 'pickle' in first.reason, first.reason
    assert first.reason.startswith('WorkerFailed: no worker can run the job')
    stats = mgr.get_worker_stats()[0]
    assert stats['status'] == 'failed' and 'pickle' in stats['failure']
    assert await mgr.wait_until_ready(5) is False
    assert (await mgr.start_job('echo', text='y')).status == 'failed'  # the same reason again, at once
    mgr._entry = __import__('cjm_workers.testing', fromlist=['x']).reference_worker  # the app fixes its entry point
    await mgr.restart_workers()
    assert await mgr.wait_until_ready(30) is True
    assert (await mgr.wait_for_job((await mgr.start_job('echo', text='z')).id, timeout=30)).status == 'completed'


async def test_a_worker_that_exits_before_it_is_ready_says_so(track):
    from cjm_workers.testing import ReferenceJobManager
    from _a_helpers import exit_before_ready_worker
    mgr = track(ReferenceJobManager(entry_point=exit_before_ready_worker))
    job = await mgr.wait_for_job((await mgr.start_job('echo', text='x')).id, timeout=30)
    assert job.status == 'failed' and 'exited with code 1 before it became ready' in job.reason, job.reason


async def test_a_plugin_manager_factory_that_returns_none_fails_the_job_naming_the_factory(track):
    """UAT finding: a factory left as a placeholder (`def make_plugin_manager(): ...`) made every job fail with
    "AttributeError: 'NoneType' object has no attribute 'discover_plugins'". Now the worker fails to start and says why."""
    from cjm_workers.testing import ReferenceJobManager
    from _a_helpers import none_factory_worker
    mgr = track(ReferenceJobManager(entry_point=none_factory_worker))
    job = await mgr.wait_for_job((await mgr.start_job('echo', text='x')).id, timeout=30)
    assert job.status == 'failed' and 'plugin manager factory failed (TypeError: it returned None, which has no ' \
        'discover_plugins, load_plugin, execute_plugin' in job.reason, job.reason
    assert 'AttributeError' not in job.reason


async def _crash(mgr, after=0.0):
    j = await mgr.start_job('crash', mode='sigkill', after=after)
    j = await mgr.wait_for_job(j.id, timeout=30)
    assert j.status == 'failed'
    await mgr.wait_until_ready(30)


@pytest.mark.backends('local')  # manager logic only (timers, counting): the backend adds time, not coverage
async def test_healthy_uptime_resets_the_crash_count(make_manager):
    healthy = 0.3
    cfg = dict(restart_policy=RestartPolicy.ALWAYS, max_restart_attempts=1, healthy_after_seconds=healthy)
    mgr = make_manager(cfg)
    await mgr.start(wait=True)
    await _crash(mgr)  # first crash: restarted (1 <= max_restart_attempts)
    assert worker_status(mgr) == 'idle'
    pid1 = worker_pid(mgr)
    await asyncio.sleep(healthy * 2)  # the new worker is now healthy
    await _crash(mgr, after=0.05)
    assert worker_status(mgr) == 'idle', mgr.get_worker_stats()[0]['failure']
    assert worker_pid(mgr) != pid1
    assert mgr.get_worker_stats()[0]['consecutive_crashes'] == 1
    # control: without the healthy period in between, the second crash in a row exceeds the limit
    ctl = make_manager({**cfg, 'healthy_after_seconds': 60.0})
    await ctl.start(wait=True)
    await _crash(ctl)
    assert worker_status(ctl) == 'idle'
    await asyncio.sleep(healthy * 2)
    await _crash(ctl, after=0.05)
    assert worker_status(ctl) == 'failed'


@pytest.mark.backends('local')  # manager logic only (timers, counting): the backend adds time, not coverage
async def test_hard_cancels_do_not_count_as_crashes(make_manager):
    mgr = make_manager(dict(restart_policy=RestartPolicy.ALWAYS, max_restart_attempts=1, cancel_grace_seconds=0.3))
    await mgr.start(wait=True)
    pids = [worker_pid(mgr)]
    for i in range(3):
        job = await mgr.start_job('slow', seconds=120, ignore_cancel=True)
        await wait_until(lambda: job.status == 'running', 30)
        assert await mgr.cancel_job(job.id) is True
        assert 'kill' in job.reason, job.reason
        assert await mgr.wait_until_ready(30) is True, mgr.get_worker_stats()[0]['failure']
        pids.append(worker_pid(mgr))
        ok = await mgr.wait_for_job((await mgr.start_job('echo', text=str(i))).id, timeout=30)
        assert ok.status == 'completed' and ok.result['metadata']['pid'] == pids[-1]
    assert len(set(pids)) == 4
    stats = mgr.get_worker_stats()[0]
    assert stats['restarts'] == 3 and stats['consecutive_crashes'] == 0 and stats['status'] == 'idle'
    # and a real crash after them is still the first one in a row: restarted
    await _crash(mgr)
    assert worker_status(mgr) == 'idle'


async def test_a_dead_workers_group_is_killed_though_the_app_reaped_it_first(track, tmp_path):
    """A worker killed while its plugin's child runs in its group, with no backstop to kill that group: the app (another
    manager's restart: any `Process.start()` or `active_children()`) looks for ended children before the manager has
    handled the death. Before, it reaped the worker, so the manager refused to kill its group (its id may have been
    another's) and the plugin's child ran on, orphaned (7 of 20 crashes with a thread calling `active_children()`)."""
    import multiprocessing
    from _f_plugins import FJobManager
    mgr = track(FJobManager(config=dict(restart_policy=RestartPolicy.NEVER)))
    await mgr.start(wait=True)
    worker = psutil.Process(worker_pid(mgr))
    pidfile, go = str(tmp_path / 'child.pid'), str(tmp_path / 'go')
    job = await mgr.start_job('groupchild', pidfile=pidfile, go=go)
    await wait_until(lambda: os.path.exists(pidfile), 30)
    child = psutil.Process(int(open(pidfile).read()))
    try:
        with mgr._lock:  # the management thread cannot handle the death meanwhile
            open(go, 'w').close()
            end = time.monotonic() + 10
            while os.waitid(os.P_PID, worker.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None and time.monotonic() < end:
                time.sleep(0.01)  # until it can be reaped (reaping nothing)
            multiprocessing.active_children()  # what every Process.start() of the app does first
        job = await mgr.wait_for_job(job.id, timeout=30)
        assert job.status == 'failed' and 'SIGKILL' in job.error, (job.status, job.error)
        await wait_until(lambda: gone(child), 10)
    finally:
        try: child.kill()
        except psutil.Error: pass
