"""Compatibility with cjm-fasthtml-workers: an app's worker entry point, plugin manager and manager subclass written
the predecessor's way still work; base_worker_process driven with plain multiprocessing queues; and the public
names, fields, defaults and signatures of the seed."""
import asyncio, dataclasses, inspect, multiprocessing as mp, re, uuid
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import pytest

import _b_entry
from cjm_workers.core.worker import base_worker_process
from cjm_workers.managers.base import BaseJob, BaseJobManager
from cjm_workers.core.config import RestartPolicy, WorkerConfig
from cjm_workers.stores.sqlite import SQLiteJobStore
from cjm_workers.testing import RecordingBroadcaster, wait_until
from _d_helpers import StoreJobManager

T = 30


# --------------------------------------------------------------------------------------------------------------
# 1. an app written for the predecessor

@dataclass
class TextProcessingJob(BaseJob):
    "A job subclass the predecessor's way: extra fields, all defaulted."
    text: str = ""
    priority: int = 0
    tags: List[str] = field(default_factory=list)


class TextProcessingManager(BaseJobManager):
    def __init__(self, worker_config: Optional[WorkerConfig] = None, event_broadcaster=None):
        super().__init__(worker_type="text_processing", category="processing", supports_streaming=True,
                         worker_config=worker_config, event_broadcaster=event_broadcaster)
        self.completed_count = 0

    def create_job(self, plugin_id: str, **kwargs) -> TextProcessingJob:
        return TextProcessingJob(id=str(uuid.uuid4()), plugin_id=plugin_id, text=kwargs.get('text', ''),
                                 priority=kwargs.get('priority', 0))

    def get_worker_entry_point(self) -> Callable:
        return _b_entry.entry

    def prepare_execute_request(self, job: TextProcessingJob) -> Dict[str, Any]:
        return {'text': job.text}

    def extract_job_result(self, job: TextProcessingJob, result_data: Dict[str, Any]) -> Dict[str, Any]:
        return result_data

    def _on_job_completed(self, job_id: str) -> None:
        self.completed_count += 1


@pytest.fixture
async def compat_manager():
    rec = RecordingBroadcaster()
    m = TextProcessingManager(event_broadcaster=rec)
    m.rec = rec
    yield m
    await m.ashutdown()


async def test_predecessor_style_app_normal_streaming_reload_unload(compat_manager):
    mgr = compat_manager
    job = await mgr.start_job('upper', text='hello', priority=3)
    assert isinstance(job, TextProcessingJob) and job.priority == 3 and job.text == 'hello'
    job = await mgr.wait_for_job(job.id, timeout=T)
    assert job.status == 'completed', (job.error, job.traceback)
    assert job.result['text'] == 'HELLO'
    assert job.result['metadata']['loads'] == {'upper': 1} and job.result['metadata']['config'] == {}
    assert mgr.get_job_result(job.id) == {'status': 'success', 'data': job.result} and mgr.completed_count == 1
    assert mgr.results[job.id] == {'status': 'success', 'data': job.result}  # the predecessor's `results` dict

    stream = await mgr.wait_for_job((await mgr.start_job('words', text='alpha beta gamma')).id, timeout=T)
    assert stream.status == 'completed', stream.error
    await mgr.flush_events(timeout=T)
    chunks = [d['chunk'] for t, d in mgr.rec.events if t == 'text_processing:chunk' and d['job_id'] == stream.id]
    assert chunks == ['alpha ', 'beta ', 'gamma']
    assert stream.result['text'] == 'alpha beta gamma' == stream.output
    assert mgr.rec.of(stream.id)[0] == 'pending' and mgr.rec.of(stream.id)[-1] == 'completed'

    # load/reload/unload of this plugin manager return None: that is success
    assert await mgr.reload_plugin('upper', {'suffix': '!'}) is True
    assert (await mgr.wait_for_job((await mgr.start_job('upper', text='hi')).id, timeout=T)).result['text'] == 'HI!'
    assert await mgr.unload_plugin('upper') is True
    state = (await mgr.get_worker_state())[0]
    assert 'upper' not in state['loaded'] and 'words' in state['loaded']
    again = await mgr.wait_for_job((await mgr.start_job('upper', text='yo')).id, timeout=T)
    assert again.status == 'completed' and again.result['metadata']['loads']['upper'] == 2  # loaded again
    assert mgr.completed_count == 4

    bad = await mgr.wait_for_job((await mgr.start_job('nonexistent', text='x')).id, timeout=T)
    assert bad.status == 'failed' and 'unknown plugin' in bad.error


async def test_a_manager_whose_methods_are_added_with_fastcores_patch_runs_jobs():
    """Porting review: an app in the fastcore style (the class, then `@patch def create_job(self:MyManager, ...)`)
    could not create its manager: ABC had counted the four methods missing when the class was made."""
    from fastcore.basics import patch
    class PatchedManager(BaseJobManager): "Its methods follow, fastcore style."
    @patch
    def create_job(self:PatchedManager, plugin_id:str, **kwargs): return TextProcessingJob(id=uuid.uuid4().hex, plugin_id=plugin_id, **kwargs)
    @patch
    def get_worker_entry_point(self:PatchedManager): return _b_entry.entry
    @patch
    def prepare_execute_request(self:PatchedManager, job): return {'text': job.text}
    @patch
    def extract_job_result(self:PatchedManager, job, result_data): return result_data
    mgr = PatchedManager('patched', 'processing')
    try:
        job = await mgr.wait_for_job((await mgr.start_job('upper', text='patched')).id, timeout=T)
        assert (job.status, job.result['text']) == ('completed', 'PATCHED'), job.error
    finally: await mgr.ashutdown()


def test_manager_subclass_can_subscript_base_job_manager_like_the_predecessor():
    "The predecessor's BaseJobManager was Generic[JobType]; apps wrote `class M(BaseJobManager[MyJob])`."
    class TypedManager(BaseJobManager[TextProcessingJob]):
        def create_job(self, plugin_id, **kw): return TextProcessingJob(id=uuid.uuid4().hex, plugin_id=plugin_id)
        def get_worker_entry_point(self): return _b_entry.entry
        def prepare_execute_request(self, job): return {'text': job.text}
        def extract_job_result(self, job, result_data): return result_data
    m = TypedManager('typed', 'processing')
    assert isinstance(m, BaseJobManager) and m.worker_process is None


class _HookedManager(StoreJobManager):
    """Hooks written either way, as ported apps write them: a plain-def `_validate_resources` (the seed's is async) and
    an async `_on_job_completed` that awaits something and then changes the job."""
    def _validate_resources(self, plugin_id, plugin_config):
        return 'no GPU is free' if plugin_id == 'slow' else None
    async def _on_job_completed(self, job_id):
        await asyncio.sleep(0.2)  # e.g. a notification sent to another service
        self.jobs[job_id].params['notified'] = True


async def test_hooks_may_be_plain_or_async_and_what_an_async_hook_changes_is_saved(mk, tmp_path):
    db = str(tmp_path / 'jobs.db')
    mgr = _HookedManager(SQLiteJobStore(db))
    try:
        refused = await mgr.start_job('slow', seconds=5)
        assert (refused.status, refused.error) == ('failed', 'no GPU is free')  # refused before reaching a worker
        done = await mgr.wait_for_job((await mgr.start_job('echo', text='a')).id, timeout=T)
        assert done.status == 'completed' and 'notified' not in done.params  # the hook runs after, on the loop
        await wait_until(lambda: done.params.get('notified'), T)
        last = await mgr.start_job('echo', text='b', sleep=0.3)
        await wait_until(lambda: last.status == 'running', T)
    finally: await mgr.ashutdown(drain_timeout=T)  # `last` finishes, and its hook ends before the store closes
    assert last.status == 'completed' and last.params.get('notified') is True
    again = mk(SQLiteJobStore(db))
    assert again.get_job(done.id).params == {'text': 'a', 'notified': True}  # the store kept what the hooks changed
    assert again.get_job(last.id).params == {'text': 'b', 'sleep': 0.3, 'notified': True}
    assert again.get_job(refused.id).error == 'no GPU is free'


def test_an_async_def_where_the_manager_needs_a_plain_def_is_refused_at_once():
    "An `async def extract_job_result` would make every result a coroutine: the class is refused when created."
    class AsyncResults(TextProcessingManager):
        async def extract_job_result(self, job, result_data): return result_data
    with pytest.raises(TypeError, match=r"AsyncResults\.extract_job_result is an async def, but the job manager calls it as a plain function"):
        AsyncResults()


# --------------------------------------------------------------------------------------------------------------
# 2. base_worker_process with plain multiprocessing queues

def _get(q, timeout=T):
    return q.get(timeout=timeout)


def test_base_worker_process_with_plain_queues():
    ctx = mp.get_context('spawn')
    rq, resq, respq = ctx.Queue(), ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_b_entry.entry, args=(rq, resq, respq))
    p.start()
    try:
        ready = _get(resq)
        assert ready['type'] == 'ready' and ready['pid'] == p.pid

        rq.put({'type': 'execute', 'job_id': 'j1', 'plugin_name': 'upper', 'text': 'hi'})
        started = _get(resq)
        assert started['type'] == 'started' and started['job_id'] == 'j1' and started['pid'] == p.pid
        result = _get(resq)
        assert result['type'] == 'result' and result['job_id'] == 'j1' and result['status'] == 'success'
        assert result['data']['text'] == 'HI' and result['data']['metadata']['pid'] == p.pid
        from cjm_workers.core.protocol import WorkerResult
        wr = WorkerResult.from_dict(result)
        assert wr.status == 'success' and wr.data['text'] == 'HI' and WorkerResult.from_dict(wr.to_dict()) == wr

        # an unpicklable result is reported as an error result, not lost
        rq.put({'type': 'execute', 'job_id': 'j2', 'plugin_name': 'bad', 'text': 'x'})
        assert _get(resq)['type'] == 'started'
        bad = _get(resq)
        assert bad['type'] == 'result' and bad['job_id'] == 'j2' and bad['status'] == 'error'
        assert 'pickl' in bad['error'].lower() and bad['data'] is None

        # a streaming job: chunks, then the result with the whole text
        rq.put({'type': 'execute', 'job_id': 'j3', 'plugin_name': 'words', 'text': 'a b c', 'stream': True})
        msgs = [_get(resq) for _ in range(5)]
        assert [m['type'] for m in msgs] == ['started', 'stream_chunk', 'stream_chunk', 'stream_chunk', 'result']
        assert [m['chunk'] for m in msgs[1:4]] == ['a ', 'b ', 'c']
        assert msgs[-1]['status'] == 'success' and msgs[-1]['data']['text'] == 'a b c'

        # commands answer on the response queue, with their request id
        rq.put({'type': 'get_state', 'request_id': 'r1'})
        st = _get(respq)
        assert st['type'] == 'state' and st['request_id'] == 'r1'
        assert set(st['data']['loaded']) == {'upper', 'bad', 'words'} and st['data']['jobs_done'] == 3
        rq.put({'type': 'reload', 'plugin_name': 'upper', 'config': {'suffix': '?'}, 'request_id': 'r2'})
        r2 = _get(respq)
        assert r2['type'] == 'response' and r2['request_id'] == 'r2' and r2['success'] is True
        rq.put({'type': 'unload', 'plugin_name': 'bad'})  # the predecessor sent commands without a request id
        r3 = _get(respq)
        assert r3['type'] == 'response' and r3['success'] is True
        rq.put({'type': 'execute', 'job_id': 'j4', 'plugin_name': 'upper', 'text': 'q'})
        assert _get(resq)['type'] == 'started'
        assert _get(resq)['data']['text'] == 'Q?'

        rq.put({'type': 'stop'})
        p.join(T)
        assert p.exitcode == 0
    finally:
        if p.is_alive(): p.kill(); p.join(5)
        for q in (rq, resq, respq):
            q.close(); q.join_thread()


# --------------------------------------------------------------------------------------------------------------
# 3. public names, fields, defaults, signatures

SEED_CONFIG = [
    ('request_queue_size', 0), ('result_queue_size', 100), ('response_queue_size', 10),
    ('restart_policy', RestartPolicy.ON_CANCELLATION), ('max_restart_attempts', 3),
    ('restart_backoff_base_seconds', 1.0), ('restart_backoff_max_seconds', 60.0), ('max_workers', 1),
    ('worker_start_timeout_seconds', 30.0), ('reload_timeout_seconds', 30.0), ('unload_timeout_seconds', 10.0),
    ('shutdown_timeout_seconds', 5.0), ('result_monitor_poll_interval_seconds', 0.5),
]


def test_config_names_fields_and_defaults():
    assert {p.name: p.value for p in RestartPolicy} == {
        'NEVER': 'never', 'ON_CANCELLATION': 'on_cancellation', 'ALWAYS': 'always', 'BACKOFF': 'backoff'}
    names = [f.name for f in dataclasses.fields(WorkerConfig)]
    assert names[:len(SEED_CONFIG)] == [n for n, _ in SEED_CONFIG]  # same order: positional use still works
    c = WorkerConfig()
    for name, default in SEED_CONFIG: assert getattr(c, name) == default, name
    assert WorkerConfig(*[d for _, d in SEED_CONFIG]) == c


def test_the_porting_guide_lists_every_new_config_field_with_its_default():
    "docs/porting.md's table of new `WorkerConfig` fields has a row for each field the seed did not have, with its default."
    text = (Path(__file__).parent.parent / 'docs' / 'porting.md').read_text()
    table = text.split('### `WorkerConfig`: new fields', 1)[1].split('\n\n`WorkerConfig` now validates', 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", table, re.M))
    new = [f for f in dataclasses.fields(WorkerConfig) if f.name not in dict(SEED_CONFIG)]
    assert sorted(rows) == sorted(f.name for f in new), set(rows) ^ {f.name for f in new}
    for f in new: assert rows[f.name] == repr(getattr(WorkerConfig(), f.name)), (f.name, rows[f.name])


def test_protocol_and_adapter_names():
    from cjm_workers.core import protocol
    assert {t.value for t in protocol.WorkerRequestType} >= {'init', 'execute', 'reload', 'unload', 'get_state', 'stop'}
    assert protocol.WorkerRequestType.GET_STATE.value == 'get_state' and protocol.WorkerRequestType.INIT.value == 'init'
    assert {t.value for t in protocol.WorkerResponseType} >= {'ready', 'result', 'stream_chunk', 'response', 'state', 'error'}
    assert protocol.WorkerResponseType.STREAM_CHUNK.value == 'stream_chunk'
    for n in ('WorkerRequest', 'WorkerResponse', 'WorkerStreamChunk', 'WorkerResult', 'PluginManagerAdapter'):
        assert hasattr(protocol, n), n
    r = protocol.WorkerResult(job_id='j', status='error', error='ValueError: x')
    d = r.to_dict()
    assert d['type'] == 'result' and d['job_id'] == 'j' and d['status'] == 'error' and d['error'] == 'ValueError: x'
    assert protocol.WorkerResult.from_dict(d) == r
    assert protocol.WorkerResult.from_dict({'job_id': 'k', 'status': 'success', 'data': {'text': 't'}}).data == {'text': 't'}
    req = protocol.WorkerRequest(protocol.WorkerRequestType.EXECUTE, {'job_id': 'j'})
    assert protocol.WorkerRequest.from_dict(req.to_dict()) == req
    ch = protocol.WorkerStreamChunk('j', 'text')
    assert protocol.WorkerStreamChunk.from_dict(ch.to_dict()) == ch

    from cjm_workers.core.adapters import create_simple_adapter, default_result_adapter
    assert callable(create_simple_adapter) and default_result_adapter({'text': 'a'}) == {'text': 'a'}
    from cjm_workers.extensions.protocols import (EventBroadcasterProtocol, PluginRegistryProtocol,
                                                  ResourceManagerProtocol)
    from cjm_workers.extensions.adapters import (ResourceManagerAdapter, SSEBroadcasterAdapter,
                                                 UnifiedPluginRegistryAdapter, create_standard_adapters)
    assert create_standard_adapters() == (None, None, None)
    assert callable(base_worker_process)
    assert list(inspect.signature(base_worker_process).parameters) == [
        'request_queue', 'result_queue', 'response_queue', 'plugin_manager_factory', 'result_adapter',
        'supports_streaming']


SEED_METHODS = ['_extract_plugin_resource_identifier', '_validate_resources', '_on_job_completed', '_start_worker',
                '_restart_worker', '_handle_job_result', '_handle_stream_chunk', '_handle_worker_error',
                'get_plugin_name', 'unload_plugin', 'reload_plugin', 'start_job', 'cancel_job', 'get_job',
                'get_all_jobs', 'get_job_result', 'clear_completed_jobs', 'broadcast_event',
                'check_streaming_support', 'shutdown']


def test_manager_names_methods_fields_and_signatures():
    from cjm_workers.managers import base
    assert base.JobType.__bound__ is BaseJob
    for m in SEED_METHODS: assert callable(getattr(BaseJobManager, m, None)), m
    for m in ('unload_plugin', 'reload_plugin', 'start_job', 'cancel_job', 'broadcast_event', '_validate_resources'):
        assert inspect.iscoroutinefunction(getattr(BaseJobManager, m)), m
    for m in ('get_job', 'get_all_jobs', 'get_job_result', 'clear_completed_jobs', 'shutdown', 'get_plugin_name',
              'check_streaming_support', '_on_job_completed', '_extract_plugin_resource_identifier'):
        assert not inspect.iscoroutinefunction(getattr(BaseJobManager, m)), m

    def params(f): return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]
    E, KW, PK = inspect.Parameter.empty, inspect.Parameter.VAR_KEYWORD, inspect.Parameter.POSITIONAL_OR_KEYWORD
    # the seed's (self, plugin_id, **kwargs), plus keyword-only scheduling options (issue 5) that cannot shift positions
    sj = params(BaseJobManager.start_job)
    assert sj[:2] == [('self', PK, E), ('plugin_id', PK, E)] and sj[-1] == ('kwargs', KW, E)
    assert all(kind == inspect.Parameter.KEYWORD_ONLY and d is not E for _, kind, d in sj[2:-1])
    assert params(BaseJobManager.cancel_job) == [('self', PK, E), ('job_id', PK, E)]
    assert params(BaseJobManager.reload_plugin) == [('self', PK, E), ('plugin_name', PK, E), ('config', PK, E)]
    assert params(BaseJobManager.unload_plugin) == [('self', PK, E), ('plugin_name', PK, E)]
    assert params(BaseJobManager.__init__) == [
        ('self', PK, E), ('worker_type', PK, E), ('category', PK, E), ('supports_streaming', PK, False),
        ('worker_config', PK, None), ('plugin_registry', PK, None), ('resource_manager', PK, None),
        ('event_broadcaster', PK, None), ('job_store', PK, None)]  # job_store: added after the seed's (issue 5)
    for m in ('get_job', 'get_job_result'): assert list(inspect.signature(getattr(BaseJobManager, m)).parameters) == ['self', 'job_id']
    assert list(inspect.signature(BaseJobManager.broadcast_event).parameters) == ['self', 'event_type', 'data']

    fields = {f.name: f for f in dataclasses.fields(BaseJob)}
    seed = ['id', 'plugin_id', 'status', 'created_at', 'started_at', 'completed_at', 'result', 'error', 'metadata',
            'worker_pid']
    assert [f.name for f in dataclasses.fields(BaseJob)][:len(seed)] == seed
    j = BaseJob('i', 'p')
    assert (j.status, j.started_at, j.completed_at, j.result, j.error, j.metadata, j.worker_pid) == \
        ('pending', None, None, None, None, {}, None)
    assert isinstance(j.created_at, str) and j.created_at
    for name in seed[2:]:
        f = fields[name]
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, name
