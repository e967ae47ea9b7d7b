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
