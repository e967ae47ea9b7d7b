"""Plugins written with `async def` (`AsyncChatPlugin` of `cjm_workers.testing`) in real worker processes and Ray
actors: the worker runs their coroutines and async generators on a loop of its own, kept for its life, and a cancel
reaches them as `asyncio.CancelledError` at their `await`. Before, such a job "completed" with the text
`<coroutine object ...>`, an async stream failed ("'async_generator' object is not an iterator"), and an
`async def initialize` never ran."""
import asyncio, os

import pytest

from cjm_workers.testing import RecordingBroadcaster, async_reference_worker, wait_until

pytestmark = [pytest.mark.backends('local', 'ray'), pytest.mark.timeout(120)]
T = 30  # seconds: a hang guard, never a speed assertion


async def test_an_async_plugin_answers_and_streams_on_one_loop(make_manager):
    events = RecordingBroadcaster()
    m = make_manager(entry_point=async_reference_worker, event_broadcaster=events)
    await m.start(wait=True)
    first = await m.wait_for_job((await m.start_job('achat', text='hi', stream=False)).id, timeout=T)
    assert first.status == 'completed', first.error
    assert first.result['text'] == 'you said: hi' and first.result['metadata']['client_loop'], first.result
    streamed = await m.wait_for_job((await m.start_job('achat', text='one two three')).id, timeout=T)
    assert streamed.status == 'completed' and streamed.result['text'] == 'one two three', (streamed.error, streamed.result)
    chunks = [d['chunk'] for t, d in events.events if t.endswith(':chunk') and d['job_id'] == streamed.id]
    assert chunks == ['one ', 'two ', 'three'], chunks
    again = await m.wait_for_job((await m.start_job('achat', text='again', stream=False)).id, timeout=T)
    assert again.result['metadata'] == {**first.result['metadata']}, (first.result, again.result)  # same worker, same loop


async def test_a_cancel_reaches_an_async_plugin_at_its_await_and_its_worker_serves_on(make_manager):
    m = make_manager(entry_point=async_reference_worker, config=dict(cancel_grace_seconds=60))
    await m.start(wait=True)
    job = await m.start_job('achat', text='long', delay=120, stream=False)
    await wait_until(lambda: m.get_job(job.id).status == 'running', T)
    pid = m.get_job(job.id).worker_pid
    assert await asyncio.wait_for(m.cancel_job(job.id), T)  # well before the 60 s grace: the plugin's task was cancelled
    assert m.get_job(job.id).status == 'cancelled'
    after = await m.wait_for_job((await m.start_job('achat', text='next', stream=False)).id, timeout=T)
    assert after.status == 'completed' and after.worker_pid == pid, (after.status, after.worker_pid, pid)  # not restarted


async def test_async_initialize_and_cleanup_run_in_the_worker(make_manager, tmp_path):
    log = tmp_path / 'closed.log'
    m = make_manager(entry_point=async_reference_worker)
    await m.start(wait=True)
    assert await m.reload_plugin('achat', {'closed_log': str(log)})
    done = await m.wait_for_job((await m.start_job('achat', text='x', stream=False)).id, timeout=T)
    assert done.status == 'completed' and done.result['metadata']['client_loop'], (done.error, done.result)
    assert await m.unload_plugin('achat')
    pid = done.result['metadata']['pid']
    assert log.read_text() == f"closed {pid}\n"


# Edges of `PluginLoop` (tests/_async_plugins.py): local workers only (a Ray actor's worker runs the same code).

@pytest.mark.backends('local')
async def test_a_cancelled_async_job_ends_once_the_thread_it_awaits_has_ended(make_manager, tmp_path):
    "Before, the job was `cancelled` at once while its `asyncio.to_thread` work ran on beside the next jobs (its `check_cancelled()` never fired)."
    from _async_plugins import async_edge_worker
    log, events = tmp_path / 'thread.log', RecordingBroadcaster()
    m = make_manager(entry_point=async_edge_worker, event_broadcaster=events, config=dict(cancel_grace_seconds=60))
    await m.start(wait=True)
    job = await m.start_job('athread', seconds=120, log=str(log), stream=False)
    await wait_until(lambda: any(t.endswith(':progress') and d['job_id'] == job.id for t, d in events.events), T)  # the thread runs
    assert await asyncio.wait_for(m.cancel_job(job.id), T)
    cancelled = m.get_job(job.id)
    assert cancelled.status == 'cancelled', (cancelled.status, cancelled.error)
    assert log.read_text() == f"thread ended {job.id}\n"  # its thread saw the cancel and ended before the job did
    after = await m.wait_for_job((await m.start_job('athread', seconds=0, stream=False)).id, timeout=T)
    assert after.status == 'completed' and after.worker_pid == cancelled.worker_pid, (after.status, after.error)


@pytest.mark.backends('local')
async def test_a_plugin_that_catches_its_cancel_ends_cancelled_with_its_partial_result(make_manager):
    "As docs/plugins.md says (not a defect found: the promise kept)."
    from _async_plugins import async_edge_worker
    m = make_manager(entry_point=async_edge_worker, config=dict(cancel_grace_seconds=60))
    await m.start(wait=True)
    job = await m.start_job('apartial', delay=120, stream=False)
    await wait_until(lambda: m.get_job(job.id).status == 'running', T)
    assert await asyncio.wait_for(m.cancel_job(job.id), T)
    cancelled = m.get_job(job.id)
    assert (cancelled.status, cancelled.result) == ('cancelled', {'text': 'partial', 'metadata': {'cut': True}}), cancelled.result


@pytest.mark.backends('local')
async def test_a_cancel_does_not_wait_for_a_thread_the_plugin_keeps_for_its_life(make_manager):
    "A thread started at the plugin's load is not the job's: the cancelled job ends at once, the worker serves on."
    from _async_plugins import async_edge_worker
    m = make_manager(entry_point=async_edge_worker, config=dict(cancel_grace_seconds=60))
    await m.start(wait=True)
    assert await m.reload_plugin('akeeper', {})
    job = await m.start_job('akeeper', delay=120, stream=False)
    await wait_until(lambda: m.get_job(job.id).status == 'running', T)
    assert await asyncio.wait_for(m.cancel_job(job.id), T)  # (well before the 60 s grace period)
    assert m.get_job(job.id).status == 'cancelled'
    after = await m.wait_for_job((await m.start_job('akeeper', delay=0, stream=False)).id, timeout=T)
    assert after.status == 'completed' and after.worker_pid == m.get_job(job.id).worker_pid, (after.status, after.error)


@pytest.mark.backends('local')
async def test_a_task_an_async_plugin_leaves_running_is_cancelled_and_awaited_at_stop(make_manager, tmp_path):
    "Before, the worker's stop logged 'Task was destroyed but it is pending!' and the task's `finally` could not await."
    from _async_plugins import async_edge_worker
    log = tmp_path / 'task.log'
    m = make_manager(entry_point=async_edge_worker)
    await m.start(wait=True)
    done = await m.wait_for_job((await m.start_job('aleave', log=str(log), stream=False)).id, timeout=T)
    assert done.status == 'completed', done.error
    await m.ashutdown()
    assert log.read_text() == "task ended\n"


@pytest.mark.backends('local')
async def test_an_asyncio_timeout_around_the_yields_of_an_async_stream_fires(make_manager):
    "Before, each item was read in a task of its own: the timeout, entered in the first, never fired (all 40 items came)."
    from _async_plugins import async_edge_worker
    m = make_manager(entry_point=async_edge_worker)
    await m.start(wait=True)
    done = await m.wait_for_job((await m.start_job('atimeout', n=400, delay=0.01, limit=0.2)).id, timeout=T)
    assert done.status == 'completed', done.error
    assert done.result['text'].endswith('timed out') and len(done.result['text'].split()) < 400, done.result


@pytest.mark.backends('local')
async def test_a_streamed_job_of_an_async_execute_through_create_simple_adapter_gets_its_result(make_manager):
    "A plugin manager with no execute_plugin_stream: before, the job 'completed' with the text '<coroutine object _then ...>'."
    from _async_plugins import async_adapted_worker
    events = RecordingBroadcaster()
    m = make_manager(entry_point=async_adapted_worker, event_broadcaster=events)
    await m.start(wait=True)
    done = await m.wait_for_job((await m.start_job('achat', text='hi')).id, timeout=T)
    assert done.status == 'completed', done.error
    assert (done.result['text'], done.result.get('adapted')) == ('you said: hi', True), done.result
    assert [d['chunk'] for t, d in events.events if t.endswith(':chunk')] == ['you said: hi']


@pytest.mark.backends('local')
async def test_a_reload_through_create_simple_adapter_awaits_an_async_unload(make_manager, tmp_path):
    "A plugin manager with no reload_plugin: before, its `async def unload_plugin` was dropped unrun, the old plugin never cleaned up."
    from _async_plugins import async_adapted_worker
    log = tmp_path / 'closed.log'
    m = make_manager(entry_point=async_adapted_worker)
    await m.start(wait=True)
    assert await m.reload_plugin('achat', {'closed_log': str(log)})  # (not loaded yet: a load)
    done = await m.wait_for_job((await m.start_job('achat', text='x', stream=False)).id, timeout=T)
    assert await m.reload_plugin('achat', {'closed_log': str(log)})  # unload (the old one's cleanup), then load
    assert log.read_text() == f"closed {done.result['metadata']['pid']}\n"


def test_an_async_stream_in_a_universal_worker_is_read_in_one_task_and_a_cancel_ends_it():
    """Before, each item was read in a task of its own (and a thread of its own): the plugin's `asyncio.timeout` never
    fired and all 400 items came. A cancel mid-stream still ends it with a `cancelled` line, and the next stream runs."""
    import json
    from test_remote_worker import Worker
    w = Worker('TimeoutStreamPlugin', module='_async_plugins').ready()
    try:
        with w.client() as c:
            lines = [json.loads(l) for l in c.post('/execute_stream', json={'kwargs': {'n': 400, 'delay': 0.01, 'limit': 0.2}}).text.splitlines()]
            assert lines[-1] == 'timed out' and len(lines) < 400, lines[-3:]
            got = []
            with c.stream('POST', '/execute_stream', json={'kwargs': {'n': 400, 'delay': 0.05, 'limit': 60}}) as r:
                for line in r.iter_lines():
                    got.append(json.loads(line))
                    if len(got) == 2: assert c.post('/cancel').json()['running'] is True
            assert got[:2] == ['0 ', '1 '] and got[-1]['cancelled'] is True and len(got) < 400, got[-3:]
            again = [json.loads(l) for l in c.post('/execute_stream', json={'kwargs': {'n': 3, 'delay': 0}}).text.splitlines()]
            assert again == ['0 ', '1 ', '2 '], again
    finally: w.stop()


def test_a_task_an_async_plugin_leaves_running_in_a_universal_worker_ends_at_its_shutdown(tmp_path):
    "Before, its loop was never closed: 'Task was destroyed but it is pending!' on stderr, and the task's `finally` could not await."
    from test_remote_worker import Worker
    log = tmp_path / 'task.log'
    w = Worker('LeavePlugin', module='_async_plugins').ready()
    try:
        with w.client() as c:
            assert c.post('/execute', json={'kwargs': {'log': str(log)}}).json()['text'] == 'left a task'
            assert c.post('/shutdown').status_code == 200
        assert w.proc.wait(T) == 0
        assert log.read_text() == "task ended\n"
        w.stderr.seek(0)
        assert 'Task was destroyed' not in w.stderr.read()
    finally: w.stop()


async def in_both_hosts(make_manager, plugin:str, cls:str, job_text:str, stream_text:str)->tuple:
    "(the job of `plugin` run in a worker process, the items of `cls`'s stream in a Universal Worker) for one edge plugin."
    import json
    from test_remote_worker import Worker
    from _async_plugins import async_edge_worker
    m = make_manager(entry_point=async_edge_worker)
    await m.start(wait=True)
    done = await m.wait_for_job((await m.start_job(plugin, text=job_text)).id, timeout=T)
    w = Worker(cls, module='_async_plugins').ready()
    try:
        with w.client() as c: return done, [json.loads(l) for l in c.post('/execute_stream', json={'kwargs': {'text': stream_text}}).text.splitlines()]
    finally: w.stop()


@pytest.mark.backends('local')
async def test_the_base_class_stream_of_an_async_execute_gives_its_result(make_manager):
    """`PluginInterface.execute_stream` (its `execute()`'s result, once) over an `async def execute`: before, the item was
    the coroutine (the text '<coroutine object ...>' here, a JSON error in a Universal Worker)."""
    done, items = await in_both_hosts(make_manager, 'aanswer', 'AsyncAnswer', 'x', 'y')
    assert done.status == 'completed' and done.result['text'] == 'answered x', (done.error, done.result)
    assert items == ['answered y'], items


@pytest.mark.backends('local')
async def test_an_execute_stream_that_returns_an_async_iterator_streams(make_manager):
    "A plain `async def execute_stream` returning an async iterator: before, 'coroutine' object is not an iterator (not iterable, in a Universal Worker)."
    done, items = await in_both_hosts(make_manager, 'amaker', 'AsyncStreamMaker', 'one two', 'x y')
    assert done.status == 'completed' and done.result['text'] == 'onetwo', (done.error, done.result)
    assert items == ['x', 'y'], items
