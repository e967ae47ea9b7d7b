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


# --------------------------------------------------------------------------------------------------------------
# 3. retries

async def test_retries_with_backoff_record_each_attempt(mk, tmp_path):
    events = RecordingBroadcaster()
    mgr = mk(event_broadcaster=events)
    flaky = await mgr.start_job('flaky', counter=str(tmp_path / 'n1'), fail_times=2, max_retries=3,
                                retry_backoff_seconds=0.05)
    flaky = await mgr.wait_for_job(flaky.id, timeout=T)
    assert (flaky.status, flaky.result['text'], flaky.attempts) == ('completed', 'run 3', 3)
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
    assert (waiting.status, waiting.reason) == ('cancelled', 'cancelled before it started')


async def test_timeouts_count_as_failures_for_retries(mk):
    mgr = mk()
    job = await mgr.wait_for_job((await mgr.start_job('slow', seconds=30, timeout_seconds=0.1, max_retries=1,
                                                      retry_backoff_seconds=0)).id, timeout=T)
    assert (job.status, job.reason, job.attempts) == ('failed', 'timeout', 2)
    assert [a['reason'] for a in job.attempt_log] == ['timeout', 'timeout']
