"""An app with more than 1024 descriptors open: a busy server (a thousand open SSE streams, say) numbers every new
pipe, socket and pidfd above 1023, which `select.select` refuses (`ValueError: filedescriptor out of range`).

Before, with such an app: the SQLite job store (the default durable store) wrote nothing (its writer process waits
on descriptors that keep the app's numbers, and died at once, again and again: every job state "NOT written"); a Ray
worker's request bridge stopped at its first wait (jobs never reached the actor); `PipeChannel.get(timeout=...)` and
`empty()` raised; and taking over the file of a dead manager raised. They all wait with `poll` now."""
import os, queue, resource, subprocess
import multiprocessing as mp
import psutil, pytest

from cjm_workers.core.channel import PipeChannel
from cjm_workers.stores.sqlite import SQLiteJobStore, _ended_within
from cjm_workers.testing import wait_until

T = 30  # hang guard (s)


@pytest.fixture
def high_descriptors():
    "Every descriptor number below 1100 taken (the next ones opened are above 1023); all closed afterwards."
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300: pytest.skip(f"at most {hard} descriptors may be open here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    held = []
    try:
        while True:  # (gaps that earlier tests left below 1100 are filled too)
            held.append(fd := os.open(os.devnull, os.O_RDONLY))
            if fd >= 1100: break
        yield
    finally:
        for fd in held: os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.backends('local', 'ray')
async def test_jobs_run_and_are_written_to_the_sqlite_store_in_an_app_with_over_1024_descriptors_open(
        high_descriptors, make_manager, tmp_path):
    db = tmp_path / 'jobs.db'
    m = make_manager(job_store=SQLiteJobStore(db))
    await m.start(wait=True)
    done = await m.wait_for_job((await m.start_job('echo', text='hi')).id, timeout=T)
    assert done.status == 'completed', (done.status, done.error)
    assert done.result['text'] == 'hi'
    slow = await m.start_job('slow', seconds=30)
    await wait_until(lambda: m.get_job(slow.id).status == 'running', T)
    assert await m.cancel_job(slow.id)
    assert await m.wait_saved(slow.id, T)
    health = m.get_health()
    assert health['ok'], health['problems']
    await m.ashutdown()
    back = SQLiteJobStore(db, worker_type='reference')  # a reader of the file: what the writer process committed
    try: assert {j.id: j.status for j in back.list()} == {done.id: 'completed', slow.id: 'cancelled'}
    finally: back.close()


def test_a_channel_waits_for_a_message_on_a_descriptor_above_1023(high_descriptors):
    ch = PipeChannel(mp.get_context('spawn'))
    try:
        assert ch.reader_fd > 1023
        assert ch.empty()
        with pytest.raises(queue.Empty): ch.get(timeout=0.01)
        ch.put({'n': 1})
        assert not ch.empty() and ch.get(timeout=T) == {'n': 1}
    finally: ch.close()


def test_waiting_for_a_dead_managers_writer_process_with_a_pidfd_above_1023(high_descriptors):
    p = subprocess.Popen(['sleep', '30'])
    try:
        proc = psutil.Process(p.pid)
        assert not _ended_within(proc, 0.05)  # (its pidfd is numbered above 1023)
        p.kill()
        assert _ended_within(proc, T)  # ended (a zombie until reaped)
    finally:
        if p.poll() is None: p.kill(); p.wait()
