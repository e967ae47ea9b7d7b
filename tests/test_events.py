"""Events through the event broadcaster: job events in order with their payloads, worker lifecycle events, and
broadcasters that raise, are slow or hang (they delay events, never jobs)."""
import asyncio, logging

import pytest

from cjm_workers.testing import RecordingBroadcaster

pytestmark = pytest.mark.backends('local', 'ray')  # each test using make_manager runs on both backends

T = 30
JOB_EVENTS = {'pending', 'started', 'progress', 'chunk', 'completed', 'failed', 'cancelled'}


def job_events(rec, job_id):
    "(name, data) of one job's events, in order."
    return [(t.split(':', 1)[1], d) for t, d in rec.events if d.get('job_id') == job_id]


def worker_events(rec):
    return [(t.split(':', 1)[1], d) for t, d in rec.events if t.split(':', 1)[1].startswith('worker_')]


# --------------------------------------------------------------------------------------------------------------
# 1. job events

async def test_normal_and_failed_job_events(make_manager):
    rec = RecordingBroadcaster()
    mgr = make_manager(event_broadcaster=rec)
    ok = await mgr.wait_for_job((await mgr.start_job('echo', text='hi')).id, timeout=T)
    bad = await mgr.wait_for_job((await mgr.start_job('echo', fail='kaput')).id, timeout=T)
    await mgr.flush_events(timeout=T)

    for t, d in rec.events:
        assert t.startswith('reference:'), t
        name = t.split(':', 1)[1]
        if name in JOB_EVENTS: assert 'job_id' in d, (t, d)
    assert rec.of(ok.id) == ['pending', 'started', 'completed']
    evs = dict(job_events(rec, ok.id))
    assert evs['pending']['plugin_id'] == 'echo'
    assert evs['started']['worker_pid'] == ok.worker_pid
    assert evs['completed']['result'] == ok.result == {'text': 'hi', 'metadata': ok.result['metadata']}

    assert rec.of(bad.id) == ['pending', 'started', 'failed']
    failed = dict(job_events(rec, bad.id))['failed']
    assert failed['error'] == 'ValueError: kaput' == bad.error
    # every job event is named "<worker_type>:<name>"
    assert {t for t, d in rec.events if d.get('job_id') == ok.id} == \
        {'reference:pending', 'reference:started', 'reference:completed'}


async def test_progress_events(make_manager):
    rec = RecordingBroadcaster()
    mgr = make_manager(event_broadcaster=rec)
    job = await mgr.wait_for_job((await mgr.start_job('transcribe', steps=5, delay=0.02)).id, timeout=T)
    assert job.status == 'completed'
    await mgr.flush_events(timeout=T)
    names = rec.of(job.id)
    assert names[:2] == ['pending', 'started'] and names[-1] == 'completed'
    prog = [d for n, d in job_events(rec, job.id) if n == 'progress']
    assert len(prog) == 5
    values = [d['progress'] for d in prog]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[-1] == pytest.approx(1.0) and values[0] == pytest.approx(0.2)
    assert [d['message'] for d in prog] == [f"segment {i}/5" for i in range(1, 6)]
    assert set(names[2:-1]) == {'progress'}  # all progress between started and completed
    assert job.progress == pytest.approx(1.0) and job.progress_message == 'segment 5/5'


async def test_stream_chunk_events_in_order(make_manager):
    rec = RecordingBroadcaster()
    mgr = make_manager(event_broadcaster=rec)
    text = 'one two three four five six seven'
    job = await mgr.wait_for_job((await mgr.start_job('tokens', text=text, delay=0.01)).id, timeout=T)
    assert job.status == 'completed'
    await mgr.flush_events(timeout=T)
    names = rec.of(job.id)
    assert names[:2] == ['pending', 'started'] and names[-1] == 'completed'
    chunks = [d['chunk'] for n, d in job_events(rec, job.id) if n == 'chunk']
    assert chunks == ['one ', 'two ', 'three ', 'four ', 'five ', 'six ', 'seven']
    assert ''.join(chunks) == job.result['text'] == job.output == text
    assert set(names[2:-1]) == {'chunk'}


# --------------------------------------------------------------------------------------------------------------
# 2. worker lifecycle events

async def test_worker_lifecycle_events_with_crash_and_restart(make_manager):
    rec = RecordingBroadcaster()
    mgr = make_manager(config=dict(restart_policy='always'), event_broadcaster=rec)
    await mgr.start(wait=True)
    pid1 = mgr.worker_process.pid
    await mgr.flush_events(timeout=T)
    assert worker_events(rec) == [('worker_started', {'worker': 0, 'pid': pid1})]

    crash = await mgr.wait_for_job((await mgr.start_job('crash', mode='sigkill')).id, timeout=T)
    assert crash.status == 'failed' and 'SIGKILL' in crash.error
    assert await mgr.wait_until_ready(timeout=T) is True
    pid2 = mgr.worker_process.pid
    assert pid2 != pid1
    after = await mgr.wait_for_job((await mgr.start_job('echo', text='back')).id, timeout=T)
    assert after.status == 'completed' and after.worker_pid == pid2
    await mgr.flush_events(timeout=T)

    wev = worker_events(rec)
    assert [n for n, _ in wev] == ['worker_started', 'worker_stopped', 'worker_restarting', 'worker_started']
    stopped, restarting, started2 = wev[1][1], wev[2][1], wev[3][1]
    assert stopped['pid'] == pid1 and stopped['exitcode'] == -9 and 'SIGKILL' in stopped['reason']
    assert restarting['attempt'] == 1 and restarting['delay'] == 0.0
    assert started2['pid'] == pid2
    # the crashed job's failure comes before the worker_stopped event
    order = [t.split(':', 1)[1] + (':' + d['job_id'] if 'job_id' in d else '') for t, d in rec.events]
    assert order.index(f'failed:{crash.id}') < order.index('worker_stopped')


# --------------------------------------------------------------------------------------------------------------
# 3. misbehaving broadcasters

async def test_raising_broadcaster_does_not_affect_jobs(make_manager, caplog):
    caplog.set_level(logging.ERROR, logger='cjm_workers')
    rec = RecordingBroadcaster(fail=True)
    mgr = make_manager(event_broadcaster=rec)
    jobs = [await mgr.start_job('echo', text=str(i)) for i in range(5)]
    done = [await mgr.wait_for_job(j.id, timeout=T) for j in jobs]
    assert [j.status for j in done] == ['completed'] * 5
    assert [j.result['text'] for j in done] == [str(i) for i in range(5)]
    await mgr.flush_events(timeout=T)
    for j in jobs: assert rec.of(j.id) == ['pending', 'started', 'completed']  # every event was still attempted
    assert any(r.exc_info and 'broadcaster is broken' in str(r.exc_info[1]) for r in caplog.records)
    # and the manager goes on working
    assert (await mgr.wait_for_job((await mgr.start_job('echo', text='x')).id, timeout=T)).status == 'completed'


async def test_slow_broadcaster_delays_events_not_jobs_and_keeps_order(make_manager):
    rec = RecordingBroadcaster(delay=1.0)
    mgr = make_manager(config=dict(event_timeout_seconds=5), event_broadcaster=rec)
    await mgr.start(wait=True)
    jobs = [await mgr.start_job('echo', text=f"job{i}") for i in range(20)]
    done = await asyncio.gather(*(mgr.wait_for_job(j.id, timeout=T) for j in jobs))
    delivered_when_done = len(rec.events)
    assert [j.status for j in done] == ['completed'] * 20
    # 61 events are due (worker_started + 3 per job); at one second each only a handful can have been delivered
    assert delivered_when_done <= 8, delivered_when_done

    rec.delay = 0.0  # let the rest through quickly
    await mgr.flush_events(timeout=T)
    assert len(rec.events) == 61
    assert rec.events[0][0] == 'reference:worker_started'
    for j in jobs: assert rec.of(j.id) == ['pending', 'started', 'completed']
    pend = [d['job_id'] for t, d in rec.events if t == 'reference:pending']
    comp = [d['job_id'] for t, d in rec.events if t == 'reference:completed']
    assert pend == comp == [j.id for j in jobs]  # in submission (= execution) order


class HangingBroadcaster:
    "Hangs forever on every 'pending' event; records the others."
    def __init__(self): self.events, self.hung = [], 0
    async def broadcast(self, event_type, data):
        if event_type.endswith(':pending'):
            self.hung += 1
            await asyncio.Event().wait()
        self.events.append((event_type, data))


async def test_hanging_broadcast_is_abandoned_after_event_timeout(make_manager, caplog):
    caplog.set_level(logging.WARNING, logger='cjm_workers')
    hb = HangingBroadcaster()
    mgr = make_manager(config=dict(event_timeout_seconds=0.2), event_broadcaster=hb)
    jobs = [await mgr.start_job('echo', text=str(i)) for i in range(3)]
    done = [await mgr.wait_for_job(j.id, timeout=T) for j in jobs]
    assert [j.status for j in done] == ['completed'] * 3
    await mgr.flush_events(timeout=T)
    assert hb.hung == 3
    for j in jobs:
        assert [t for t, d in hb.events if d.get('job_id') == j.id] == ['reference:started', 'reference:completed']
    assert any(t == 'reference:worker_started' for t, _ in hb.events)
    assert sum('pending' in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) >= 3
    # later events still flow
    j = await mgr.wait_for_job((await mgr.start_job('echo', text='later')).id, timeout=T)
    await mgr.flush_events(timeout=T)
    assert [t for t, d in hb.events if d.get('job_id') == j.id] == ['reference:started', 'reference:completed']


class NumberedBroadcaster:
    "Numbers the events it gets (its `last_id`, as SSEBroadcaster's) and, like a broadcaster that awaits, yields to the loop."
    def __init__(self): self.events, self.last_id = [], 0
    async def broadcast(self, event_type, data):
        await asyncio.sleep(0)
        self.last_id += 1
        self.events.append((self.last_id, event_type, data))


@pytest.mark.backends('local')
async def test_read_settled_pairs_a_state_with_exactly_the_events_that_made_it(make_manager):
    """UAT finding: a job page opened during a fast token stream showed its last words again at the start of its
    stream (2 to 6 pages in 60 over the SQLite store). The page flushed the events, then read the job and the last
    event id; in between the loop could handle more chunks (the output grew, their events were queued after the id),
    so the stream replayed text the page already held. `read_settled` reads both when no event is queued or in flight."""
    bc = NumberedBroadcaster()
    mgr = make_manager(event_broadcaster=bc, config=dict(prefetch=1))
    job = await mgr.start_job('tokens', text=' '.join(f'w{i}' for i in range(2000)), delay=0.0002)
    reads = bad = 0
    while not job.is_terminal:
        last, output = await mgr.read_settled(lambda: (bc.last_id, job.output), timeout=T)
        upto = ''.join(d['chunk'] for i, t, d in bc.events if i <= last and t.endswith(':chunk') and d['job_id'] == job.id)
        reads += 1; bad += output != upto
        await asyncio.sleep(0)
    assert reads > 10 and bad == 0, (reads, bad)


class _Stuck:
    "A broadcaster whose broadcasts never finish until released."
    def __init__(self): self.release, self.got = asyncio.Event(), 0
    async def broadcast(self, event_type, data):
        self.got += 1
        await self.release.wait()


async def test_a_full_event_queue_drops_the_oldest_and_says_so_once_not_per_event(track, monkeypatch, caplog):
    """Acceptance finding (2026-12-07): the manager logged one WARNING per event dropped from a full queue (about
    40 MB of log in one run). It now logs one line every 5 s at most, with the count; jobs never wait for events."""
    import cjm_workers.managers.base as base
    from cjm_workers.core.config import WorkerConfig
    from cjm_workers.testing import ReferenceJobManager
    monkeypatch.setattr(base, '_MAX_QUEUED_EVENTS', 50)
    stuck = _Stuck()
    mgr = track(ReferenceJobManager(event_broadcaster=stuck, worker_config=WorkerConfig(event_timeout_seconds=3600)))
    try:
        with caplog.at_level(logging.WARNING, logger='cjm_workers.managers.base'):
            job = await mgr.wait_for_job((await mgr.start_job('tokens', text=' '.join(['w'] * 400), delay=0)).id, timeout=30)
        assert job.status == 'completed' and len(job.output.split()) == 400  # the job never waited for its events
        full = [r.getMessage() for r in caplog.records if 'event queue full' in r.getMessage()]
        assert len(full) == 1 and 'dropped so far' in full[0], full
    finally: stuck.release.set()
