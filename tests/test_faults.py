"""Fault-injection and abuse suite (issue 6), short sizes: each scenario of `tests/_f_scenarios.py` beats on real
workers, files and HTTP servers, and its invariants (see that module: one terminal state with a reason and one
terminal event per job, nothing finished lost, no orphan process, no leaked thread or fd, the manager serves on)
are checked by its `Invariants`. `bench/soak.py` runs the same scenarios at the issue's sizes.

The random moments (kills, cancels, drops) come from a seeded RNG: the seed is printed, and
`CJM_FAULT_SEED=<seed> pytest tests/test_faults.py` replays a run.
"""
import os, random

import pytest
import _f_scenarios as S
from cjm_workers.testing import wait_until

SEED = int(os.environ.get('CJM_FAULT_SEED') or random.SystemRandom().randrange(2**31))
pytestmark = pytest.mark.timeout(150)


def check(out: S.Outcome):
    print(f"\n{out.scenario}: seed {out.seed} (CJM_FAULT_SEED={SEED}); {out.jobs} jobs, {out.faults} faults, "
          f"{out.seconds:.1f} s; {out.notes}")
    assert out.violations == [], f"seed {SEED}: " + '\n'.join(out.violations)
    assert (out.lost, out.orphans, out.leaked_fds, out.leaked_threads) == (0, 0, 0, 0)


def size(name): return S.SCENARIOS[name][1]


async def test_workers_killed_at_random_moments():
    "SIGKILL and SIGSEGV from outside, os._exit and a segfault from inside, during streaming and plain jobs."
    check(await S.worker_kills(size('worker_kills'), SEED))


async def test_app_sigkilled_with_workers_running():
    check(await S.app_sigkill(size('app_sigkill'), SEED))


async def test_app_restarted_mid_run_on_sqlite():
    check(await S.app_restarts(size('app_restarts'), SEED))


async def test_many_submissions_from_many_coroutines():
    check(await S.many_submissions(size('many_submissions'), SEED))


async def test_cancel_versus_complete_races():
    check(await S.cancel_races(size('cancel_races'), SEED))


async def test_sse_clients_dropping_mid_stream():
    check(await S.sse_churn(size('sse_churn'), SEED))


async def test_100_mb_result():
    check(await S.big_result(size('big_result'), SEED))


async def test_plugin_ignoring_cancel():
    check(await S.ignores_cancel(size('ignores_cancel'), SEED))


async def test_plugin_hanging_in_load():
    check(await S.hangs_in_load(size('hangs_in_load'), SEED))


async def test_bad_input_to_the_manager():
    check(await S.bad_manager_input(size('bad_manager_input'), SEED))


async def test_bad_input_to_the_http_worker():
    check(await S.bad_http_input(size('bad_http_input'), SEED))


async def test_bad_input_to_the_job_routes():
    check(await S.bad_route_input(size('bad_route_input'), SEED))


def test_malformed_protocol_messages_to_the_worker_loop():
    check(S.protocol_fuzz(size('protocol_fuzz'), SEED))


# ----------------------------------------------------------------------------------------------------------------
# Regression tests for what the suite found (each fails without its fix; see docs/reliability.md)

from cjm_workers.core.channel import PipeChannel  # noqa: E402
from cjm_workers.testing import RecordingBroadcaster, reference_worker  # noqa: E402
from _f_plugins import FJobManager, Unloadable  # noqa: E402

BIG = 'x' * 100_000  # one request larger than a pipe holds (64 KiB)


async def test_large_requests_queued_before_the_worker_is_ready_do_not_deadlock(track):
    "The management thread once blocked writing requests to a worker that was blocked writing a result to it."
    mgr = track(FJobManager())
    jobs = [await mgr.start_job('echo', text=BIG) for _ in range(20)]  # all dispatched when the worker becomes ready
    for j in jobs: assert (await mgr.wait_for_job(j.id, timeout=S.T)).result['text'] == BIG


async def test_large_requests_do_not_block_the_event_loop_while_the_worker_is_busy(track):
    "start_job once blocked the event loop in a pipe write until the busy worker finished its job and read on."
    mgr = track(FJobManager())
    long = await mgr.start_job('tokens', text=' '.join(['w'] * 40), delay=0.1)
    await wait_until(lambda: long.status == 'running', S.T)
    jobs = [await mgr.start_job('echo', text=BIG) for _ in range(20)]
    assert long.status == 'running'  # every start_job returned while the worker was still busy with `long`
    assert await mgr.cancel_job(long.id)
    for j in jobs: assert (await mgr.wait_for_job(j.id, timeout=S.T)).status == 'completed'


async def test_a_result_the_app_cannot_unpickle_fails_its_job_and_the_worker_serves_on(track):
    "Such a result once wedged the results channel: that job and every later one stayed unfinished for ever."
    events = RecordingBroadcaster()
    mgr = track(FJobManager(event_broadcaster=events))
    bomb = await mgr.wait_for_job((await mgr.start_job('bomb')).id, timeout=S.T)
    assert bomb.status == 'failed' and "the worker's result cannot be unpickled in the app" in bomb.error
    assert 'an Unloadable cannot be rebuilt here' in bomb.error
    after = await mgr.wait_for_job((await mgr.start_job('echo', text='after')).id, timeout=S.T)
    assert after.result['text'] == 'after' and after.worker_pid == bomb.worker_pid and mgr.restart_count == 0
    await mgr.flush_events()
    assert events.of(bomb.id)[-1] == 'failed'


async def test_parameters_the_worker_cannot_unpickle_fail_their_job_without_killing_the_worker(track):
    "Such a request once crashed the worker, was requeued and crashed it again until every job failed."
    mgr = track(FJobManager(config=dict(restart_policy='always', max_restart_attempts=2)))
    first = await mgr.wait_for_job((await mgr.start_job('echo', text='first')).id, timeout=S.T)
    bad = await mgr.wait_for_job((await mgr.start_job('echo', text=Unloadable())).id, timeout=S.T)
    assert bad.status == 'failed' and 'the worker cannot read the request' in bad.error and bad.attempts == 1
    after = await mgr.wait_for_job((await mgr.start_job('echo', text='after')).id, timeout=S.T)
    assert after.status == 'completed' and after.worker_pid == first.worker_pid and mgr.restart_count == 0


def test_undecodable_frames_on_both_request_pipes_are_skipped():
    "Garbage frames (and unhashable ids) once killed the worker (request pipe) or its control thread (cancels then went unheard)."
    import multiprocessing as mp
    ctx = mp.get_context('spawn')
    req, res, resp = PipeChannel(ctx, control=True), PipeChannel(ctx), PipeChannel(ctx)
    p = ctx.Process(target=reference_worker, args=(req, res, resp))
    p.start()
    try:
        assert res.get(timeout=S.T)['type'] == 'ready'
        for ch in (req, req.control): ch.put_pickled(b'not a pickle')
        req.control.put(['not', 'a', 'dict'])
        for ch in (req, req.control): ch.put({'type': 'cancel', 'job_id': ['unhashable']})
        req.put({'type': 'execute', 'job_id': ['unhashable'], 'plugin_name': 'echo'})  # once a TypeError that ended the worker
        req.put({'type': 'execute', 'job_id': 'slow', 'plugin_name': 'slow', 'seconds': 60})
        assert res.get(timeout=S.T) == {'type': 'started', 'job_id': 'slow', 'pid': p.pid}
        req.control.put({'type': 'cancel', 'job_id': 'slow'})  # the control thread still listens
        out = res.get(timeout=S.T)
        assert (out['job_id'], out['status']) == ('slow', 'cancelled')
    finally:
        req.put({'type': 'stop'})
        p.join(10)
        if p.is_alive(): p.kill(); p.join(10)
        for c in (req, res, resp): c.close()
    assert p.exitcode == 0


class _Unreadable:
    "Pickles in the app; unpickling it raises (as an object of a class only the app can import would)."
    def __reduce__(self): return (int, ('not a number',))


@pytest.mark.backends('local', 'ray')
async def test_a_request_the_worker_cannot_read_fails_its_job_on_either_backend(make_manager):
    """Ray review (2026-12-07): on Ray the bridge unpickled each request in the app, then the actor pickled it again:
    a request that could not make that trip (unpicklable there, a class defined in the app's `__main__`, a module
    only the app has) stopped the bridge, and that job and every later one stayed `pending` for good. Requests now go
    to the worker as the manager pickled them, and the worker fails the job that it cannot read, as locally."""
    mgr = make_manager()
    await mgr.start(wait=True)
    bad = await mgr.wait_for_job((await mgr.start_job('echo', text='x', payload=_Unreadable())).id, timeout=S.T)
    assert bad.status == 'failed' and 'the worker cannot read the request' in bad.error, (bad.status, bad.error)
    after = await mgr.wait_for_job((await mgr.start_job('echo', text='after')).id, timeout=S.T)
    assert after.status == 'completed' and after.worker_pid == bad.worker_pid
