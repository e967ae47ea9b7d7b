"""Scheduling (issue 5): priorities and reordering, queue positions, per-job timeouts, opt-in retries."""
import asyncio
import pytest
from cjm_workers.testing import RecordingBroadcaster, wait_until
from _d_helpers import terminal_events

T = 30


async def _blocked(mgr):
    "Start a `slow` job and wait until it runs, so that later jobs wait in the manager's queue (prefetch=1)."
    b = await mgr.start_job('slow', seconds=30)
    await wait_until(lambda: b.status == 'running', T)
    return b


# --------------------------------------------------------------------------------------------------------------
# 1. priorities

async def test_higher_priority_first_fifo_within_a_priority(mk):
    events = RecordingBroadcaster()
    mgr = mk(config=dict(prefetch=1), event_broadcaster=events)
    b = await _blocked(mgr)
    jobs = [await mgr.start_job('echo', text=f"{p}/{i}", priority=p) for i, p in enumerate([0, 5, 0, 10, 5, -1])]
    await mgr.flush_events()
    pend = {d['job_id']: d for t, d in events.events if t == 'reference:pending'}
    # the position each job had when it was queued: 1 + the running job + queued jobs of at least its priority
    assert [pend[j.id]["position"] for j in jobs] == [2, 2, 4, 2, 4, 7]
    assert [pend[j.id]['priority'] for j in jobs] == [0, 5, 0, 10, 5, -1]
    assert [mgr.get_queue_position(j.id) for j in jobs] == [5, 3, 6, 2, 4, 7]
    assert await mgr.cancel_job(b.id)
    for j in jobs: await mgr.wait_for_job(j.id, timeout=T)
    await mgr.flush_events()
    started = [d['job_id'] for t, d in events.events if t == 'reference:started' and d['job_id'] != b.id]
    assert [mgr.get_job(j).result['text'] for j in started] == ['10/3', '5/1', '5/4', '0/0', '0/2', '-1/5']


async def test_reordering_a_pending_job(mk):
    events = RecordingBroadcaster()
    mgr = mk(config=dict(prefetch=1), event_broadcaster=events)
    b = await _blocked(mgr)
    a, c, d = [await mgr.start_job('echo', text=t) for t in 'acd']
    assert [mgr.get_queue_position(j.id) for j in (a, c, d)] == [2, 3, 4]
    assert mgr.set_job_priority(d.id, 3) is True
    assert [mgr.get_queue_position(j.id) for j in (d, a, c)] == [2, 3, 4] and d.priority == 3
    assert mgr.set_job_priority(d.id, 0) is True  # back among equals: at its place by age
    assert [mgr.get_queue_position(j.id) for j in (a, c, d)] == [2, 3, 4]
    assert mgr.set_job_priority(b.id, 9) is False  # running
    assert mgr.set_job_priority('missing', 9) is False
    with pytest.raises(TypeError, match='priority must be an int'): mgr.set_job_priority(a.id, 'high')
    with pytest.raises(TypeError, match='priority must be an int'): await mgr.start_job('echo', priority=1.5)
    await mgr.flush_events()
    assert [d_['position'] for t, d_ in events.events if t == 'reference:priority_changed'] == [2, 4]
    assert await mgr.cancel_job(b.id)
    for j in (a, c, d): assert (await mgr.wait_for_job(j.id, timeout=T)).status == 'completed'
    assert mgr.set_job_priority(a.id, 1) is False  # finished


async def test_default_config_keeps_long_jobs_in_the_manager_and_pipelines_quick_ones(mk):
    """With the default `prefetch` (16) and `prefetch_max_job_seconds` (10 ms): a worker whose jobs are long holds one
    job, so priorities and reordering work without `prefetch=1`; a worker whose last job was quick gets jobs ahead."""
    events = RecordingBroadcaster()
    mgr = mk(event_broadcaster=events)
    queued_in_worker = lambda: mgr.get_worker_stats()[0]['queued_in_worker']
    b = await _blocked(mgr)  # a fresh worker: nothing known about its jobs yet, so nothing is sent ahead
    jobs = [await mgr.start_job('echo', text=str(p), priority=p) for p in (0, 5, 10)]
    assert queued_in_worker() == 1  # only the running job
    assert mgr.set_job_priority(jobs[0].id, 7) is True  # it waits in the manager, so it can move
    assert await mgr.cancel_job(b.id)
    for j in jobs: await mgr.wait_for_job(j.id, timeout=T)
    await mgr.flush_events()
    started = [d['job_id'] for t, d in events.events if t == 'reference:started' and d['job_id'] != b.id]
    assert [mgr.get_job(j).result['text'] for j in started] == ['10', '0', '5']  # by priority (0 was raised to 7)
    # the echo jobs were quick: now jobs are sent ahead (start_job does not yield, so no result is read meanwhile)
    quick = [await mgr.start_job('echo', text=str(i)) for i in range(10)]
    assert queued_in_worker() == 10
    for j in quick: await mgr.wait_for_job(j.id, timeout=T)
    # a long job on that worker: once it has run longer than the limit, new jobs stay in the manager again
    b2 = await _blocked(mgr)
    await asyncio.sleep(0.05)
    late = [await mgr.start_job('echo', text=str(i)) for i in range(3)]
    assert queued_in_worker() == 1 and [mgr.get_queue_position(j.id) for j in late] == [2, 3, 4]
    assert await mgr.cancel_job(b2.id)
    for j in late: assert (await mgr.wait_for_job(j.id, timeout=T)).status == 'completed'


# --------------------------------------------------------------------------------------------------------------
# 2. timeouts

async def test_default_timeout_cooperative_cancel_then_failed_timeout(mk):
    events = RecordingBroadcaster()
    mgr = mk(config=dict(job_timeout_seconds=0.3), event_broadcaster=events)
    await mgr.start(wait=True)
    pid = mgr.get_worker_stats()[0]['pid']
    job = await mgr.wait_for_job((await mgr.start_job('slow', seconds=30)).id, timeout=T)
    assert (job.status, job.reason) == ('failed', 'timeout')
    assert job.error == 'Timeout: the job ran longer than its limit of 0.3s'
    assert mgr.get_worker_stats()[0]['pid'] == pid and mgr.restart_count == 0  # it stopped cooperatively
    fast = await mgr.wait_for_job((await mgr.start_job('slow', seconds=0.05)).id, timeout=T)
    assert fast.status == 'completed'
    unlimited = await mgr.wait_for_job((await mgr.start_job('slow', seconds=0.6, timeout_seconds=0)).id, timeout=T)
    assert unlimited.status == 'completed'  # 0 turns the default off for this job
    await mgr.flush_events()
    assert terminal_events(events, job.id) == ['failed']


async def test_per_job_timeout_kills_a_job_that_ignores_the_cancel(mk):
    mgr = mk(config=dict(cancel_grace_seconds=0.2))
    await mgr.start(wait=True)
    pid = mgr.get_worker_stats()[0]['pid']
    job = await mgr.start_job('slow', seconds=30, ignore_cancel=True, timeout_seconds=0.2)
    queued = await mgr.start_job('echo', text='after')
    job = await mgr.wait_for_job(job.id, timeout=T)
    assert (job.status, job.reason) == ('failed', 'timeout')
    assert (await mgr.wait_for_job(queued.id, timeout=T)).status == 'completed'  # sent ahead: ran on the new worker
    assert queued.worker_pid != pid and mgr.restart_count == 1
    with pytest.raises(ValueError, match='timeout_seconds'): await mgr.start_job('echo', timeout_seconds=-1)


async def test_an_apps_cancel_wins_over_a_timeout_in_either_order(mk):
    """UAT finding: a timeout falling due while the app's cancel was under way (or the app cancelling while a timeout's
    cancel was) ended the job `failed`/`timeout` and ran it again; `cancel_job` returned False after the retry."""
    events = RecordingBroadcaster()
    mgr = mk(config=dict(cancel_grace_seconds=5.0), event_broadcaster=events)
    # transcribe checks for a cancel once per step (0.6 s): the cancel and the timeout both wait for that check
    first = await mgr.start_job('transcribe', steps=5, delay=0.6, timeout_seconds=0.5, max_retries=1, retry_backoff_seconds=0)
    await wait_until(lambda: first.status == 'running', T)
    await asyncio.sleep(0.2)
    assert await mgr.cancel_job(first.id) is True  # the timeout falls due (0.5 s) before the plugin hears the cancel
    second = await mgr.start_job('transcribe', steps=5, delay=0.6, timeout_seconds=0.3, max_retries=1, retry_backoff_seconds=0)
    await wait_until(lambda: second.status == 'running', T)
    await asyncio.sleep(0.45)  # its timeout's cancel is under way
    assert await mgr.cancel_job(second.id) is True
    await mgr.flush_events()
    for j in (first, second):
        assert (j.status, j.attempts) == ('cancelled', 1), (j.status, j.reason, j.attempts)
        assert j.reason == 'cancelled on request' and j.attempt_log == []
        assert 'retrying' not in events.of(j.id) and terminal_events(events, j.id) == ['cancelled']


async def test_a_timeout_during_a_drain_is_a_timeout(make_manager):
    "UAT finding: a job stopped by its own timeout while the shutdown drained was recorded as cancelled by the shutdown."
    mgr = make_manager(config=dict(cancel_grace_seconds=5.0))
    await mgr.start(wait=True)
    job = await mgr.start_job('slow', seconds=30, timeout_seconds=1.0)
    await wait_until(lambda: job.status == 'running', T)
    await mgr.ashutdown(drain_timeout=10)
    assert (job.status, job.reason) == ('failed', 'timeout'), (job.status, job.reason)


# --------------------------------------------------------------------------------------------------------------
# 3. retries

async def test_retries_with_backoff_record_each_attempt(mk, tmp_path):
    events = RecordingBroadcaster()
    mgr = mk(event_broadcaster=events)
    flaky = await mgr.start_job('flaky', counter=str(tmp_path / 'n1'), fail_times=2, max_retries=3,
                                retry_backoff_seconds=0.05)
    flaky = await mgr.wait_for_job(flaky.id, timeout=T)
    assert (flaky.status, flaky.result['text'], flaky.attempts) == ('completed', 'run 3', 3)
    assert flaky.result['metadata']['attempt'] == 3  # what the plugin saw: `current_job().attempt`
    assert [(a['attempt'], a['error']) for a in flaky.attempt_log] == [(1, 'ValueError: flaky run 1'),
                                                                        (2, 'ValueError: flaky run 2')]
    hopeless = await mgr.wait_for_job((await mgr.start_job('echo', fail='always', max_retries=2,
                                                           retry_backoff_seconds=0.01)).id, timeout=T)
    assert (hopeless.status, hopeless.attempts, len(hopeless.attempt_log)) == ('failed', 3, 3)
    no_retry = await mgr.wait_for_job((await mgr.start_job('flaky', counter=str(tmp_path / 'n2'))).id, timeout=T)
    assert (no_retry.status, no_retry.attempts, no_retry.attempt_log) == ('failed', 1, [])
    await mgr.flush_events()
    retrying = [d for t, d in events.events if t == 'reference:retrying' and d['job_id'] == flaky.id]
    assert [(d['attempt'], d['delay']) for d in retrying] == [(1, 0.05), (2, 0.1)]
    assert events.of(flaky.id) == ['pending', 'started', 'retrying', 'started', 'retrying', 'started', 'completed']
    assert terminal_events(events, hopeless.id) == ['failed']


async def test_a_crashed_worker_is_retried_and_a_waiting_retry_can_be_cancelled(mk, tmp_path):
    mgr = mk(config=dict(restart_policy='always'))
    crash = await mgr.wait_for_job((await mgr.start_job('crash', mode='sigkill', max_retries=1,
                                                        retry_backoff_seconds=0)).id, timeout=T)
    assert crash.status == 'failed' and [a['error'][:10] for a in crash.attempt_log] == ['WorkerDied'] * 2
    waiting = await mgr.start_job('echo', fail='x', max_retries=1, retry_backoff_seconds=30)
    await wait_until(lambda: waiting.attempts == 1 and waiting.status == 'pending', T)
    assert mgr.get_queue_position(waiting.id) is None  # waiting for its retry, not queued
    assert await mgr.cancel_job(waiting.id) is True
    assert (waiting.status, waiting.reason) == ('cancelled', 'cancelled while waiting for its retry')


async def test_a_retry_restarts_a_crashed_worker_under_the_default_policy(mk, tmp_path):
    """ON_CANCELLATION does not restart after a crash, but a job that opted into retries needs a worker for its retry:
    the crash that it will retry restarts the worker (max_restart_attempts still bounds it)."""
    events = RecordingBroadcaster()
    mgr = mk(event_broadcaster=events)  # the default restart policy: ON_CANCELLATION
    job = await mgr.wait_for_job((await mgr.start_job('crash', mode='sigkill', marker=str(tmp_path / 'crashed'),
                                                      max_retries=2, retry_backoff_seconds=0)).id, timeout=T)
    assert (job.status, job.result['text'], job.attempts) == ('completed', 'survived', 2)
    assert [a['error'][:10] for a in job.attempt_log] == ['WorkerDied']
    await mgr.flush_events()
    restarts = [d for t, d in events.events if t == 'reference:worker_restarting']
    assert len(restarts) == 1 and 'restarted to retry the job it was running' in restarts[0]['reason']
    after = await mgr.wait_for_job((await mgr.start_job('echo', text='still here')).id, timeout=T)
    assert after.status == 'completed'
    # without retries left, a crash under this policy still fails the worker, as documented
    last = await mgr.wait_for_job((await mgr.start_job('crash', mode='sigkill')).id, timeout=T)
    assert last.status == 'failed' and mgr.get_worker_stats()[0]['status'] == 'failed'


async def test_timeouts_count_as_failures_for_retries(mk):
    mgr = mk()
    job = await mgr.wait_for_job((await mgr.start_job('slow', seconds=30, timeout_seconds=0.1, max_retries=1,
                                                      retry_backoff_seconds=0)).id, timeout=T)
    assert (job.status, job.reason, job.attempts) == ('failed', 'timeout', 2)
    assert [a['reason'] for a in job.attempt_log] == ['timeout', 'timeout']


async def test_a_timeout_that_meets_the_runs_own_failure_never_strands_or_cancels_the_retry(mk):
    """Race review (2026-12-07): when a job's timeout fired just as its run failed, the worker left a tombstone for
    the job and the retry, sent to the same worker, was skipped silently (the job and every later one stayed
    `pending`), or the late cancel's answer was taken for the retry's end (`cancelled before it started`, though
    nobody cancelled it). Runs whose failure lands within milliseconds of their time limit, many times over."""
    mgr = mk()
    T0 = 0.04
    for i in range(40):
        d = (i % 7 - 3) / 1000  # -3 to +3 ms around the limit
        job = await mgr.start_job('echo', text='x', sleep=T0 + d, fail='boom', timeout_seconds=T0, max_retries=1,
                                  retry_backoff_seconds=0)
        job = await mgr.wait_for_job(job.id, timeout=10)  # (stranded: a TimeoutError)
        assert job.status == 'failed' and job.reason in ('timeout', 'ValueError: boom'), (i, job.status, job.reason)
        assert job.attempts == 2, (i, job.attempts, job.attempt_log)
    assert (await mgr.wait_for_job((await mgr.start_job('echo', text='after')).id, timeout=10)).status == 'completed'


async def test_a_retrys_backoff_is_kept_across_a_restart(mk, tmp_path):
    """UAT note: a job waiting out its retry backoff when the app shut down ran at once after the next start. It waits
    for the rest of its backoff now; a run stopped by the shutdown itself runs again at once."""
    from datetime import datetime
    from cjm_workers.stores.sqlite import SQLiteJobStore
    db = tmp_path / 'jobs.db'
    m1 = mk(SQLiteJobStore(db))
    job = await m1.start_job('echo', text='x', fail='down', max_retries=1, retry_backoff_seconds=3.0)
    await wait_until(lambda: job.attempts == 1 and job.status == 'pending', T)  # its first run failed: 3 s to wait
    await m1.ashutdown()
    m2 = mk(SQLiteJobStore(db))
    await m2.start(wait=True)
    assert m2.get_job(job.id).status == 'pending' and m2.get_queue_position(job.id) is None  # waiting for its retry
    done = await m2.wait_for_job(job.id, timeout=T)
    assert (done.status, done.attempts) == ('failed', 2)
    ended, started = (datetime.fromisoformat(t) for t in (done.attempt_log[0]['ended_at'], done.attempt_log[1]['started_at']))
    assert (started - ended).total_seconds() >= 2.9, (started - ended)  # the backoff counted from the failed run


async def test_max_waiting_jobs_bounds_the_queue(mk):
    """Acceptance finding: nothing bounded the jobs a client could queue (3,300 jobs of 1 MB params: +610 MB). With
    `max_waiting_jobs`, `start_job` raises `QueueFull` (the routes answer 503) and takes jobs again once some left."""
    from cjm_workers.managers.base import QueueFull
    mgr = mk(config=dict(prefetch=1, max_waiting_jobs=2))
    b = await _blocked(mgr)  # running: not waiting
    waiting = [await mgr.start_job('echo', text=str(i)) for i in range(2)]
    with pytest.raises(QueueFull, match=r"has 2 jobs waiting, its limit \(WorkerConfig.max_waiting_jobs\)"):
        await mgr.start_job('echo', text='one too many')
    assert len(mgr.get_all_jobs()) == 3  # the refused job was not kept
    assert await mgr.cancel_job(waiting[0].id)
    again = await mgr.start_job('echo', text='room again')
    assert await mgr.cancel_job(b.id)
    assert (await mgr.wait_for_job(again.id, timeout=T)).status == 'completed'


# --------------------------------------------------------------------------------------------------------------
# 4. stored jobs before `start`

async def test_stored_pending_jobs_cannot_be_changed_before_start(mk, tmp_path):
    "Before `start`, a stored pending job is not the manager's yet: cancel_job and set_job_priority say so."
    from cjm_workers.stores.sqlite import SQLiteJobStore
    db = tmp_path / 'jobs.db'
    m1 = mk(SQLiteJobStore(db))
    await _blocked(m1)
    waiting = await m1.start_job('slow', seconds=30)  # (slow: still there to cancel once m2's worker takes it, pending or running)
    await m1.ashutdown()  # a durable store: the queued job stays pending for the next start
    m2 = mk(SQLiteJobStore(db))
    assert m2.get_job(waiting.id).status == 'pending'  # reads work before start
    with pytest.raises(RuntimeError, match='has not started: start.. takes the stored jobs over'):
        await m2.cancel_job(waiting.id)
    with pytest.raises(RuntimeError, match='has not started'): m2.set_job_priority(waiting.id, 3)
    assert await m2.cancel_job('unknown') is False  # an unknown job is still just False
    await m2.start()
    assert await m2.cancel_job(waiting.id) is True and m2.get_job(waiting.id).status == 'cancelled'


async def test_a_timed_out_job_with_retries_and_no_grace_times_out_each_run(make_manager):
    """UAT finding: with cancel_grace_seconds=0 the timeout's cancel message was sent after its worker had been killed
    and replaced, so it reached the new worker and cancelled the job's retry ('cancelled before it started', attempts
    above the runs). Messages decided for a worker now go to that worker only."""
    mgr = make_manager(dict(cancel_grace_seconds=0))
    job = await mgr.start_job('slow', seconds=30, timeout_seconds=0.3, max_retries=2, retry_backoff_seconds=0)
    job = await mgr.wait_for_job(job.id, timeout=60)
    assert (job.status, job.reason, job.attempts) == ('failed', 'timeout', 3), (job.status, job.reason, job.attempts)
    assert [a['reason'] for a in job.attempt_log] == ['timeout'] * 3
