"""Plugins and commands with real workers: on-demand loading (once), plugin resolution through a registry or
`prepare_execute_request`, reload/unload (between jobs, withdrawn on timeout, matched by request id, never
blocking the loop), the resource-manager calls, telemetry, and the resource-manager adapter."""
import asyncio
from dataclasses import dataclass
from typing import Any, Dict, Optional


import _b_entry
from cjm_workers.extensions.adapters import (ResourceManagerAdapter, SSEBroadcasterAdapter,
                                             UnifiedPluginRegistryAdapter, create_standard_adapters)
from cjm_workers.extensions.protocols import ResourceManagerProtocol
from cjm_workers.testing import (RecordingBroadcaster, RecordingResourceManager, ReferenceJobManager,
                                 ReferenceRegistry, wait_until)

import pytest
pytestmark = pytest.mark.backends('local', 'ray')  # each test using make_manager runs on both backends

T = 30



async def run(mgr, plugin_id, **kw):
    return await mgr.wait_for_job((await mgr.start_job(plugin_id, **kw)).id, timeout=T)


async def loaded(mgr) -> dict:
    state = await mgr.get_worker_state()
    assert len(state) == 1 and 'pid' in state[0], state
    return state[0]['loaded']


# --------------------------------------------------------------------------------------------------------------
# 1. plugins load on demand, once

async def test_plugins_load_on_demand_once(make_manager):
    mgr = make_manager(entry_point=_b_entry.instrumented_worker)
    await mgr.start(wait=True)
    assert await loaded(mgr) == {}
    pid = mgr.worker_process.pid
    results = [await run(mgr, 'echo', text=f"t{i}") for i in range(4)]
    for i, j in enumerate(results):
        assert j.status == 'completed' and j.result['text'] == f"t{i}"
        md = j.result['metadata']
        assert md['pid'] == pid and md['config'] == {'prefix': ''}
        assert md['loads'] == {'echo': 1}  # loaded once, at the first job
    assert set(await loaded(mgr)) == {'echo'}
    tr = await run(mgr, 'transcribe', steps=1, delay=0)
    assert tr.status == 'completed' and tr.result['metadata']['model'] == 'tiny-reference'
    assert set(await loaded(mgr)) == {'echo', 'transcribe'}
    last = await run(mgr, 'echo', text='again')
    assert last.result['metadata']['loads'] == {'echo': 1, 'transcribe': 1}


async def test_max_loaded_plugins_keeps_one_model_at_a_time(make_manager):
    "`max_loaded_plugins=1`: a worker unloads the plugin it used last before it loads another."
    mgr = make_manager(dict(max_loaded_plugins=1), entry_point=_b_entry.instrumented_worker)
    first = await run(mgr, 'echo', text='a')
    assert set(await loaded(mgr)) == {'echo'}
    assert (await run(mgr, 'transcribe', steps=1, delay=0)).status == 'completed'
    assert set(await loaded(mgr)) == {'transcribe'}  # echo was unloaded first
    again = await run(mgr, 'echo', text='b')
    assert again.result['metadata']['loads'] == {'echo': 2, 'transcribe': 1}  # loaded again, in the same process
    assert again.result['metadata']['pid'] == first.result['metadata']['pid']
    assert set(await loaded(mgr)) == {'echo'} and list(mgr._slots[0].loaded) == ['echo']  # the manager's view agrees


async def test_registry_resolves_plugin_name_and_config_used_at_first_load(make_manager):
    reg = ReferenceRegistry(configs={'reference_echo': {'prefix': '> '}})
    mgr = make_manager(plugin_registry=reg)
    job = await run(mgr, 'reference_echo', text='hi')
    assert job.status == 'completed' and job.plugin_name == 'echo' and job.plugin_id == 'reference_echo'
    assert job.result['text'] == '> hi' and job.result['metadata']['config'] == {'prefix': '> '}
    assert await loaded(mgr) == {'echo': {'prefix': '> '}}
    # the plugin stays loaded with the config of its first load (reload_plugin changes it)
    reg.configs['reference_echo'] = {'prefix': '>> '}
    assert (await run(mgr, 'reference_echo', text='x')).result['text'] == '> x'


class _Aliased(ReferenceJobManager):
    "No registry: plugin ids differ from plugin names, and prepare_execute_request names the plugin."
    ALIASES = {'acme-echo-v1': 'echo', 'acme-tokens-v1': 'tokens'}
    def prepare_execute_request(self, job):
        return {**job.params, 'plugin_name': self.ALIASES[job.plugin_id]}


async def test_prepare_execute_request_plugin_name_picks_the_plugin(track):
    mgr = track(_Aliased())
    job = await run(mgr, 'acme-echo-v1', text='aliased')
    assert job.status == 'completed' and job.plugin_name == 'echo' and job.result['text'] == 'aliased'
    tok = await run(mgr, 'acme-tokens-v1', text='a b', delay=0)
    assert tok.status == 'completed' and tok.plugin_name == 'tokens' and tok.output == 'a b'
    assert set(await loaded(mgr)) == {'echo', 'tokens'}


# --------------------------------------------------------------------------------------------------------------
# 2. reload / unload

async def test_reload_and_unload(make_manager):
    mgr = make_manager()
    assert (await run(mgr, 'echo', text='a')).result['text'] == 'a'
    assert await mgr.reload_plugin('echo', {'prefix': 'NEW '}) is True
    b = await run(mgr, 'echo', text='b')
    assert b.result['text'] == 'NEW b' and b.result['metadata']['config'] == {'prefix': 'NEW '}
    assert (await loaded(mgr))['echo'] == {'prefix': 'NEW '}

    # reload of a plugin not loaded yet loads it with that config
    assert await mgr.reload_plugin('transcribe', {'model': 'big-reference'}) is True
    assert (await run(mgr, 'transcribe', steps=1, delay=0)).result['metadata']['model'] == 'big-reference'

    assert await mgr.reload_plugin('noload', {}) is False
    assert 'noload' not in await loaded(mgr)

    assert await mgr.unload_plugin('echo') is True
    assert 'echo' not in await loaded(mgr)
    c = await run(mgr, 'echo', text='c')  # loaded again on demand, with the last reloaded config
    assert c.status == 'completed' and c.result['text'] == 'NEW c'
    assert 'echo' in await loaded(mgr)
    assert await mgr.unload_plugin('transcribe') is True
    assert set(await loaded(mgr)) == {'echo'}


async def test_reload_of_unknown_plugin_returns_false(make_manager):
    mgr = make_manager()
    assert await mgr.reload_plugin('no_such_plugin', {'x': 1}) is False
    assert (await run(mgr, 'echo', text='fine')).status == 'completed'


async def test_unload_of_unknown_plugin_returns_false(make_manager):
    "A plugin name the plugin manager does not offer at all: unload must report failure, not success."
    mgr = make_manager()
    await mgr.start(wait=True)
    assert await mgr.unload_plugin('no_such_plugin') is False
    assert (await run(mgr, 'echo', text='fine')).status == 'completed'


# --------------------------------------------------------------------------------------------------------------
# 3. commands while a job runs

async def test_command_runs_after_the_running_job(make_manager):
    mgr = make_manager()
    await mgr.start(wait=True)
    slow = await mgr.start_job('slow', seconds=1.0)
    await wait_until(lambda: slow.status == 'running', timeout=T)
    assert await mgr.reload_plugin('echo', {'prefix': 'R '}) is True
    assert slow.status == 'completed'  # the command waited for the job
    assert (await run(mgr, 'echo', text='x')).result['text'] == 'R x'


async def test_timed_out_command_is_withdrawn(make_manager):
    mgr = make_manager(config=dict(reload_timeout_seconds=0.3))
    assert (await run(mgr, 'echo', text='x')).result['text'] == 'x'
    slow = await mgr.start_job('slow', seconds=1.5)
    await wait_until(lambda: slow.status == 'running', timeout=T)
    assert await mgr.reload_plugin('echo', {'prefix': 'LATE '}) is False
    assert (await mgr.wait_for_job(slow.id, timeout=T)).status == 'completed'
    # the withdrawn reload never ran: the old prefix is still in use
    assert (await run(mgr, 'echo', text='y')).result['text'] == 'y'
    state = await mgr.get_worker_state()  # its own answer, not a stale one
    assert state[0]['pid'] == mgr.worker_process.pid and state[0]['loaded']['echo'] == {}
    assert (await run(mgr, 'echo', text='z')).result['text'] == 'z'


async def test_late_reply_is_never_taken_for_the_next_commands_answer(make_manager):
    mgr = make_manager(entry_point=_b_entry.instrumented_worker, config=dict(reload_timeout_seconds=0.3))
    assert (await run(mgr, 'echo', text='x')).status == 'completed'
    # the worker starts this reload at once (nothing to withdraw), fails it after 1 s: its reply comes late
    assert await mgr.reload_plugin('echo', {'reload_sleep': 1.0, 'reload_fail': True}) is False
    # sent while the worker is still in the slow reload; the late (failed) reply arrives first and must be dropped
    assert await mgr.unload_plugin('echo') is True
    state = await mgr.get_worker_state()
    assert 'pid' in state[0] and state[0]['loaded'] == {}
    assert (await run(mgr, 'echo', text='y')).result['text'] == 'y'


# --------------------------------------------------------------------------------------------------------------
# 4. commands do not block the event loop

async def test_reload_and_unload_do_not_block_the_event_loop(make_manager):
    mgr = make_manager()
    await mgr.start(wait=True)
    for command in (lambda: mgr.reload_plugin('echo', {'prefix': 'T '}), lambda: mgr.unload_plugin('echo')):
        slow = await mgr.start_job('slow', seconds=1.0)
        await wait_until(lambda: slow.status == 'running', timeout=T)
        ticks, stop = 0, asyncio.Event()
        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)
        t = asyncio.create_task(ticker())
        ok = await command()
        stop.set()
        await t
        assert ok is True and slow.status == 'completed'
        assert ticks >= 20, ticks  # ~100 expected during the ~1 s wait; 1 if the loop had been blocked


# --------------------------------------------------------------------------------------------------------------
# 5. resource manager

async def test_resource_manager_calls(make_manager):
    rm = RecordingResourceManager()
    reg = ReferenceRegistry(configs={'reference_echo': {'prefix': '', 'model_id': 'echo-v1'}})
    mgr = make_manager(resource_manager=rm, plugin_registry=reg)
    await mgr.start(wait=True)
    pid = mgr.worker_process.pid
    assert rm.calls[0] == ('register', pid, {'worker_type': 'reference'})
    assert rm.workers[pid]['status'] == 'idle'
    n0 = len(rm.calls)

    jobs = [await mgr.start_job('reference_echo', text=str(i), sleep=0.1) for i in range(3)]
    for j in jobs: assert (await mgr.wait_for_job(j.id, timeout=T)).status == 'completed'
    updates = [c[2] for c in rm.calls[n0:] if c[0] == 'update' and c[1] == pid]
    statuses = [u.get('status') for u in updates]
    assert statuses == ['running', 'running', 'running', 'idle'], updates  # no 'idle' while jobs were queued
    for u, j in zip(updates, jobs):
        assert u == {'status': 'running', 'job_id': j.id, 'plugin_name': 'echo', 'plugin_id': 'reference_echo',
                     'loaded_plugin_resource': 'echo-v1', 'config': {'prefix': '', 'model_id': 'echo-v1'}}
    assert 'job_id' in updates[-1] and updates[-1]['job_id'] is None
    assert rm.workers[pid]['status'] == 'idle' and rm.workers[pid]['job_id'] is None
    assert rm.workers[pid]['plugin_name'] == 'echo'

    assert await mgr.unload_plugin('echo') is True
    last = rm.calls[-1]
    assert last[0] == 'update' and last[1] == pid
    assert last[2] == {'status': 'idle', 'plugin_name': None, 'plugin_id': None,
                       'loaded_plugin_resource': None, 'config': None}
    w = rm.workers[pid]
    assert w['plugin_name'] is None and w['plugin_id'] is None and w['config'] is None
    assert w['loaded_plugin_resource'] is None

    await mgr.ashutdown()
    assert ('unregister', pid, {}) in rm.calls and rm.workers == {}


async def test_resource_manager_unregisters_dead_workers(make_manager):
    rm = RecordingResourceManager()
    mgr = make_manager(resource_manager=rm, config=dict(restart_policy='always'))
    await mgr.start(wait=True)
    pid1 = mgr.worker_process.pid
    crash = await run(mgr, 'crash', mode='sigkill')
    assert crash.status == 'failed'
    assert ('unregister', pid1, {}) in rm.calls and pid1 not in rm.workers
    await mgr.wait_until_ready(timeout=T)
    pid2 = mgr.worker_process.pid
    assert pid2 != pid1 and set(rm.workers) == {pid2}
    assert (await run(mgr, 'echo', text='x')).status == 'completed'
    await mgr.ashutdown()
    assert rm.workers == {}
    registered = [c[1] for c in rm.calls if c[0] == 'register']
    unregistered = [c[1] for c in rm.calls if c[0] == 'unregister']
    assert registered == [pid1, pid2] and sorted(unregistered) == sorted(registered)


# --------------------------------------------------------------------------------------------------------------
# 6. telemetry

async def test_worker_stats(make_manager):
    mgr = make_manager()
    await mgr.start(wait=True)
    for i in range(3): await run(mgr, 'echo', text=str(i))
    await run(mgr, 'echo', fail='x')
    stats = mgr.get_worker_stats()
    assert len(stats) == 1
    s = stats[0]
    assert s['pid'] == mgr.worker_process.pid
    assert isinstance(s['cpu_percent'], float) and s['cpu_percent'] >= 0
    assert isinstance(s['rss_bytes'], int) and s['rss_bytes'] > 0
    assert s['uptime_seconds'] > 0
    assert s['jobs_done'] == 4
    assert s['status'] == 'idle'
    slow = await mgr.start_job('slow', seconds=0.5)
    await wait_until(lambda: slow.status == 'running', timeout=T)
    s = mgr.get_worker_stats()[0]
    assert s['status'] == 'busy' and s['current_job_id'] == slow.id
    await mgr.wait_for_job(slow.id, timeout=T)
    s = mgr.get_worker_stats()[0]
    assert s['jobs_done'] == 5 and s['status'] == 'idle'
    assert (await mgr.get_worker_state())[0]['jobs_done'] == 5


# --------------------------------------------------------------------------------------------------------------
# 7. the adapter for cjm-fasthtml-resources' ResourceManager

@dataclass
class UpstreamWorkerState:
    pid: int
    worker_type: str
    status: str = 'idle'
    job_id: Optional[str] = None
    plugin_name: Optional[str] = None
    plugin_id: Optional[str] = None
    loaded_plugin_resource: Optional[str] = None
    config: Optional[Dict[str, Any]] = None


class UpstreamResourceManager:
    "The shape of cjm-fasthtml-resources' ResourceManager: update_worker_state ignores None."
    def __init__(self): self.active_workers: Dict[int, UpstreamWorkerState] = {}
    def register_worker(self, pid, worker_type, **kw): self.active_workers[pid] = UpstreamWorkerState(pid, worker_type)
    def unregister_worker(self, pid): self.active_workers.pop(pid, None)
    def update_worker_state(self, pid, status=None, job_id=None, plugin_name=None, plugin_id=None,
                            loaded_plugin_resource=None, config=None):
        w = self.active_workers.get(pid)
        if w is None: return
        for k, v in dict(status=status, job_id=job_id, plugin_name=plugin_name, plugin_id=plugin_id,
                         loaded_plugin_resource=loaded_plugin_resource, config=config).items():
            if v is not None: setattr(w, k, v)
    def get_worker_by_pid(self, pid): return self.active_workers.get(pid)
    def check_gpu_availability(self): return 'no-conflict'


def test_resource_manager_adapter_clears_fields():
    up = UpstreamResourceManager()
    plugin_adapter, rm, sse = create_standard_adapters(resource_manager=up)
    assert plugin_adapter is None and sse is None and isinstance(rm, ResourceManagerAdapter)
    assert isinstance(rm, ResourceManagerProtocol)
    rm.register_worker(42, 'transcription')
    rm.update_worker_state(42, status='running', job_id='j1', plugin_name='whisper', plugin_id='p_whisper',
                           loaded_plugin_resource='tiny', config={'model': 'tiny'})
    w = up.get_worker_by_pid(42)
    assert (w.status, w.job_id, w.plugin_name, w.config) == ('running', 'j1', 'whisper', {'model': 'tiny'})
    rm.update_worker_state(42, status='idle', job_id=None)  # job_id cleared, plugin fields left alone
    assert (w.status, w.job_id, w.plugin_name, w.loaded_plugin_resource) == ('idle', None, 'whisper', 'tiny')
    rm.update_worker_state(42, status='idle', plugin_name=None, plugin_id=None, loaded_plugin_resource=None, config=None)
    assert (w.plugin_name, w.plugin_id, w.loaded_plugin_resource, w.config) == (None, None, None, None)
    assert rm.check_gpu_availability() == 'no-conflict' and rm.get_worker_by_pid(42) is w
    rm.update_worker_state(7, status='idle', job_id=None)  # unknown pid: nothing happens, nothing raises
    rm.unregister_worker(42)
    assert up.active_workers == {}

    reg, rec = ReferenceRegistry(), RecordingBroadcaster()
    pa, ra, sa = create_standard_adapters(plugin_registry=reg, resource_manager=up, sse_manager=rec)
    assert isinstance(pa, UnifiedPluginRegistryAdapter) and isinstance(ra, ResourceManagerAdapter)
    assert isinstance(sa, SSEBroadcasterAdapter)
    assert pa.get_plugin('reference_echo').name == 'echo' and pa.load_plugin_config('reference_echo') == {}
    asyncio.run(sa.broadcast('x:y', {'job_id': '1'}))
    assert rec.events == [('x:y', {'job_id': '1'})]


async def test_resource_manager_adapter_with_a_real_manager(make_manager):
    up = UpstreamResourceManager()
    reg = ReferenceRegistry(configs={'reference_echo': {'model': 'echo-model'}})
    mgr = make_manager(resource_manager=ResourceManagerAdapter(up), plugin_registry=reg)
    await mgr.start(wait=True)
    pid = mgr.worker_process.pid
    job = await run(mgr, 'reference_echo', text='x')
    w = up.get_worker_by_pid(pid)
    assert w.status == 'idle' and w.job_id is None  # cleared through the adapter
    assert (w.plugin_name, w.plugin_id, w.loaded_plugin_resource) == ('echo', 'reference_echo', 'echo-model')
    assert w.config == {'model': 'echo-model'} and job.status == 'completed'
    assert await mgr.unload_plugin('echo') is True
    assert (w.plugin_name, w.plugin_id, w.loaded_plugin_resource, w.config) == (None, None, None, None)
    await mgr.ashutdown()
    assert up.active_workers == {}
