"""Many concurrent coroutines against one manager (start, cancel, results arriving at once), and two managers in
one process."""
import asyncio, random
from collections import Counter

from cjm_workers.managers.base import TERMINAL_STATES
from cjm_workers.testing import RecordingBroadcaster, wait_until

import pytest
pytestmark = pytest.mark.backends('local', 'ray')  # each test using make_manager runs on both backends

T = 60
TERMINAL_EVENTS = {'completed', 'failed', 'cancelled'}


@pytest.mark.backends('local')  # the races are the manager's; test_ray.py and the other tests here cover the bridge
async def test_hammer_start_and_cancel_from_many_coroutines(make_manager):
    rng = random.Random(20240611)
    rec = RecordingBroadcaster()
    mgr = make_manager(config=dict(max_workers=2, cancel_grace_seconds=0.3), event_broadcaster=rec)
    await mgr.start(wait=True)

    SUBMITTERS, PER = 20, 20  # 400 jobs, plus a few stubborn ones below
    plans = [[] for _ in range(SUBMITTERS)]
    for s in range(SUBMITTERS):
        for i in range(PER):
            r = rng.random()
            if r < 0.5: plans[s].append(('echo', dict(text=f"s{s}-{i}")))
            elif r < 0.83: plans[s].append(('slow', dict(seconds=0.01)))
            elif r < 0.91: plans[s].append(('echo', dict(text='x', fail=f"boom{s}-{i}")))
            elif r < 0.97: plans[s].append(('slow', dict(seconds=0.05)))
            else: plans[s].append(('slow', dict(seconds=0.3)))
    sleeps = [[rng.choice((0, 0, 0.001, 0.003)) for _ in range(PER)] for _ in range(SUBMITTERS)]
    picks = [rng.random() for _ in range(2000)]

    jobs, spec = [], {}
    cancel_results = []  # (job_id, returned)
    stubborn_ids = set()
    submitting = SUBMITTERS

    async def submitter(s):
        nonlocal submitting
        for (pid, kw), pause in zip(plans[s], sleeps[s]):
            j = await mgr.start_job(pid, **kw)
            jobs.append(j)
            spec[j.id] = (pid, kw)
            if pause: await asyncio.sleep(pause)
        submitting -= 1

    async def canceller(c):
        k = c
        while submitting or k < 60 * (c + 1):
            await asyncio.sleep(0.002)
            if not jobs: continue
            mine = [j for j in jobs if j.id not in stubborn_ids]  # the stubborn coroutine cancels its own jobs
            running = [j for j in mine if j.status == 'running'] if k % 2 == 0 else []
            pool = running or mine  # every other time, a job that is running now (cooperative cancel)
            if not pool: continue
            j = pool[int(picks[k % len(picks)] * len(pool))]
            k += 5
            ok = await asyncio.wait_for(mgr.cancel_job(j.id), T)
            cancel_results.append((j.id, ok))
            if not submitting and k > 300: break

    async def stubborn():
        "Running jobs that ignore the cooperative cancel: the grace period ends with a hard kill."
        out = []
        for _ in range(3):
            j = await mgr.start_job('slow', seconds=5.0, ignore_cancel=True)
            stubborn_ids.add(j.id)
            jobs.append(j)
            spec[j.id] = ('slow', dict(seconds=5.0, ignore_cancel=True))
            await wait_until(lambda: j.status != 'pending', timeout=T)
            ok = await asyncio.wait_for(mgr.cancel_job(j.id), T)
            cancel_results.append((j.id, ok))
            out.append((j, ok))
        return out

    results = await asyncio.gather(*(submitter(s) for s in range(SUBMITTERS)),
                                   *(canceller(c) for c in range(5)), stubborn())
    stubborn_jobs = results[-1]
    total = SUBMITTERS * PER + 3
    assert len(jobs) == total and len({j.id for j in jobs}) == total

    done = await asyncio.gather(*(mgr.wait_for_job(j.id, timeout=T) for j in jobs))
    await mgr.flush_events(timeout=T)

    statuses = Counter(j.status for j in done)
    assert set(statuses) <= TERMINAL_STATES, statuses
    assert statuses['completed'] + statuses['failed'] + statuses['cancelled'] == total
    assert statuses['completed'] > 0 and statuses['failed'] > 0 and statuses['cancelled'] > 0, statuses

    for jid, ok in cancel_results:
        if ok: assert mgr.get_job(jid).status == 'cancelled', (jid, mgr.get_job(jid))
    # the mix really covered cancels of queued jobs and cooperative cancels of running ones
    assert any(j.status == 'cancelled' and j.started_at is None for j in done)
    assert any(j.status == 'cancelled' and j.started_at is not None and 'kill' not in j.reason for j in done)
    for j, ok in stubborn_jobs:
        assert ok is True and j.status == 'cancelled' and 'kill' in j.reason

    for j in done:
        pid, kw = spec[j.id]
        assert j.completed_at is not None
        if j.status == 'completed':
            assert j.result is not None and mgr.get_job_result(j.id) == {'status': 'success', 'data': j.result}
            if pid == 'echo': assert j.result['text'] == kw['text']
            assert j.started_at is not None
        elif j.status == 'failed':
            assert pid == 'echo' and 'fail' in kw and j.error == f"ValueError: {kw['fail']}", (spec[j.id], j)
        else:
            assert j.reason

    # exactly one terminal event per job, matching its final state, after its pending event
    per_job = {}
    for t, d in rec.events:
        if 'job_id' in d: per_job.setdefault(d['job_id'], []).append(t.split(':', 1)[1])
    for j in done:
        names = per_job.get(j.id, [])
        terminal = [n for n in names if n in TERMINAL_EVENTS]
        assert terminal == [j.status], (j.id, names)
        assert names[0] == 'pending' and names[-1] == j.status and names.count('started') <= 1, names

    # and the manager still serves
    after = await mgr.wait_for_job((await mgr.start_job('echo', text='after')).id, timeout=T)
    assert after.status == 'completed' and after.result['text'] == 'after'


async def test_two_managers_in_one_process_are_independent(make_manager):
    a = make_manager()
    b = make_manager()
    await asyncio.gather(a.start(wait=True), b.start(wait=True))
    assert a.worker_process.pid != b.worker_process.pid
    assert await a.reload_plugin('echo', {'prefix': 'A:'}) is True
    ja, jb = await a.start_job('echo', text='1'), await b.start_job('echo', text='1')
    ja, jb = await a.wait_for_job(ja.id, timeout=T), await b.wait_for_job(jb.id, timeout=T)
    assert ja.result['text'] == 'A:1' and jb.result['text'] == '1'  # the reload touched only a's worker
    assert ja.worker_pid == a.worker_process.pid and jb.worker_pid == b.worker_process.pid
    assert a.get_job(jb.id) is None and b.get_job(ja.id) is None

    b_running = await b.start_job('slow', seconds=1.0)
    a_running = await a.start_job('slow', seconds=10.0)
    a_pending = await a.start_job('echo', text='never')
    await wait_until(lambda: b_running.status == 'running' and a_running.status == 'running', timeout=T)
    a_pid = a.worker_process.pid
    await a.ashutdown()
    assert a_running.status == 'cancelled' and a_pending.status == 'cancelled'
    assert a.worker_process is None or not a.worker_process.is_alive()
    try:
        await a.start_job('echo', text='x')
        raise AssertionError("a closed manager accepted a job")
    except RuntimeError: pass

    assert (await b.wait_for_job(b_running.id, timeout=T)).status == 'completed'
    jb2 = await b.wait_for_job((await b.start_job('echo', text='still here')).id, timeout=T)
    assert jb2.status == 'completed' and jb2.result['text'] == 'still here'
    assert jb2.worker_pid == b.worker_process.pid != a_pid


@pytest.mark.backends('local')
async def test_reading_a_streaming_jobs_output_from_another_thread_loses_no_chunk(make_manager):
    "A sync route runs in a thread: its reads of `job.output` join the pending chunks while the loop appends more."
    import threading
    mgr = make_manager()
    await mgr.start(wait=True)
    text = ' '.join(f"w{i}" for i in range(60_000))
    job = await mgr.start_job('tokens', text=text, delay=0)
    seen, done = [], threading.Event()
    def reader():
        while not done.is_set(): seen.append(job.output)
    t = threading.Thread(target=reader)
    t.start()
    try: job = await mgr.wait_for_job(job.id, timeout=T)
    finally:
        done.set()
        await asyncio.to_thread(t.join)
    assert (job.status, job.output == text, job.result['text'] == text) == ('completed', True, True)
    assert len(seen) > 10 and all(text.startswith(s) for s in seen[::max(1, len(seen) // 200)])
    assert all(len(a) <= len(b) for a, b in zip(seen, seen[1:]))  # it only grows
