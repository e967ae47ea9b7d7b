"""Which thread reads the workers' pipes (`managers/base`, "The event loop reads the results"): the event loop while it
runs, the management thread whenever it does not — before the first loop, while the loop is stopped, after it closed —
and pipes handed back and forth leave no descriptor behind."""
import asyncio, gc, os, threading, time
import pytest
from cjm_workers.testing import ReferenceJobManager
from conftest import resource_counts

T = 30  # seconds: generous limits for a loaded machine


class ThreadRecordingManager(ReferenceJobManager):
    "Records the thread that handled each job's result (`_on_job_completed` runs where the result is handled)."
    def __init__(self, **kw):
        super().__init__(**kw)
        self.handled_on = {}
    def _on_job_completed(self, job_id): self.handled_on[job_id] = threading.get_ident()


def wait_sync(predicate, timeout=T):
    "Poll from synchronous code (no event loop running), as a script or a thread would."
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end: return False
        time.sleep(0.01)
    return True


async def test_results_are_handled_on_the_running_event_loop():
    mgr = ThreadRecordingManager()
    try:
        jobs = [await mgr.start_job('echo', text=str(i)) for i in range(20)]
        for j in jobs: assert (await mgr.wait_for_job(j.id, timeout=T)).status == 'completed'
        assert set(mgr.handled_on.values()) == {threading.get_ident()}  # the loop's own thread, for every job
        assert all(s.loop_reads is asyncio.get_running_loop() for s in mgr._slots)
    finally: await mgr.ashutdown()


def test_a_stopped_loop_hands_the_pipes_to_the_management_thread():
    "A job that finishes while its loop is stopped is still seen finishing from synchronous code; the loop takes over again."
    fds0 = resource_counts()[1]
    loop = asyncio.new_event_loop()
    mgr = ThreadRecordingManager()
    try:
        async def begin():
            await mgr.start(wait=True)
            job = await mgr.start_job('slow', seconds=0.3)
            await asyncio.sleep(0.1)  # the management thread settles, leaving the pipes to this (running) loop
            return job
        job = loop.run_until_complete(begin())
        assert not loop.is_running() and mgr._slots[0].loop_fds  # the loop stopped, still holding the pipes
        assert wait_sync(lambda: mgr.get_job(job.id).status == 'completed', 10), mgr.get_job(job.id).status
        assert mgr.handled_on[job.id] == mgr._thread.ident  # the management thread read the result
        second = loop.run_until_complete(mgr.start_job('echo', text='running again'))
        done = loop.run_until_complete(mgr.wait_for_job(second.id, timeout=T))
        assert done.result['text'] == 'running again'
    finally:
        mgr.shutdown()
        loop.run_until_complete(asyncio.sleep(0))  # the loop removes its readers (asked from shutdown)
        loop.close()
    gc.collect()
    assert resource_counts()[1] <= fds0 + 1  # +1: multiprocessing's resource tracker, started by the first spawn


def test_a_sync_shutdown_while_the_loop_is_stopped_leaves_no_descriptor_when_the_loop_then_closes():
    """Race review (2026-12-07): `run_until_complete`, then `shutdown()`, then `loop.close()` (the loop never ran
    again) left the loop's duplicates of each worker's pipes open: 4 descriptors per cycle with two workers."""
    from cjm_workers.core.config import WorkerConfig
    def cycle():
        loop = asyncio.new_event_loop()
        mgr = ReferenceJobManager(worker_config=WorkerConfig(max_workers=2))
        async def use():
            await mgr.start(wait=True)
            await mgr.wait_for_job((await mgr.start_job('echo', text='x')).id, timeout=T)
            assert all(s.loop_fds for s in mgr._slots)  # the loop holds each worker's pipes
        loop.run_until_complete(use())
        mgr.shutdown()
        loop.close()
    cycle(); gc.collect()
    fds = resource_counts()[1]
    for _ in range(3): cycle()
    gc.collect()
    assert resource_counts()[1] <= fds


def test_a_manager_outlives_its_first_event_loop():
    "asyncio.run twice: the first loop closes with a job in flight; the second loop picks up its result."
    mgr = ThreadRecordingManager()
    try:
        async def first(): return await mgr.start_job('slow', seconds=0.3)
        job = asyncio.run(first())  # closes its loop while the job runs
        async def second():
            done = await mgr.wait_for_job(job.id, timeout=T)
            return done.status, mgr.handled_on[job.id] == threading.get_ident()
        assert asyncio.run(second()) == ('completed', True)  # handled on the second loop
    finally: mgr.shutdown()


async def test_restarts_move_the_loop_readers_to_the_new_worker_without_leaking():
    "Each crash and restart hands the new worker's pipes to the loop; the dead worker's duplicates are closed."
    from cjm_workers.core.config import WorkerConfig
    mgr = ReferenceJobManager(worker_config=WorkerConfig(restart_policy='always', max_restart_attempts=100))
    try:
        await mgr.start(wait=True)
        await mgr.wait_for_job((await mgr.start_job('echo', text='warm')).id, timeout=T)
        fds = resource_counts()[1]
        for _ in range(5):
            crash = await mgr.wait_for_job((await mgr.start_job('crash')).id, timeout=T)
            assert crash.status == 'failed'
            ok = await mgr.wait_for_job((await mgr.start_job('echo', text='after')).id, timeout=T)
            assert ok.status == 'completed'
        slot = mgr._slots[0]
        assert slot.loop_reads is asyncio.get_running_loop() and len(slot.loop_fds) == 2
        await asyncio.sleep(0.1)  # the last dead worker's duplicates read end-of-file and are closed
        assert resource_counts()[1] <= fds  # (fewer, if something an earlier test left was collected meanwhile)
    finally: await mgr.ashutdown()


async def test_a_shutdown_that_blocks_the_loop_still_reads_a_streaming_worker_until_it_exits():
    """`shutdown()` called from a coroutine blocks the loop that reads the workers' pipes: it hands them to the
    management thread first, so a worker streaming faster than anyone reads (its results pipe full) still gets to
    see the stop, finish and exit by itself (exit code 0) instead of being killed."""
    from cjm_workers.core.config import WorkerConfig
    mgr = ReferenceJobManager(worker_config=WorkerConfig(shutdown_timeout_seconds=5))
    await mgr.start(wait=True)
    job = await mgr.start_job('tokens', text=' '.join(['word'] * 200_000), delay=0)
    proc = mgr.worker_process
    await asyncio.sleep(0.3)  # streaming: far more than a pipe holds is on its way
    assert job.status == 'running'
    mgr.shutdown()  # synchronous, on the loop's thread: the loop reads nothing until it returns
    assert proc.exitcode == 0, proc.exitcode  # it stopped by itself (a kill would be -15 or -9)
    assert job.status == 'cancelled' and job.reason == 'the manager shut down'


async def test_a_second_running_event_loop_is_refused_with_a_clear_error():
    """UAT finding: a manager used from a second event loop while its first still ran hung (a job's `wait_for_job` on
    one loop returned only when that loop woke up for another reason) or failed with "The future belongs to a
    different loop". Now the second loop gets a RuntimeError saying why; the first loop keeps the manager."""
    mgr = ReferenceJobManager()
    try:
        job = await mgr.start_job('echo', text='first')
        errors = []
        def other_thread():
            async def use():
                try: await mgr.start_job('echo', text='second')
                except RuntimeError as e: errors.append(str(e))
            asyncio.run(use())
        t = threading.Thread(target=other_thread); t.start()
        await asyncio.to_thread(t.join, T)
        assert len(errors) == 1 and 'used from another event loop that is still running' in errors[0], errors
        assert (await mgr.wait_for_job(job.id, timeout=T)).status == 'completed'
        assert [j.params['text'] for j in mgr.get_all_jobs()] == ['first']  # the refused call made no job
    finally: await mgr.ashutdown()


async def test_a_job_that_stopped_in_time_is_not_killed_because_a_busy_loop_had_not_read_its_end():
    """Ray review (2026-12-07): at a cancel's deadline the management thread killed the worker without reading what it
    had sent: with the event loop busy (a long synchronous call in a route), a job that had stopped well within its
    grace period still had its worker killed and restarted. The thread now reads the pipes before it decides."""
    from cjm_workers.core.config import WorkerConfig
    mgr = ReferenceJobManager(worker_config=WorkerConfig(cancel_grace_seconds=1.0))
    try:
        await mgr.start(wait=True)
        pid = mgr.get_worker_stats()[0]['pid']
        job = await mgr.start_job('slow', seconds=30)
        await asyncio.wait_for(_until(lambda: job.status == 'running'), T)
        cancel = asyncio.ensure_future(mgr.cancel_job(job.id))
        await asyncio.sleep(0)  # the cancel is sent (before cancel_job first waits)
        time.sleep(1.5)  # the event loop is busy past the deadline; the job stops within milliseconds, its end unread
        assert await cancel is True
        assert job.reason == 'cancelled on request', job.reason
        st = mgr.get_worker_stats()[0]
        assert (st['pid'], st['restarts']) == (pid, 0), st
    finally: await mgr.ashutdown()


async def _until(predicate):
    while not predicate(): await asyncio.sleep(0.01)
