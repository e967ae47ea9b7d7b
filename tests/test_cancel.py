"""Cancellation: pending jobs (in the manager's queue and prefetched into a busy worker), cooperative and hard cancels
of running jobs, cancel/complete races, streaming jobs cancelled mid-stream, and cancels that do nothing."""
import asyncio, random, time
import psutil
from cjm_workers.core.config import RestartPolicy
from cjm_workers.testing import RecordingBroadcaster, wait_until
from _a_helpers import child_pid_of, gone, worker_pid, worker_status

import pytest
pytestmark = pytest.mark.backends('local', 'ray')  # each test using make_manager runs on both backends

TERMINAL_EVENTS = ('completed', 'failed', 'cancelled')


async def test_cancel_pending_jobs_in_manager_queue_and_in_worker(make_manager):
    cfg = dict(prefetch=4, prefetch_max_job_seconds=None, cancel_grace_seconds=0.5)  # slow jobs are sent ahead too
    mgr = make_manager(cfg)
    await mgr.start(wait=True)
    pid0 = worker_pid(mgr)
    running = await mgr.start_job('slow', seconds=1.5)
    await wait_until(lambda: running.status == 'running', 30)
    # running + 3 prefetched into the worker (still 'pending'), then 3 in the manager's queue
    in_worker = [await mgr.start_job('echo', text=f"w{i}") for i in range(3)]
    in_queue = [await mgr.start_job('echo', text=f"q{i}") for i in range(3)]
    await wait_until(lambda: mgr.get_worker_stats()[0]['queued_in_worker'] == 4, 10)
    # places in line: behind the running job inside the worker, then the manager's queue after all four
    assert [mgr.get_queue_position(j.id) for j in in_worker + in_queue] == [2, 3, 4, 5, 6, 7]
    assert all(j.status == 'pending' for j in in_worker + in_queue)

    victim_w, victim_q = in_worker[1], in_queue[1]
    t0 = time.monotonic()
    assert await mgr.cancel_job(victim_w.id) is True
    t_w = time.monotonic() - t0
    t0 = time.monotonic()
    assert await mgr.cancel_job(victim_q.id) is True
    t_q = time.monotonic() - t0
    print(f"cancel of a pending job: in worker {t_w * 1000:.1f} ms, in manager queue {t_q * 1000:.1f} ms")
    assert t_w <= 1.5 and t_q <= 1.5  # "at once" (generous bound; no hard cancel grace involved)
    for v in (victim_w, victim_q):
        assert v.status == 'cancelled'
        assert v.started_at is None and v.worker_pid is None, "a cancelled pending job must never start"
    # nothing else was touched
    assert running.status == 'running'
    assert worker_pid(mgr) == pid0
    others = [j for j in in_worker + in_queue if j not in (victim_w, victim_q)]
    assert all(j.status in ('pending', 'running', 'completed') for j in others)

    done = await mgr.wait_for_job(running.id, timeout=30)
    assert done.status == 'completed', (done.status, done.reason)
    for j in others:
        j = await mgr.wait_for_job(j.id, timeout=30)
        assert j.status == 'completed', (j.status, j.reason)
        assert j.result['metadata']['pid'] == pid0
    assert victim_w.status == victim_q.status == 'cancelled'
    assert victim_w.result is None and victim_q.result is None
    stats = mgr.get_worker_stats()[0]
    assert stats['pid'] == pid0 and stats['restarts'] == 0
    # the cancelled job that was inside the worker never ran there: the worker ran exactly the others
    assert stats['jobs_done'] == 1 + len(others)


async def test_cancelling_a_job_sent_ahead_never_kills_the_worker_running_another(make_manager):
    """Race review (2026-12-07): a job sent ahead got a kill deadline as a running one does; when it passed before the
    worker's answer came (at once with `cancel_grace_seconds=0`; after the grace period when the running job held the
    GIL), the worker was killed and the job it was running failed. Only the running job's deadline kills now."""
    mgr = make_manager(dict(prefetch=4, prefetch_max_job_seconds=None, cancel_grace_seconds=0))
    await mgr.start(wait=True)
    pid0 = worker_pid(mgr)
    for i in range(5):
        running = await mgr.start_job('slow', seconds=0.8)
        await wait_until(lambda: running.status == 'running', 30)
        ahead = await mgr.start_job('echo', text=f"ahead {i}")
        assert await mgr.cancel_job(ahead.id) is True
        assert (ahead.status, ahead.reason) == ('cancelled', 'cancelled before it started')
        done = await mgr.wait_for_job(running.id, timeout=30)
        assert done.status == 'completed', (i, done.status, done.reason)
    assert worker_pid(mgr) == pid0 and mgr.get_worker_stats()[0]['restarts'] == 0


async def test_cooperative_cancel_of_running_job_keeps_worker(make_manager):
    mgr = make_manager(dict(cancel_grace_seconds=20.0))  # a hard kill would show as a changed pid (and take 20 s)
    await mgr.start(wait=True)
    pid0 = worker_pid(mgr)
    job = await mgr.start_job('slow', seconds=60)
    await wait_until(lambda: job.status == 'running', 30)
    t0 = time.monotonic()
    assert await mgr.cancel_job(job.id) is True
    print(f"cooperative cancel took {(time.monotonic() - t0) * 1000:.1f} ms")
    assert job.status == 'cancelled'
    assert 'cancel' in (job.reason or '')
    stats = mgr.get_worker_stats()[0]
    assert stats['pid'] == pid0 and stats['restarts'] == 0
    assert psutil.pid_exists(pid0)
    nxt = await mgr.start_job('echo', text='after')
    nxt = await mgr.wait_for_job(nxt.id, timeout=30)
    assert nxt.status == 'completed'
    assert nxt.result['text'] == 'after' and nxt.result['metadata']['pid'] == pid0


async def test_hard_cancel_kills_worker_and_grandchild_and_keeps_pending(make_manager):
    grace = 0.5
    rec = RecordingBroadcaster()
    mgr = make_manager(dict(cancel_grace_seconds=grace), event_broadcaster=rec)
    assert mgr.worker_config.restart_policy is RestartPolicy.ON_CANCELLATION  # the default under test
    await mgr.start(wait=True)
    pid0 = worker_pid(mgr)
    worker0 = psutil.Process(pid0)
    job = await mgr.start_job('slow', seconds=120, ignore_cancel=True, spawn_child=True)
    behind = [await mgr.start_job('echo', text=f"b{i}") for i in range(2)]
    grandchild = psutil.Process(await child_pid_of(job))
    assert grandchild.ppid() == pid0
    t0 = time.monotonic()
    assert await mgr.cancel_job(job.id) is True
    took = time.monotonic() - t0
    print(f"hard cancel returned after {took:.3f} s (grace {grace} s)")
    assert took >= grace * 0.95, "the worker was killed before the grace period was over"
    assert job.status == 'cancelled'
    assert 'cooperative cancel' in job.reason and 'kill' in job.reason, job.reason
    await wait_until(lambda: gone(grandchild), 10)
    await wait_until(lambda: gone(worker0), 10)  # (a Ray actor's worker is SIGKILLed without waiting: it ends moments later)
    for b in behind:
        b = await mgr.wait_for_job(b.id, timeout=30)
        assert b.status == 'completed', (b.status, b.reason)
    pid1 = worker_pid(mgr)
    assert pid1 is not None and pid1 != pid0, "the worker should have been restarted"
    assert all(b.result['metadata']['pid'] == pid1 for b in behind)
    assert mgr.get_worker_stats()[0]['restarts'] == 1
    await mgr.flush_events()
    restarting = [d for t, d in rec.events if t.endswith(':worker_restarting')]
    assert restarting and restarting[0]['reason'] == 'hard cancel'


async def test_hard_cancel_under_never_fails_worker_and_pending_jobs(make_manager):
    mgr = make_manager(dict(cancel_grace_seconds=0.3, restart_policy=RestartPolicy.NEVER))
    await mgr.start(wait=True)
    worker0 = psutil.Process(worker_pid(mgr))
    job = await mgr.start_job('slow', seconds=120, ignore_cancel=True)
    await wait_until(lambda: job.status == 'running', 30)
    behind = [await mgr.start_job('echo', text=f"b{i}") for i in range(6)]  # some in the worker, some queued
    assert await mgr.cancel_job(job.id) is True
    assert job.status == 'cancelled'
    await wait_until(lambda: worker_status(mgr) == 'failed', 10)
    for b in behind:
        b = await mgr.wait_for_job(b.id, timeout=10)  # not left hanging
        assert b.status == 'failed'
        assert b.reason and 'never' in b.reason, b.reason
    await wait_until(lambda: gone(worker0), 10)
    late = await mgr.start_job('echo', text='late')
    assert late.status == 'failed' and late.reason, (late.status, late.reason)


async def test_cancel_racing_completion_has_one_outcome(make_manager):
    rec = RecordingBroadcaster()
    mgr = make_manager(dict(cancel_grace_seconds=5.0), event_broadcaster=rec)
    await mgr.start(wait=True)
    pid0 = worker_pid(mgr)
    rng = random.Random(1234)
    outcomes = {}
    for i in range(80):
        job = await mgr.start_job('echo', text=str(i), sleep=0)
        d = rng.choice([0, 0, 0.0002, 0.0005, 0.001, 0.002, 0.004])
        if d: await asyncio.sleep(d)
        ok = await mgr.cancel_job(job.id)
        assert job.is_terminal
        assert ok == (job.status == 'cancelled'), (ok, job.status, job.reason)
        assert job.status in ('completed', 'cancelled'), (job.status, job.reason)
        outcomes[job.id] = (ok, job.status)
    # a burst: several jobs queued, cancel them while they complete
    burst = [await mgr.start_job('echo', text=f"b{i}", sleep=0) for i in range(20)]
    await asyncio.sleep(0.001)
    oks = await asyncio.gather(*(mgr.cancel_job(j.id) for j in burst))
    for j, ok in zip(burst, oks):
        assert j.is_terminal and ok == (j.status == 'cancelled'), (ok, j.status)
        outcomes[j.id] = (ok, j.status)
    await mgr.flush_events()
    for jid, (ok, status) in outcomes.items():
        ends = [e for e in rec.of(jid) if e in TERMINAL_EVENTS]
        assert ends == [status], f"job {jid}: terminal events {ends}, final status {status}"
    n_cancelled = sum(1 for ok, _ in outcomes.values() if ok)
    print(f"race: {n_cancelled} cancelled, {len(outcomes) - n_cancelled} completed")
    # none of these cancels needed a kill: the worker is the same
    assert worker_pid(mgr) == pid0 and mgr.get_worker_stats()[0]['restarts'] == 0
    last = await mgr.start_job('echo', text='still fine')
    assert (await mgr.wait_for_job(last.id, timeout=30)).status == 'completed'


async def test_streaming_job_cancelled_mid_stream_keeps_partial_text(make_manager):
    rec = RecordingBroadcaster()
    mgr = make_manager(dict(cancel_grace_seconds=5.0), event_broadcaster=rec)
    await mgr.start(wait=True)
    pid0 = worker_pid(mgr)
    full = 'the quick brown fox jumps over the lazy dog ' * 4
    full = full.strip()
    job = await mgr.start_job('tokens', text=full, delay=0.05)
    await wait_until(lambda: len(job.output.split(' ')) >= 3, 30)
    assert await mgr.cancel_job(job.id) is True
    assert job.status == 'cancelled'
    partial = (job.result or {}).get('text', '')
    print(f"partial text: {partial!r}")
    assert partial, "a stream cancelled mid-way keeps the text streamed so far"
    assert full.startswith(partial) and len(partial) < len(full)
    await mgr.flush_events()
    chunks = [d['chunk'] for t, d in rec.events if t.endswith(':chunk') and d['job_id'] == job.id]
    assert chunks and ''.join(chunks) == partial, (chunks, partial)
    assert job.output == partial
    names = rec.of(job.id)
    assert names[-1] == 'cancelled' and names.index('started') < names.index('chunk')
    assert worker_pid(mgr) == pid0


async def test_cancel_unknown_or_finished_job_returns_false(make_manager):
    mgr = make_manager()
    await mgr.start(wait=True)
    assert await mgr.cancel_job('no-such-job') is False
    job = await mgr.start_job('echo', text='hi')
    job = await mgr.wait_for_job(job.id, timeout=30)
    assert job.status == 'completed'
    assert await mgr.cancel_job(job.id) is False
    assert job.status == 'completed' and job.result['text'] == 'hi'
    failed = await mgr.start_job('echo', fail='boom')
    failed = await mgr.wait_for_job(failed.id, timeout=30)
    assert failed.status == 'failed'
    assert await mgr.cancel_job(failed.id) is False
    assert failed.status == 'failed'
    pending = await mgr.start_job('slow', seconds=30)
    assert await mgr.cancel_job(pending.id) is True
    assert await mgr.cancel_job(pending.id) is False  # already cancelled


async def test_a_cancel_while_the_plugin_loads_stops_the_job_before_it_runs(track):
    "The cancel arrives during `initialize`: the worker does not start the plugin's run; no hard kill is needed."
    from cjm_workers.testing import ReferenceRegistry
    from _f_plugins import FJobManager
    reg = ReferenceRegistry(configs={'reference_echo': {'load_seconds': 1.0}})
    mgr = track(FJobManager(config=dict(cancel_grace_seconds=30.0), plugin_registry=reg))
    await mgr.start(wait=True)
    pid0 = worker_pid(mgr)
    job = await mgr.start_job('reference_echo', text='never', sleep=3.0)
    await wait_until(lambda: job.status == 'running', 30)  # `started` comes before the plugin loads
    await asyncio.sleep(0.2)
    assert await mgr.cancel_job(job.id)
    assert job.status == 'cancelled' and job.result is None, (job.status, job.result)  # echo never ran
    assert worker_pid(mgr) == pid0 and worker_status(mgr) == 'idle'  # cooperative: the same worker


async def test_a_plugin_that_watches_its_own_cancelled_flag_runs_again_after_a_cancel(track):
    "The worker clears a plugin's `cancelled` flag that a cancel set, before the plugin's next job."
    from _f_plugins import FJobManager
    mgr = track(FJobManager(config=dict(cancel_grace_seconds=30.0)))
    words = ' '.join(f"w{i}" for i in range(200))
    job = await mgr.start_job('polite', text=words, delay=0.02)
    await wait_until(lambda: len(job.output) > 10, 30)
    assert await mgr.cancel_job(job.id)
    assert job.status == 'cancelled' and 0 < len(job.output) < len(words)
    again = await mgr.wait_for_job((await mgr.start_job('polite', text='one two three', delay=0)).id, timeout=30)
    assert again.status == 'completed' and again.result['text'] == 'one two three ', again.result


async def test_a_run_that_fails_after_its_cancel_is_not_retried(make_manager):
    "A job with retries left whose run raises, or kills its worker, after `cancel_job`: cancelled, no second run."
    rec = RecordingBroadcaster()
    mgr = make_manager(dict(cancel_grace_seconds=30.0), event_broadcaster=rec)  # no hard kill: the run ends by itself
    await mgr.start(wait=True)
    raised = await mgr.start_job('echo', text='x', sleep=0.6, fail='interrupted', max_retries=2, retry_backoff_seconds=0)
    await wait_until(lambda: raised.status == 'running', 30)
    assert await mgr.cancel_job(raised.id) is True  # the echo plugin does not poll: its run raises 0.6 s in
    assert raised.status == 'cancelled' and raised.attempts == 1, (raised.status, raised.attempts, raised.reason)
    assert raised.reason.startswith('cancelled on request'), raised.reason  # the worker counts a raise after a cancel as its end

    died = await mgr.start_job('crash', mode='sigkill', after=0.6, max_retries=2, retry_backoff_seconds=0)
    await wait_until(lambda: died.status == 'running', 30)
    assert await mgr.cancel_job(died.id) is True
    assert died.status == 'cancelled' and died.attempts == 1, (died.status, died.attempts, died.reason)
    assert 'SIGKILL' in died.reason, died.reason
    await asyncio.sleep(0.5)  # a retry would have been sent by now (backoff 0)
    after = await mgr.wait_for_job((await mgr.start_job('echo', text='next')).id, timeout=30)
    assert after.status == 'completed'
    for j in (raised, died):  # one run each: no `retrying`, one terminal event
        names = rec.of(j.id)
        assert 'retrying' not in names and sum(n in TERMINAL_EVENTS for n in names) == 1, names
        assert j.status == 'cancelled' and j.attempts == 1


@pytest.mark.backends('local')
async def test_a_passed_deadline_of_a_job_sent_ahead_does_not_make_the_management_thread_spin(make_manager):
    """Core review (2026-12-07): since only the running job's cancel deadline kills, that of a job sent ahead can pass
    with the job still waiting for the worker's answer (its control thread cannot run while the running job holds the
    GIL); `_wait_spec` still waited for it, so the management thread polled with no wait, over and over: a whole CPU."""
    from _m_plugins import m_worker
    mgr = make_manager(dict(prefetch=4, prefetch_max_job_seconds=None, cancel_grace_seconds=0.1), entry_point=m_worker)
    await mgr.start(wait=True)
    hog = await mgr.start_job('gil', n=10**10)  # holds the worker's GIL for far longer than this test looks
    ahead = await mgr.start_job('echo', text='sent ahead')
    await wait_until(lambda: hog.progress_message == 'holding', 30)
    assert mgr.get_worker_stats()[0]['queued_in_worker'] == 2
    cancel = asyncio.ensure_future(mgr.cancel_job(ahead.id))
    await asyncio.sleep(0.5)  # its deadline has passed; the worker cannot answer yet
    assert ahead.status == 'pending' and not cancel.done()
    rounds, spec = [], mgr._wait_spec  # count the management thread's rounds (each one waits for what `_wait_spec` says)
    mgr._wait_spec = lambda: (rounds.append(1), spec())[1]
    await asyncio.sleep(1.0)
    assert hog.status == 'running' and ahead.status == 'pending'  # (the count covers the wait)
    assert len(rounds) < 20, f"the management thread went round {len(rounds)} times in 1 s while nothing happened"
    assert await mgr.cancel_job(hog.id) is True  # it ignores the cooperative cancel: killed after 0.1 s
    assert await cancel is True and ahead.status == 'cancelled'


def test_a_killed_worker_whose_end_is_not_seen_yet_does_not_make_the_management_thread_spin():
    """Core review (2026-12-07): after a hard cancel's kill, the running job's passed deadline stayed in `_wait_spec`
    until the worker's end was seen, so the management thread polled with no wait, over and over; a daemon the
    plugin left in a session of its own holding the worker's pipes delays that end for `_KILL_WAIT_SECONDS`: 735181
    rounds in those 5 s. Only the end of the kill is waited for now (a check of `_wait_spec` on a stand-in worker)."""
    from types import SimpleNamespace
    from cjm_workers.managers.base import _KILL_WAIT_SECONDS
    from cjm_workers.testing import ReferenceJobManager
    mgr = ReferenceJobManager()  # never started: no process, no thread
    mgr._wake_fds[:] = [7, 8]  # stand-ins: `_wait_spec` only lists them
    s = mgr._slots[0]
    s.process, s.fds, s.requests, s.running = object(), (11, 12, 13), SimpleNamespace(backlog=0), 'a'
    s.cancel_deadlines['a'] = s.killed_at = time.monotonic() - 0.5  # its grace period is over; it was killed 0.5 s ago
    try:
        fds, timeout = mgr._wait_spec()
        assert timeout is not None and _KILL_WAIT_SECONDS - 1 < timeout <= _KILL_WAIT_SECONDS - 0.5, timeout
    finally:
        s.process, s.fds, s.requests, s.running, s.killed_at = None, (), None, None, None
        s.cancel_deadlines.clear(); mgr._wake_fds.clear()
