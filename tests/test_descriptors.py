"""An app with more than 1024 descriptors open: a busy server (a thousand open SSE streams, say) numbers every new
pipe, socket and pidfd above 1023, which `select.select` refuses (`ValueError: filedescriptor out of range`).

Before, with such an app: the SQLite job store (the default durable store) wrote nothing (its writer process waits
on descriptors that keep the app's numbers, and died at once, again and again: every job state "NOT written"); a Ray
worker's request bridge stopped at its first wait (jobs never reached the actor); `PipeChannel.get(timeout=...)` and
`empty()` raised; and taking over the file of a dead manager raised. They all wait with `poll` now."""
import asyncio, os, queue, resource, subprocess
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


# --------------------------------------------------------------------------------------------------------------
# An app at its descriptor limit (RLIMIT_NOFILE): every new pipe, pidfd or file fails with EMFILE until some close.

class Starved:
    "Takes every descriptor the soft limit leaves (lowered to what is open + 64, so this is quick); `free()` gives them back."
    def __init__(self):
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(self.limits[0], len(os.listdir('/proc/self/fd')) + 64), self.limits[1]))
        self.held = []
        self.take()
    def take(self, leave:int=0):
        "Open descriptors until none are left, then close `leave` of them."
        try:
            while True: self.held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError: pass
        for _ in range(leave): os.close(self.held.pop())
    def free(self):
        for fd in self.held: os.close(fd)
        self.held = []
    def restore(self):
        self.free()
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)


@pytest.fixture
def starved():
    s = Starved()
    s.free()  # (taken again by the test, when it wants)
    yield s
    s.restore()


def nfds(): return len(os.listdir('/proc/self/fd'))


async def test_a_worker_restart_with_no_descriptors_left_is_retried_and_succeeds_once_there_are(make_manager, starved):
    """Before, the restart after a crash raised EMFILE creating the worker's pipes, in the management thread, which
    logged it and went on: the slot stayed `stopped` for ever, no reason given, and every job waited for ever. Now a
    start that fails with an OSError is tried again later (as a crash is, up to `max_restart_attempts`), the worker's
    `failure` naming the cause meanwhile; once descriptors are free again the worker starts and runs the jobs."""
    m = make_manager(config=dict(restart_policy='always'))
    await m.start(wait=True)
    crash = await m.start_job('crash', mode='sigkill', after=0.3)
    await wait_until(lambda: m.get_job(crash.id).status == 'running', T)
    starved.take()
    await wait_until(lambda: m.get_job(crash.id).is_terminal, T)
    waiting = await m.start_job('echo', text='after')
    await wait_until(lambda: m.get_worker_stats()[0]['failure'] is not None, T)
    stats = m.get_worker_stats()[0]
    assert stats['status'] == 'restarting' and 'Too many open files' in stats['failure'], stats
    assert m.get_job(waiting.id).status == 'pending'
    starved.free()
    done = await m.wait_for_job(waiting.id, timeout=T)
    assert done.status == 'completed' and done.result['text'] == 'after', (done.status, done.error)
    assert m.get_worker_stats()[0]['failure'] is None


async def test_a_worker_start_that_keeps_failing_for_lack_of_descriptors_fails_the_jobs_naming_the_cause(make_manager, starved):
    m = make_manager(config=dict(max_restart_attempts=1))
    starved.take(leave=2)  # one pipe (the wake pipe), not the worker's
    await m.start()
    job = await m.start_job('echo', text='x')
    done = await m.wait_for_job(job.id, timeout=T)
    assert done.status == 'failed' and 'Too many open files' in done.error, (done.status, done.error)
    starved.free()
    await m.restart_workers()
    assert (await m.wait_for_job((await m.start_job('echo', text='y')).id, timeout=T)).status == 'completed'


async def test_a_manager_started_with_no_descriptors_left_raises_and_starts_later(make_manager, starved):
    "Before, `start()` raised EMFILE with the manager marked started and no management thread: it never ran a job."
    m = make_manager()
    before = nfds()
    starved.take()
    with pytest.raises(OSError, match='Too many open files'): await m.start()
    starved.free()
    assert nfds() == before
    await asyncio.wait_for(m.start(wait=True), T)
    assert (await m.wait_for_job((await m.start_job('echo', text='y')).id, timeout=T)).status == 'completed'


def test_a_writer_process_that_cannot_create_its_second_pipe_leaves_no_descriptor_open(starved, tmp_path):
    from cjm_workers.stores.sqlite_writer import WriterProcess
    before = nfds()
    starved.take(leave=2)  # its first pipe, not the second
    with pytest.raises(OSError, match='Too many open files'): WriterProcess(str(tmp_path / 'j.db'))
    starved.free()
    assert nfds() == before



async def test_a_store_whose_writer_process_cannot_be_replaced_for_lack_of_descriptors_reports_it_and_gets_a_process_later(
        starved, tmp_path):
    """Before, a writer process that could not be started for lack of descriptors (EMFILE: a passing shortage) was
    taken as "no process can be started here": the store wrote from a thread of the app for the rest of its life (the
    slow, fallback writer), and said nothing in its health. Now it is a failed write, reported and retried, and a
    writer process is started once descriptors are free."""
    import signal
    from cjm_workers.testing import ReferenceJob
    store = SQLiteJobStore(tmp_path / 'jobs.db', retry_interval=0.05)
    store.namespace = 'reference'
    try:
        first = ReferenceJob(id='first', plugin_id='echo'); first._seq = 1
        store.save(first)
        assert store.flush(T) and store.writer_pid is not None
        starved.take()
        os.kill(store.writer_pid, signal.SIGKILL)
        second = ReferenceJob(id='second', plugin_id='echo', status='completed', result={'text': 'kept'}); second._seq = 2
        store.save(second)
        await wait_until(lambda: store.failures >= 2, T)
        h = store.health()
        assert not h['ok'] and 'Too many open files' in h['error'] and h['unsaved'] == 1, h
        starved.free()
        assert store.flush(T)
        assert store.writer_pid is not None and store.health()['ok']  # a writer process again, not a thread
        assert store.get('second').result == {'text': 'kept'}
    finally: store.close()


async def test_a_manager_with_the_sqlite_store_starts_once_descriptors_are_free_whatever_its_start_ran_out_at(
        make_manager, starved, tmp_path):
    """Before, a start that ran out of descriptors while SQLite opened the file's -wal left the store's read-write
    connection broken: every later `start()` failed with "disk I/O error", descriptors free or not. Now a failed
    lease closes the store's connections, and the next start opens new ones. (Tried with each number of descriptors
    left that fails somewhere else in the start.)"""
    from cjm_workers.stores.base import JobStoreError
    for left in range(0, 9):
        m = make_manager(config=dict(max_restart_attempts=0), job_store=SQLiteJobStore(tmp_path / f'jobs{left}.db'))
        starved.take(leave=left)
        try: await m.start()
        except (OSError, JobStoreError) as e: assert 'Too many open files' in str(e) or 'open' in str(e), e
        finally: starved.free()
        await m.start()
        assert m.get_health()['store']['ok']
        await m.ashutdown()


def test_a_store_that_cannot_open_its_file_for_lack_of_descriptors_says_so(starved, tmp_path):
    """SQLite's `CantOpenError` keeps the system's error to itself, and the store used to guess "a missing folder, or a
    folder it may not create files in?" for it, with the folder there and writable. Now it asks the system again."""
    from cjm_workers.stores.base import JobStoreError
    from cjm_workers.testing import ReferenceJob
    store = SQLiteJobStore(tmp_path / 'jobs.db')
    store.namespace = 'reference'
    try:
        job = ReferenceJob(id='one', plugin_id='echo'); job._seq = 1
        store.save(job)
        assert store.flush(T)
        store._close_connections()
        starved.take()
        with pytest.raises(JobStoreError) as e: store.get('one')
        starved.free()
        assert 'Too many open files (EMFILE)' in str(e.value) and 'folder' not in str(e.value), str(e.value)
        assert store.get('one').id == 'one'
    finally: store.close()
