"""`cjm_workers.extensions.adapters` with a real `ReferenceJobManager` and its worker process.

`SSEBroadcasterAdapter` runs against the real `cjm_fasthtml_sse.SSEBroadcastManager` (a test dependency).
cjm-fasthtml-plugins and cjm-fasthtml-resources are not on the package index, so `UpstreamRegistry` and
`UpstreamResourceManager` below reproduce their public shapes (../shared/reference/NOTES.md §3): plugin metadata
with `.name`, `.is_configured`, `.get_unique_id()` = f"{category}_{name}", `load_plugin_config` returning `{}` when
there is none; worker states as objects, `update_worker_state` ignoring every argument passed as `None`.
"""
import asyncio, threading, time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, Optional

from cjm_fasthtml_sse.core import SSEBroadcastManager
from cjm_workers.extensions.adapters import (ResourceManagerAdapter, SSEBroadcasterAdapter, UnifiedPluginRegistryAdapter,
                                              create_standard_adapters)
from cjm_workers.extensions.protocols import EventBroadcasterProtocol, PluginRegistryProtocol, ResourceManagerProtocol
from cjm_workers.testing import REFERENCE_PLUGINS, wait_until


# --- stand-ins with the upstream shapes -------------------------------------------------------------------------

@dataclass
class PluginMetadata:
    "cjm-fasthtml-plugins' plugin metadata shape."
    name: str
    category: str
    title: str = ''
    is_configured: bool = False
    def get_unique_id(self) -> str: return f"{self.category}_{self.name}"


class UpstreamRegistry:
    "cjm-fasthtml-plugins' `UnifiedPluginRegistry` shape: plugins by category, configs saved per unique id."
    def __init__(self, category='reference', configs=None):
        self._plugins = {m.get_unique_id(): m for m in (PluginMetadata(n, category) for n in REFERENCE_PLUGINS)}
        self._configs = dict(configs or {})
        for uid in self._configs: self._plugins[uid].is_configured = True
    def get_plugins_by_category(self, category): return [m for m in self._plugins.values() if m.category == category]
    def get_plugin(self, unique_id): return self._plugins.get(unique_id)
    def load_plugin_config(self, unique_id) -> Dict[str, Any]: return dict(self._configs.get(unique_id, {}))


@dataclass
class WorkerState:
    "cjm-fasthtml-resources' worker state shape."
    pid: int
    worker_type: str
    job_id: Optional[str] = None
    plugin_name: Optional[str] = None
    plugin_id: Optional[str] = None
    loaded_plugin_resource: Optional[str] = None
    config: Optional[Dict[str, Any]] = None
    status: str = 'idle'
    last_updated: float = field(default_factory=time.time)


@dataclass
class ResourceConflict:
    "cjm-fasthtml-resources' answer to `check_gpu_availability`."
    status: str = 'available'
    app_pids: list = field(default_factory=list)
    external_pids: list = field(default_factory=list)


class UpstreamResourceManager:
    "cjm-fasthtml-resources' `ResourceManager` shape: `update_worker_state` ignores arguments passed as None."
    def __init__(self):
        self._workers: Dict[int, WorkerState] = {}
        self._lock = threading.Lock()
        self.unregistered = []
    def register_worker(self, pid, worker_type, job_id=None, plugin_name=None, plugin_id=None,
                        loaded_plugin_resource=None, config=None):
        with self._lock: self._workers[pid] = WorkerState(pid, worker_type, job_id, plugin_name, plugin_id, loaded_plugin_resource, config)
    def unregister_worker(self, pid):
        with self._lock:
            if self._workers.pop(pid, None) is not None: self.unregistered.append(pid)
    def update_worker_state(self, pid, job_id=None, plugin_name=None, plugin_id=None, loaded_plugin_resource=None,
                            config=None, status=None):
        with self._lock:
            state = self._workers.get(pid)
            if state is None: return
            for k, v in dict(job_id=job_id, plugin_name=plugin_name, plugin_id=plugin_id, config=config,
                             loaded_plugin_resource=loaded_plugin_resource, status=status).items():
                if v is not None: setattr(state, k, v)
            state.last_updated = time.time()
    def get_worker_by_pid(self, pid): return self._workers.get(pid)
    def get_all_workers(self): return list(self._workers.values())
    def check_gpu_availability(self): return ResourceConflict()


# --- tests ------------------------------------------------------------------------------------------------------

def test_adapters_satisfy_the_protocols():
    plug, res, sse = create_standard_adapters(UpstreamRegistry(), UpstreamResourceManager(), SSEBroadcastManager())
    assert isinstance(plug, PluginRegistryProtocol) and isinstance(plug, UnifiedPluginRegistryAdapter)
    assert isinstance(res, ResourceManagerProtocol) and isinstance(res, ResourceManagerAdapter)
    assert isinstance(sse, EventBroadcasterProtocol) and isinstance(sse, SSEBroadcasterAdapter)
    assert create_standard_adapters() == (None, None, None)
    assert res.check_gpu_availability() == ResourceConflict()


def test_the_upstream_resource_manager_alone_cannot_clear_a_field():
    "Why ResourceManagerAdapter exists: without it, an idle worker would keep its last job id."
    up = UpstreamResourceManager()
    up.register_worker(1, 'reference')
    up.update_worker_state(1, status='running', job_id='j')
    up.update_worker_state(1, status='idle', job_id=None)
    assert (up.get_worker_by_pid(1).status, up.get_worker_by_pid(1).job_id) == ('idle', 'j')
    res = ResourceManagerAdapter(up)
    res.update_worker_state(1, status='idle', job_id=None)
    res.update_worker_state(1, plugin_name='echo')  # a field not passed is left alone
    assert (up.get_worker_by_pid(1).status, up.get_worker_by_pid(1).job_id, up.get_worker_by_pid(1).plugin_name) == ('idle', None, 'echo')


async def test_sse_adapter_delivers_a_real_jobs_events_in_the_upstream_shape(make_manager):
    sse = SSEBroadcastManager(max_queue_size=1000)
    conn = await sse.register_connection()
    plug, _, sse_adapter = create_standard_adapters(plugin_registry=UpstreamRegistry(), sse_manager=sse)
    mgr = make_manager(event_broadcaster=sse_adapter, plugin_registry=plug)
    await mgr.start(wait=True)
    job = await mgr.start_job('reference_tokens', text='one two three', delay=0)
    await mgr.wait_for_job(job.id)
    await mgr.flush_events()
    msgs = []
    while not conn.empty(): msgs.append(conn.get_nowait())
    assert all(sorted(m) == ['data', 'timestamp', 'type'] for m in msgs)
    assert all(isinstance(datetime.fromisoformat(m['timestamp']), datetime) for m in msgs)
    mine = [m for m in msgs if m['data'].get('job_id') == job.id]
    assert [m['type'] for m in mine] == ['reference:pending', 'reference:started'] + ['reference:chunk'] * 3 + ['reference:completed']
    assert ''.join(m['data']['chunk'] for m in mine if m['type'] == 'reference:chunk') == 'one two three'
    assert mine[-1]['data']['result']['text'] == 'one two three'
    assert 'reference:worker_started' in [m['type'] for m in msgs]
    await sse.unregister_connection(conn)


async def test_sse_adapter_full_connection_is_dropped_and_jobs_go_on(make_manager):
    sse = SSEBroadcastManager(max_queue_size=2)
    stuck, reader = await sse.register_connection(), await sse.register_connection(asyncio.Queue(maxsize=1000))
    mgr = make_manager(event_broadcaster=SSEBroadcasterAdapter(sse))
    await mgr.start(wait=True)
    job = await mgr.start_job('tokens', text='a b c d e', delay=0)
    await mgr.wait_for_job(job.id)
    await mgr.flush_events()
    assert job.status == 'completed'
    assert sse.connection_count == 1 and stuck not in sse.connections  # upstream dropped the queue nobody read
    types = []
    while not reader.empty(): types.append(reader.get_nowait()['type'])
    assert types.count('reference:chunk') == 5 and 'reference:completed' in types


async def test_registry_and_resource_adapters_with_a_real_manager(make_manager):
    up = UpstreamResourceManager()
    plug, res, _ = create_standard_adapters(UpstreamRegistry(configs={'reference_transcribe': {'model': 'base-en'},
                                                                      'reference_echo': {'prefix': '>> '}}), up)
    mgr = make_manager(plugin_registry=plug, resource_manager=res)
    await mgr.start(wait=True)
    pid = mgr.get_worker_stats()[0]['pid']
    assert [(w.pid, w.worker_type) for w in up.get_all_workers()] == [(pid, 'reference')]

    # the registry names the plugin and supplies its saved configuration
    echo = await mgr.start_job('reference_echo', text='hi')
    await mgr.wait_for_job(echo.id)
    assert (echo.status, echo.plugin_name, echo.result['text']) == ('completed', 'echo', '>> hi')

    # while a job runs the resource manager sees it; afterwards the worker is idle with no job (cleared by the adapter)
    job = await mgr.start_job('reference_transcribe', steps=200, delay=0.01)
    await wait_until(lambda: up.get_worker_by_pid(pid).job_id == job.id, 30)
    st = up.get_worker_by_pid(pid)
    assert (st.status, st.plugin_name, st.plugin_id, st.loaded_plugin_resource, st.config) == \
           ('running', 'transcribe', 'reference_transcribe', 'base-en', {'model': 'base-en'})
    await mgr.cancel_job(job.id)
    await mgr.wait_for_job(job.id)
    await wait_until(lambda: up.get_worker_by_pid(pid) is None or up.get_worker_by_pid(pid).status == 'idle', 30)
    if up.get_worker_by_pid(pid) is not None: assert up.get_worker_by_pid(pid).job_id is None

    # unloading clears what was loaded
    live = mgr.get_worker_stats()[0]['pid']
    assert await mgr.unload_plugin('transcribe')
    st = up.get_worker_by_pid(live)
    assert (st.plugin_name, st.plugin_id, st.loaded_plugin_resource, st.config) == (None, None, None, None)

    await mgr.ashutdown()
    assert up.get_all_workers() == [] and live in up.unregistered


async def test_a_raising_resource_identifier_hook_loses_no_message_of_its_batch(track, caplog):
    """Race review (2026-12-07): `_extract_plugin_resource_identifier` that raised (a subclass's bug: a plugin whose
    configuration lacks the key it reads) ended the handling of the worker's messages read with the `started` that
    called it: a quick job's result, read in the same batch, was dropped, and the job stayed `running` for good.
    The hook's error is logged; the resource manager hears of the job without a resource; every message is handled."""
    from cjm_workers.testing import RecordingResourceManager, ReferenceJobManager, ReferenceRegistry

    class ModelKeyManager(ReferenceJobManager):
        def _extract_plugin_resource_identifier(self, config): return str(config['model'])  # KeyError for echo

    rm = RecordingResourceManager()
    mgr = track(ModelKeyManager(resource_manager=rm, plugin_registry=ReferenceRegistry(configs={'reference_transcribe': {'model': 'm1'}})))
    await mgr.start(wait=True)
    for i in range(6):
        job = await mgr.wait_for_job((await mgr.start_job('reference_echo', text=f'x{i}')).id, timeout=10)
        assert (job.status, job.result['text']) == ('completed', f'x{i}')
    ok = await mgr.wait_for_job((await mgr.start_job('reference_transcribe', steps=1, delay=0.0)).id, timeout=10)
    assert ok.status == 'completed'
    running = [f for c, _, f in rm.calls if c == 'update' and f.get('status') == 'running']
    assert [f['loaded_plugin_resource'] for f in running] == [None] * 6 + ['m1']
    assert sum('_extract_plugin_resource_identifier raised' in r.getMessage() for r in caplog.records) == 6
