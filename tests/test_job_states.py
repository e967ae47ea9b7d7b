"""Job states with real worker processes: pending/running/terminal transitions, failures that keep the worker
serving, bad input that fails a job (never raises), waiting, reading jobs, and the abstract-method contract."""
import asyncio, logging, threading
from datetime import datetime

import pytest

import _b_entry
from cjm_workers.core.config import RestartPolicy, WorkerConfig
from cjm_workers.managers.base import BaseJobManager, TERMINAL_STATES
from cjm_workers.testing import RecordingBroadcaster, ReferenceJobManager, ReferenceRegistry, wait_until

pytestmark = pytest.mark.backends('local', 'ray')  # each test using make_manager runs on both backends

T = 30  # bound for waits that only guard against hangs



def ts(s): return datetime.fromisoformat(s)


# --------------------------------------------------------------------------------------------------------------
# 1. pending while queued, running only while executing

async def test_pending_until_worker_starts_it_and_running_only_while_executing(make_manager):
    rec = RecordingBroadcaster()
    mgr = make_manager(config=dict(prefetch=4, prefetch_max_job_seconds=None), event_broadcaster=rec)  # slow jobs sent ahead too
    await mgr.start(wait=True)
    a = await mgr.start_job('slow', seconds=0.6)
    b = await mgr.start_job('echo', text='b', sleep=0.3)
    c = await mgr.start_job('echo', text='c', sleep=0.3)
    jobs = (a, b, c)
    # all three were sent ahead into the (single) worker at once, but none is running before the worker says so
    assert mgr.get_worker_stats()[0]['queued_in_worker'] == 3
    assert [mgr.get_queue_position(j.id) for j in (b, c)] == [2, 3]  # inside the worker, behind `a`
    await wait_until(lambda: a.status == 'running', timeout=T)
    assert a.started_at is not None and a.worker_pid == mgr.worker_process.pid
    for j in (b, c):
        assert j.status == 'pending' and j.started_at is None and j.worker_pid is None

    seen = {j.id: [] for j in jobs}
    end = asyncio.get_running_loop().time() + T
    while True:
        with mgr._lock:  # a consistent snapshot (the management thread changes states under this lock)
            snap = [j.status for j in jobs]
        assert snap.count('running') <= 1, snap
        for j, s in zip(jobs, snap):
            if not seen[j.id] or seen[j.id][-1] != s: seen[j.id].append(s)
        if all(s in TERMINAL_STATES for s in snap): break
        assert asyncio.get_running_loop().time() < end, "jobs did not finish"
        await asyncio.sleep(0.002)
    assert seen[a.id] == ['running', 'completed']
    assert seen[b.id] == ['pending', 'running', 'completed']
    assert seen[c.id] == ['pending', 'running', 'completed']

    for j in jobs:
        assert j.started_at and j.completed_at and j.worker_pid == mgr.worker_process.pid
        assert ts(j.created_at) <= ts(j.started_at) <= ts(j.completed_at)
    # one at a time, in order
    assert ts(a.completed_at) <= ts(b.started_at) and ts(b.completed_at) <= ts(c.started_at)
    await mgr.flush_events(timeout=T)
    for j in jobs: assert rec.of(j.id) == ['pending', 'started', 'completed']
    names = [t.split(':', 1)[1] + ':' + d['job_id'] for t, d in rec.events if 'job_id' in d]
    assert names.index(f'completed:{a.id}') < names.index(f'started:{b.id}')


async def test_jobs_stay_pending_while_the_worker_is_starting(make_manager):
    mgr = make_manager(entry_point=_b_entry.slow_start_worker)
    await mgr.start()
    jobs = [await mgr.start_job('echo', text=str(i)) for i in range(3)]
    assert [j.status for j in jobs] == ['pending'] * 3
    assert mgr.get_worker_stats()[0]['status'] == 'starting'
    for j in jobs: assert j.started_at is None and j.worker_pid is None
    done = [await mgr.wait_for_job(j.id, timeout=T) for j in jobs]
    assert [j.status for j in done] == ['completed'] * 3
    assert [j.result['text'] for j in done] == ['0', '1', '2']


# --------------------------------------------------------------------------------------------------------------
# 2./3./4./5. failures in the plugin, the result, the manager hooks

async def test_plugin_exception_fails_job_with_worker_traceback_and_worker_keeps_serving(make_manager):
    mgr = make_manager()
    ok = await mgr.wait_for_job((await mgr.start_job('echo', text='before')).id, timeout=T)
    pid = ok.worker_pid
    assert ok.status == 'completed' and pid is not None
    job = await mgr.wait_for_job((await mgr.start_job('echo', text='x', fail='boom')).id, timeout=T)
    assert job.status == 'failed'
    assert job.error == 'ValueError: boom'
    assert job.reason and 'boom' in job.reason
    assert job.traceback and 'Traceback' in job.traceback
    assert 'testing.py' in job.traceback and 'raise ValueError(fail)' in job.traceback  # the worker-side frame
    assert job.result is None and mgr.get_job_result(job.id) == {'status': 'error', 'error': job.error}
    assert job.started_at and job.completed_at
    after = await mgr.wait_for_job((await mgr.start_job('echo', text='after')).id, timeout=T)
    assert after.status == 'completed' and after.result['text'] == 'after'
    assert after.worker_pid == pid == mgr.worker_process.pid and after.result['metadata']['pid'] == pid


async def test_unpicklable_result_fails_job_and_worker_keeps_serving(make_manager):
    mgr = make_manager()
    first = await mgr.wait_for_job((await mgr.start_job('echo', text='a')).id, timeout=T)
    job = await mgr.wait_for_job((await mgr.start_job('echo', text='b', unpicklable=True)).id, timeout=T)
    assert job.status == 'failed'
    assert 'pickl' in job.error.lower() and 'pickl' in job.reason.lower()
    assert job.result is None
    after = await mgr.wait_for_job((await mgr.start_job('echo', text='c')).id, timeout=T)
    assert after.status == 'completed' and after.result['text'] == 'c'
    assert after.worker_pid == first.worker_pid == job.worker_pid == mgr.worker_process.pid


class _BadExtract(ReferenceJobManager):
    def extract_job_result(self, job, result_data):
        if job.params.get('text') == 'bad': raise KeyError('segments')
        return result_data


async def test_extract_job_result_raising_fails_the_job_never_completed_without_result(track):
    rec = RecordingBroadcaster()
    mgr = track(_BadExtract(event_broadcaster=rec))
    job = await mgr.wait_for_job((await mgr.start_job('echo', text='bad')).id, timeout=T)
    assert job.status == 'failed'
    assert 'KeyError' in job.error and 'segments' in job.error and 'extract_job_result' in job.error
    assert job.result is None and mgr.get_job_result(job.id) == {'status': 'error', 'error': job.error}
    assert job.traceback and 'KeyError' in job.traceback
    after = await mgr.wait_for_job((await mgr.start_job('echo', text='good')).id, timeout=T)
    assert after.status == 'completed' and after.result['text'] == 'good'
    assert after.worker_pid == job.worker_pid == mgr.worker_process.pid
    await mgr.flush_events(timeout=T)
    assert rec.of(job.id) == ['pending', 'started', 'failed']  # never a 'completed' for it


class _RaisingHook(ReferenceJobManager):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.hook_calls = []
    def _on_job_completed(self, job_id):
        self.hook_calls.append(job_id)
        raise RuntimeError("hook exploded")


async def test_raising_on_job_completed_is_logged_and_job_stays_completed(track, caplog):
    caplog.set_level(logging.ERROR, logger='cjm_workers')
    mgr = track(_RaisingHook())
    job = await mgr.wait_for_job((await mgr.start_job('echo', text='hi')).id, timeout=T)
    assert job.status == 'completed' and job.result['text'] == 'hi' and job.error is None
    assert mgr.get_job_result(job.id) == {'status': 'success', 'data': job.result}
    assert mgr.hook_calls == [job.id]
    await wait_until(lambda: any(job.id in r.getMessage() for r in caplog.records), timeout=T)
    rec = next(r for r in caplog.records if job.id in r.getMessage())
    assert rec.levelno >= logging.ERROR and rec.exc_info and 'hook exploded' in str(rec.exc_info[1])
    again = await mgr.wait_for_job((await mgr.start_job('echo', text='again')).id, timeout=T)
    assert again.status == 'completed'


# --------------------------------------------------------------------------------------------------------------
# 6. bad input

async def test_unknown_plugin_without_registry_fails_with_reason(make_manager):
    mgr = make_manager()
    job = await mgr.wait_for_job((await mgr.start_job('no_such_plugin', text='x')).id, timeout=T)
    assert job.status == 'failed'
    assert 'unknown plugin' in job.error and 'no_such_plugin' in job.error
    ok = await mgr.wait_for_job((await mgr.start_job('echo', text='y')).id, timeout=T)
    assert ok.status == 'completed' and ok.worker_pid == job.worker_pid


async def test_unknown_plugin_id_with_registry_fails_at_once_nothing_sent(make_manager):
    mgr = make_manager(plugin_registry=ReferenceRegistry())
    await mgr.start(wait=True)
    job = await mgr.start_job('reference_nope', text='x')
    assert job.status == 'failed'  # at once, before any await on the job
    assert 'reference_nope' in job.reason and 'unknown plugin' in job.reason and job.error
    assert job.started_at is None and job.worker_pid is None and job.completed_at is not None
    assert mgr.get_worker_stats()[0]['jobs_done'] == 0
    state = await mgr.get_worker_state()
    assert state[0]['jobs_done'] == 0 and state[0]['loaded'] == {}
    assert (await mgr.wait_for_job(job.id, timeout=T)) is job
    ok = await mgr.wait_for_job((await mgr.start_job('reference_echo', text='y')).id, timeout=T)
    assert ok.status == 'completed'
    assert (await mgr.get_worker_state())[0]['jobs_done'] == 1


class _Validating(ReferenceJobManager):
    async def _validate_resources(self, plugin_id, plugin_config):
        if plugin_id == 'transcribe': return "not enough GPU memory for transcribe (need 8 GB)"
        return None


async def test_validate_resources_message_fails_job(track):
    mgr = track(_Validating())
    job = await mgr.start_job('transcribe', steps=1)
    assert job.status == 'failed'
    assert job.error == "not enough GPU memory for transcribe (need 8 GB)"
    assert job.reason == job.error and job.worker_pid is None
    ok = await mgr.wait_for_job((await mgr.start_job('echo', text='y')).id, timeout=T)
    assert ok.status == 'completed'


class _BadPrepare(ReferenceJobManager):
    def prepare_execute_request(self, job):
        if job.params.get('explode'): raise RuntimeError("cannot read the audio header")
        return super().prepare_execute_request(job)


async def test_prepare_execute_request_raising_fails_job(track):
    mgr = track(_BadPrepare())
    job = await mgr.start_job('echo', explode=True)
    assert job.status == 'failed'
    assert 'RuntimeError' in job.error and 'cannot read the audio header' in job.error
    assert 'cannot read the audio header' in job.reason
    assert job.traceback and 'prepare_execute_request' in job.traceback
    ok = await mgr.wait_for_job((await mgr.start_job('echo', text='y')).id, timeout=T)
    assert ok.status == 'completed'


async def test_plugin_that_fails_to_load_fails_job(make_manager):
    mgr = make_manager()
    job = await mgr.wait_for_job((await mgr.start_job('noload')).id, timeout=T)
    assert job.status == 'failed' and 'load' in job.error and 'noload' in job.error
    assert 'noload' not in (await mgr.get_worker_state())[0]['loaded']
    ok = await mgr.wait_for_job((await mgr.start_job('echo', text='y')).id, timeout=T)
    assert ok.status == 'completed' and ok.worker_pid == job.worker_pid


async def test_unpicklable_job_parameter_fails_the_job_instead_of_raising(make_manager):
    "Documented: a request that cannot be pickled gives a job that is already `failed` (bad input never raises)."
    mgr = make_manager()
    await mgr.start(wait=True)
    job = None
    try:
        job = await mgr.start_job('echo', text='x', handle=threading.Lock())
    except Exception as e:  # the documented contract says this never raises
        pytest.fail(f"start_job raised {type(e).__name__}: {e}")
    job = await mgr.wait_for_job(job.id, timeout=5)
    assert job.status == 'failed' and 'pickl' in (job.reason or '').lower()
    ok = await mgr.wait_for_job((await mgr.start_job('echo', text='y')).id, timeout=T)
    assert ok.status == 'completed'


@pytest.mark.parametrize('kw,exc,field', [
    (dict(prefetch=0), ValueError, 'prefetch'),
    (dict(max_workers=0), ValueError, 'max_workers'),
    (dict(cancel_grace_seconds=-1.0), ValueError, 'cancel_grace_seconds'),
    (dict(reload_timeout_seconds=-0.5), ValueError, 'reload_timeout_seconds'),
    (dict(max_workers='2'), TypeError, 'max_workers'),
    (dict(prefetch=1.5), TypeError, 'prefetch'),
    (dict(max_restart_attempts=True), TypeError, 'max_restart_attempts'),
    (dict(event_timeout_seconds=None), TypeError, 'event_timeout_seconds'),
    (dict(restart_policy='sometimes'), ValueError, 'restart_policy'),
    (dict(restart_policy=3), TypeError, 'restart_policy'),
    (dict(start_method='teleport'), ValueError, 'start_method'),
    (dict(restart_backoff_base_seconds=10.0, restart_backoff_max_seconds=1.0), ValueError, 'restart_backoff_max_seconds'),
])
def test_worker_config_rejects_invalid_values_naming_the_field(kw, exc, field):
    with pytest.raises(exc) as ei: WorkerConfig(**kw)
    assert field in str(ei.value)


def test_worker_config_accepts_valid_values():
    c = WorkerConfig(restart_policy='ALWAYS', cancel_grace_seconds=0, prefetch=1, max_workers=2, reload_timeout_seconds=1)
    assert c.restart_policy is RestartPolicy.ALWAYS and c.cancel_grace_seconds == 0 and c.max_workers == 2


# --------------------------------------------------------------------------------------------------------------
# 7. wait_for_job

async def test_wait_for_job_unknown_id_and_timeout(make_manager):
    mgr = make_manager()
    with pytest.raises(KeyError): await mgr.wait_for_job('no-such-job', timeout=1)
    job = await mgr.start_job('slow', seconds=0.8)
    with pytest.raises(TimeoutError): await mgr.wait_for_job(job.id, timeout=0.05)
    assert not job.is_terminal
    done = await mgr.wait_for_job(job.id, timeout=T)
    assert done is job and job.status == 'completed' and job.result['text'] == 'slept 0.8s'
    assert (await mgr.wait_for_job(job.id, timeout=0)) is job  # a finished job returns at once


# --------------------------------------------------------------------------------------------------------------
# 8. reading jobs

async def test_get_job_get_all_jobs_get_job_result_clear_completed_jobs(make_manager):
    mgr = make_manager(config=dict(prefetch=1))
    c1 = await mgr.wait_for_job((await mgr.start_job('echo', text='one')).id, timeout=T)
    c2 = await mgr.wait_for_job((await mgr.start_job('echo', text='two')).id, timeout=T)
    f1 = await mgr.wait_for_job((await mgr.start_job('echo', fail='nope')).id, timeout=T)
    assert mgr.get_job(c1.id) is c1 and mgr.get_job('missing') is None
    assert mgr.get_job_result(c1.id) == {'status': 'success', 'data': c1.result} and c1.result == {'text': 'one', 'metadata': c1.result['metadata']}
    assert mgr.get_job_result(f1.id) == {'status': 'error', 'error': f1.error} and mgr.get_job_result('missing') is None

    running = await mgr.start_job('slow', seconds=0.8)
    await wait_until(lambda: running.status == 'running', timeout=T)
    pending = await mgr.start_job('echo', text='later')
    assert pending.status == 'pending'
    assert {j.id for j in mgr.get_all_jobs()} == {c1.id, c2.id, f1.id, running.id, pending.id}

    assert mgr.clear_completed_jobs() == 3
    assert {j.id for j in mgr.get_all_jobs()} == {running.id, pending.id}
    assert mgr.get_job(c1.id) is None and mgr.get_job_result(c1.id) is None and mgr.get_job(f1.id) is None
    assert mgr.clear_completed_jobs() == 0
    for j in (running, pending): assert (await mgr.wait_for_job(j.id, timeout=T)).status == 'completed'
    assert pending.result['text'] == 'later' and mgr.get_job_result(pending.id) == {'status': 'success', 'data': pending.result}
    assert mgr.clear_completed_jobs() == 2 and mgr.get_all_jobs() == []


async def test_get_queue_position(make_manager):
    # while the worker is still starting, jobs wait in the manager's queue: 1 = next to run
    mgr = make_manager(entry_point=_b_entry.slow_start_worker, config=dict(prefetch=1))
    await mgr.start()
    a, b, c = [await mgr.start_job('echo', text=t) for t in 'abc']
    assert [mgr.get_queue_position(j.id) for j in (a, b, c)] == [1, 2, 3]
    assert mgr.get_queue_position('missing') is None
    assert await mgr.cancel_job(a.id) is True
    assert mgr.get_queue_position(a.id) is None
    assert [mgr.get_queue_position(j.id) for j in (b, c)] == [1, 2]
    for j in (b, c): assert (await mgr.wait_for_job(j.id, timeout=T)).status == 'completed'
    assert mgr.get_queue_position(b.id) is None

    # with a job running (prefetch=1), the running job counts as ahead
    s = await mgr.start_job('slow', seconds=0.6)
    await wait_until(lambda: s.status == 'running', timeout=T)
    d = await mgr.start_job('echo', text='d')
    e = await mgr.start_job('echo', text='e')
    assert mgr.get_queue_position(s.id) is None
    assert [mgr.get_queue_position(j.id) for j in (d, e)] == [2, 3]
    for j in (s, d, e): assert (await mgr.wait_for_job(j.id, timeout=T)).status == 'completed'


# --------------------------------------------------------------------------------------------------------------
# 9. abstract methods

def test_abstract_methods_are_enforced():
    with pytest.raises(TypeError): BaseJobManager('x', 'y')

    class OnlyTwo(BaseJobManager):
        def create_job(self, plugin_id, **kw): ...
        def get_worker_entry_point(self): ...
    with pytest.raises(TypeError) as ei: OnlyTwo('x', 'y')
    assert 'prepare_execute_request' in str(ei.value) and 'extract_job_result' in str(ei.value)

    class ThreeOfFour(OnlyTwo):
        def prepare_execute_request(self, job): return {}
    with pytest.raises(TypeError) as ei: ThreeOfFour('x', 'y')
    assert 'extract_job_result' in str(ei.value)

    class Complete(ThreeOfFour):
        def extract_job_result(self, job, result_data): return result_data
    m = Complete('x', 'y')  # nothing starts in __init__
    assert m.worker_process is None and m.jobs == {}
    assert set(BaseJobManager.__abstractmethods__) == {'create_job', 'get_worker_entry_point',
                                                       'prepare_execute_request', 'extract_job_result'}
