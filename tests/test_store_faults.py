"""The SQLite job store when its file misbehaves (findings of the 2026-11-25 acceptance test, scripts in /tmp/uat_dur):
writes that keep failing at shutdown (a database locked by another process; a full disk, on a real small tmpfs when
this runs as root), reads while the disk is full, bad database files, missing folders, bad parameters, and reading a
store without its manager. Real SQLite files, real managers, worker and writer processes; nothing is mocked."""
import asyncio, contextlib, logging, os, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path

import psutil, pytest
from cjm_workers.stores.base import JobStoreError
from cjm_workers.stores.sqlite import SQLiteJobStore
from cjm_workers.testing import wait_until
from _a_helpers import gone
from _d_helpers import StoreJobManager, run_job

T = 30
LOG = 'cjm_workers.stores'


def store_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith('cjm-store')]


class Locker:
    """Another process holding the database's write lock (what a second app writing the file looks like to the store).
    `later=True`: the process starts now and takes the lock when `lock()` is called (in milliseconds, not a start's time)."""
    def __init__(self, db, later=False):
        self.p = subprocess.Popen([sys.executable, '-c', "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
                                   "print('ready', flush=True); sys.stdin.readline(); "
                                   "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()", str(db)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == 'ready'
        if not later: self.lock()
    def lock(self):
        self.p.stdin.write('lock\n'); self.p.stdin.flush()
        assert self.p.stdout.readline().strip() == 'locked'
    def release(self):
        if self.p.poll() is None:
            self.p.stdin.close(); self.p.wait(T)
        self.p.stdout.close()


def loss_reports(caplog):
    return [r for r in caplog.records if 'NOT written' in r.getMessage()]


# --------------------------------------------------------------------------------------------------------------
# 1. writes that keep failing when the manager shuts down: a bounded wait, one error naming what was lost

@pytest.mark.parametrize('stuck', [False, True], ids=['batches-fail', 'batch-stuck-in-the-writer'])
async def test_shutdown_while_writes_fail_waits_close_timeout_then_reports_the_unwritten_jobs(mk, tmp_path, caplog, stuck):
    """Finding 1: shutdown() blocked 90 s (release flushed for 30 s, close joined the sender for 60 s), said nothing
    about the jobs it had not written and left the `cjm-store-*` thread running; every retry logged a traceback.
    Now: at most `close_timeout` for the last writes, then the writer process is ended (also when a batch is stuck in
    it: here it waits out a 60 s busy_timeout) and ONE error names the file, the error and the jobs not written;
    a retry logs a traceback only for the first failure of a series. Afterwards a manager in the same process can
    start on the file (the lease the full database kept counts as given back)."""
    db = tmp_path / 'jobs.db'
    store = SQLiteJobStore(db, busy_timeout=60 if stuck else 0.05, retry_interval=0.1, close_timeout=1.5)
    mgr = mk(store, config=dict(prefetch=4))
    first = await run_job(mgr, 'echo', text='written')
    writer = psutil.Process(store.writer_pid)
    caplog.set_level('WARNING', logger=LOG)
    locker = Locker(db)
    try:
        jobs = [await mgr.start_job('echo', text=f'lost {i}') for i in range(12)]
        await wait_until(lambda: all(j.status == 'completed' for j in jobs), T)  # in memory; not in the file
        if not stuck: await wait_until(lambda: store.failures >= 3, T)
        t0 = time.monotonic()
        await mgr.ashutdown()
        took = time.monotonic() - t0
    finally: locker.release()
    assert took < 1.5 + 6, took  # close_timeout, plus the workers' own shutdown (before: 90 s)
    assert store_threads() == [] and store.writer_pid is None and gone(writer)
    reports = loss_reports(caplog)
    assert len(reports) == 1, [r.getMessage() for r in reports]
    msg = reports[0].getMessage()
    assert str(db) in msg and 'close_timeout=1.5s' in msg and ('BusyError' in msg or 'locked' in msg or stuck), msg
    assert set(store.unwritten) == {j.id for j in jobs} and f"{len(jobs)} job state(s)" in msg
    assert all(j.id[:8] in msg for j in jobs[:10]) and 'and 2 more' in msg
    if not stuck:  # a traceback for the first failure of a series at most, one line for each further one
        failed = [r for r in caplog.records if 'writing' in r.getMessage() and 'failed' in r.getMessage()]
        assert len(failed) >= 3 and sum(r.exc_info is not None for r in failed) <= 1
        assert all(r.exc_info is None and '\n' not in r.getMessage() for r in failed[1:])
    # the file holds what was written before; a new manager in this process starts (the lease is not held)
    m2 = mk(SQLiteJobStore(db))
    assert m2.get_job(first.id).status == 'completed'
    assert all(m2.get_job(j.id) is None or m2.get_job(j.id).status != 'completed' for j in jobs)
    assert (await run_job(m2, 'echo', text='after')).status == 'completed'


# --------------------------------------------------------------------------------------------------------------
# 2. a full disk (a real one: an 8 MB tmpfs, when this runs as root)

@contextlib.contextmanager
def tmpfs(options:str, prefix:str='cjm-full-'):
    "A tmpfs mounted with `options` (needs root and mount; the test is skipped otherwise), unmounted and removed after."
    if os.geteuid() != 0 or not shutil.which('mount'): pytest.skip('a small file system needs root (mount -t tmpfs)')
    d = tempfile.mkdtemp(prefix=prefix)
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', d], capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(d)
        pytest.skip(f'cannot mount a tmpfs here: {r.stderr.strip()}')
    try: yield Path(d)
    finally:
        subprocess.run(['umount', '-l', d])
        shutil.rmtree(d, ignore_errors=True)  # (unmounted: what a store still writing recreated here, if anything)


@pytest.fixture
def small_disk():
    "A tmpfs of 8 MB."
    with tmpfs('size=8m') as d: yield d


def fill(path: Path):
    "Fill the file system holding `path` (a file `path`), as a disk fills up."
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True: os.write(fd, b'x' * 65536)
    except OSError: pass
    try:
        while True: os.write(fd, b'x' * 512)
    except OSError: pass
    finally: os.close(fd)


async def test_a_waiter_added_later_never_releases_an_earlier_waiter_before_its_job_is_written(mk, tmp_path):
    """Race review (2026-12-07): `wait_for_job` promises a finished job only once its final state is written. A waiter
    added for a job that had finished earlier went to the end of the list with its older ticket, and the manager,
    seeing that last entry written, released every waiter, including one whose job's state was still unwritten."""
    db = tmp_path / 'jobs.db'
    store = SQLiteJobStore(db, commit_interval=0.5, busy_timeout=20)
    mgr = mk(store, config=dict(max_workers=2, prefetch=1))
    await mgr.start(wait=True)
    await asyncio.to_thread(store.flush, 5)
    for attempt in range(5):  # (on a loaded machine the lock may come after B's batch is written: then again)
        lock = Locker(db, later=True)  # (started now: on a loaded machine a Python start can outlast the batch's interval)
        a = await mgr.start_job('echo', text='A', sleep=0.8)
        wa = asyncio.ensure_future(mgr.wait_for_job(a.id))  # waits for A from before A ends
        b = await mgr.start_job('echo', text='B')
        await wait_until(lambda: b.status == 'completed', T)  # B's final state waits for the next batch...
        await asyncio.to_thread(lock.lock)  # ...which another process's write lock holds up
        try:
            if store.committed >= b._ticket: continue  # (too late: B's batch was written before the lock came)
            await wait_until(lambda: a.status == 'completed', T)  # A finishes after B: a newer ticket
            wb = asyncio.ensure_future(mgr.wait_for_job(b.id))  # added after A's waiter, with B's older ticket
            await asyncio.sleep(0.05)
            assert not wa.done() and not wb.done() and store.committed < b._ticket < a._ticket
        finally:
            lock.release()
            if not wa.done() and store.committed >= b._ticket and a.status != 'completed': await wa  # (a retry: A ends first)
        await wb
        assert store.committed >= b._ticket
        assert (await wa) is a and store.committed >= a._ticket, (store.committed, a._ticket)
        break
    else: pytest.fail("the lock never came before the batch holding B's end was written (5 tries)")


async def test_a_full_disk_reads_go_on_the_real_cause_is_logged_and_shutdown_is_bounded(mk, small_disk, caplog):
    """Findings 1 and 2 on a real full disk. Reads failed (FullError: opening the reading connection ran
    `PRAGMA optimize`, which writes), the first error logged was "cannot rollback - no transaction is active" (the
    writer's ROLLBACK after SQLite had ended the transaction itself) and shutdown blocked. Now reads go on (the
    reading connection is read-only), the log names the full disk, and shutdown reports what was lost."""
    db = small_disk / 'jobs.db'
    store = SQLiteJobStore(db, retry_interval=0.1, close_timeout=2.0)
    mgr = mk(store, config=dict(prefetch=4))
    before = await run_job(mgr, 'echo', text='before')
    caplog.set_level('WARNING', logger=LOG)
    fill(small_disk / 'filler')
    jobs = [await mgr.start_job('echo', text=f'{i}' + 'y' * 200_000) for i in range(6)]
    await wait_until(lambda: store.failures >= 3, T)
    await wait_until(lambda: all(j.status == 'completed' for j in jobs), T)
    # wait_for_job does not hang on a commit that cannot come while the disk is full: the job is returned as it ended
    # (before, it waited for the disk: for ever with no timeout); the health check below says it is not written
    ended = await asyncio.wait_for(asyncio.gather(*(mgr.wait_for_job(j.id) for j in jobs)), T)
    assert [j.status for j in ended] == ['completed'] * 6 and store.committed < jobs[-1]._ticket
    # reads go on, through a connection opened while the disk is full (each retry closed the old one) ...
    assert mgr.count_jobs() == 7 and mgr.count_jobs('completed') == 7
    assert [j.id for j in mgr.get_all_jobs()] == [before.id] + [j.id for j in jobs]
    assert mgr.get_job(before.id).status == 'completed'
    h = mgr.get_health()  # a health check says the store cannot write, and why; the workers are fine
    assert not h['ok'] and len(h['problems']) == 1 and h['problems'][0].startswith('the job store cannot write'), h
    assert 'full' in h['problems'][0] and h['store']['unsaved'] >= 6 and h['workers']['failed'] == [], h
    other = SQLiteJobStore(db, worker_type=mgr.worker_type)  # ... and from a store of its own
    assert other.count() == 1 and other.get(before.id).result['text'] == 'before'
    other.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and 'full' in errors[0], errors[:2]
    assert not any('cannot rollback' in e for e in errors), errors
    t0 = time.monotonic()
    await mgr.ashutdown()
    assert time.monotonic() - t0 < 2.0 + 6
    assert store_threads() == [] and store.writer_pid is None
    reports = loss_reports(caplog)
    assert len(reports) == 1 and str(db) in reports[0].getMessage() and 'full' in reports[0].getMessage()
    assert set(store.unwritten) == {j.id for j in jobs}
    os.remove(small_disk / 'filler')
    m2 = mk(SQLiteJobStore(db))
    assert [j.id for j in m2.get_all_jobs()] == [before.id]
    assert (await run_job(m2, 'echo', text='after')).status == 'completed'  # the lease left in the file is not held


# --------------------------------------------------------------------------------------------------------------
# 3. bad database files: an error naming the file and the cause; the file left as it was

def _truncated(path: Path):
    import apsw
    c = apsw.Connection(str(path)); c.execute('CREATE TABLE jobs_reference (x)'); c.execute('INSERT INTO jobs_reference VALUES (1)'); c.close()
    with open(path, 'r+b') as f: f.truncate(100)


@pytest.mark.parametrize('kind,cause,words', [
    ('corrupt', 'NotADBError', 'the file is not a SQLite database'),
    ('truncated', 'CorruptError', 'the database file is damaged'),
    ('directory', None, 'the path is a directory')])
async def test_a_bad_database_file_gives_an_error_naming_it(mk, tmp_path, kind, cause, words):
    "Finding 5: NotADBError, CorruptError, CantOpenError... without the file's name. Now a JobStoreError names both."
    import apsw
    db = tmp_path / f'{kind}.db'
    if kind == 'corrupt': db.write_bytes(b'this is not a sqlite database' * 200)
    if kind == 'truncated': _truncated(db)
    if kind == 'directory': db.mkdir()
    content = db.read_bytes() if db.is_file() else None
    mgr = mk(SQLiteJobStore(db), config=dict(shutdown_timeout_seconds=2))
    with pytest.raises(JobStoreError) as e: await mgr.start()
    assert str(db) in str(e.value) and words in str(e.value), str(e.value)
    assert isinstance(e.value.__cause__, apsw.Error) and (cause is None or type(e.value.__cause__).__name__ == cause)
    with pytest.raises(JobStoreError, match=words): mgr.count_jobs()
    await mgr.ashutdown()
    if content is not None: assert db.read_bytes() == content
    wal = tmp_path / f'{kind}.db-wal'  # (SQLite may leave an empty WAL beside a file whose header says WAL)
    assert not wal.exists() or wal.stat().st_size == 0


async def test_a_read_only_database_can_be_read_and_refuses_to_start_naming_the_file(mk, tmp_path):
    "Finding 5, read-only file (chattr +i, which stops root too): reads work; starting says the file is read-only."
    db = tmp_path / 'ro.db'
    m1 = mk(SQLiteJobStore(db))
    job = await run_job(m1, 'echo', text='kept')
    await m1.ashutdown()
    if shutil.which('chattr') is None or subprocess.run(['chattr', '+i', str(db)], capture_output=True).returncode != 0:
        pytest.skip('cannot make the file immutable here (chattr)')
    try:
        content = db.read_bytes()
        mgr = mk(SQLiteJobStore(db), config=dict(shutdown_timeout_seconds=2))
        assert mgr.get_job(job.id).result['text'] == 'kept' and mgr.count_jobs() == 1
        with pytest.raises(JobStoreError, match='read-only') as e: await mgr.start()
        assert str(db) in str(e.value)
        await mgr.ashutdown()
        assert db.read_bytes() == content
    finally: subprocess.run(['chattr', '-i', str(db)])


# --------------------------------------------------------------------------------------------------------------
# 4. folders, parameters, reading without a manager

async def test_every_missing_folder_above_the_file_is_created(mk, tmp_path):
    "Finding 4: the API said 'its folder too', but only one missing level was created."
    db = tmp_path / 'a' / 'b' / 'c' / 'jobs.db'
    mgr = mk(SQLiteJobStore(db))
    assert mgr.count_jobs() == 0 and not (tmp_path / 'a').exists()  # reading creates nothing
    assert (await run_job(mgr, 'echo', text='x')).status == 'completed' and db.is_file()


def test_store_parameters_are_checked_naming_the_parameter(tmp_path, monkeypatch):
    "Findings 1 (table) and 6: accepted before, then a file named 'None', an OverflowError, or every write failing."
    monkeypatch.chdir(tmp_path)
    db = tmp_path / 'x.db'
    for kw, exc, words in [(dict(path=None), TypeError, 'path must be'), (dict(path=''), ValueError, 'path must name'),
                           (dict(busy_timeout='10'), TypeError, 'busy_timeout must be a number'),
                           (dict(busy_timeout=-1), ValueError, 'busy_timeout must be a finite number of seconds >= 0'),
                           (dict(busy_timeout=float('nan')), ValueError, 'busy_timeout'),
                           (dict(busy_timeout=1e9), ValueError, 'busy_timeout'),
                           (dict(table='my"jobs'), ValueError, """table must be a plain identifier (letters, digits and underscores"""),
                           (dict(table='bad name"; drop'), ValueError, 'table must be'), (dict(table='sqlite_x'), ValueError, 'table'),
                           (dict(close_timeout=-1), ValueError, 'close_timeout'), (dict(retry_interval=0), ValueError, 'retry_interval'),
                           (dict(commit_interval='0'), TypeError, 'commit_interval'), (dict(worker_type=3), ValueError, 'worker_type')]:
        kw = {'path': db, **kw}
        with pytest.raises(exc, match=None) as e: SQLiteJobStore(**kw)
        assert words in str(e.value), (kw, str(e.value))
        if 'table' in kw: assert kw['table'] in str(e.value)
    assert os.listdir(tmp_path) == []  # no file named 'None' (or anything else)
    SQLiteJobStore(db, table='my_jobs', busy_timeout=0, close_timeout=0)  # valid edge values


async def test_a_store_is_read_without_its_manager_by_naming_the_worker_type(mk, tmp_path):
    "Finding 7: reading outside a manager raised 'not attached to a manager yet' with no hint of how."
    db = tmp_path / 'jobs.db'
    mgr = mk(SQLiteJobStore(db), worker_type='transcription')
    job = await run_job(mgr, 'echo', text='read me')
    reader = SQLiteJobStore(db, worker_type='transcription')  # while the manager runs, and after
    assert reader.get(job.id).result['text'] == 'read me' and reader.count() == 1 and [j.id for j in reader.list()] == [job.id]
    await mgr.ashutdown()
    assert reader.count('completed') == 1
    reader.close()
    with pytest.raises(RuntimeError) as e: SQLiteJobStore(db).get(job.id)
    assert "worker_type='...'" in str(e.value) and "jobs_transcription (worker_type='transcription')" in str(e.value)
    with pytest.raises(ValueError, match="serves the 'transcription' manager"): StoreJobManager(SQLiteJobStore(db, worker_type='transcription'), worker_type='other')


@pytest.mark.parametrize('how', ['deleted', 'replaced'])
async def test_a_database_file_deleted_or_replaced_while_in_use_makes_the_store_fail_loudly(mk, tmp_path, caplog, how):
    """UAT finding: deleting the file under a running app let the writer go on committing into the unlinked file; the
    health check said ok, shutdown reported nothing unwritten, and after a restart every job was gone. Now the store
    notices before the next batch, writes nothing more (a new, partial file would hide the loss), reports it in the
    health check and the log, keeps the jobs in memory, and shutdown lists what it could not write."""
    db = tmp_path / 'jobs.db'
    store = SQLiteJobStore(db, retry_interval=0.05, close_timeout=1.0)
    mgr = mk(store)
    first = await run_job(mgr, 'echo', text='first')
    caplog.set_level('WARNING', logger=LOG)
    for suffix in ('', '-wal', '-shm'): (tmp_path / f'jobs.db{suffix}').unlink(missing_ok=True)
    if how == 'replaced': shutil.copy(Path(__file__), db)  # another file where the database was
    later = [await mgr.start_job('echo', text=str(i)) for i in range(3)]
    await wait_until(lambda: store.failing, T)
    ended = await asyncio.wait_for(asyncio.gather(*(mgr.wait_for_job(j.id) for j in later)), T)
    assert [j.status for j in ended] == ['completed'] * 3  # the jobs run; their states wait in memory
    h = mgr.get_health()
    assert not h['ok'] and f"was {'deleted' if how == 'deleted' else 'replaced by another file'}" in h['problems'][0], h
    assert mgr.get_job(later[0].id).status == 'completed' and mgr.get_job(first.id).result['text'] == 'first'
    t0 = time.monotonic()
    await mgr.ashutdown()
    assert time.monotonic() - t0 < 1.9  # close_timeout (1 s) once, not twice (the start journal's check waited too)
    assert set(store.unwritten) >= {j.id for j in later}, store.unwritten
    if how == 'deleted': assert not db.exists()  # no new, partial file was made at that path
    else: assert db.read_bytes() == Path(__file__).read_bytes()  # the other file is left as it is
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any('while the job store was using it' in e for e in errors), errors[:3]


def test_taking_over_does_not_wait_for_a_dead_writer_to_be_reaped():
    """Acceptance finding (2026-12-07): a standby manager taking over right after a crash waited for the dead app's
    writer process to *disappear*; but it stays a zombie until whoever adopted it reaps it (the sandbox's init every
    ~2 s; a subreaper that never reaps: `JobStoreLocked` after 10 s). A process that has ended writes nothing more:
    the wait now ends when it ends (a pidfd)."""
    import socket, subprocess, sys, time
    import psutil
    from cjm_workers.stores.sqlite import _wait_for_writer
    # a "writer" that ends 0.5 s from now, as a child of a process that never reaps it
    mid = subprocess.Popen([sys.executable, '-c', "import os, sys, time\n"
                            "pid = os.fork()\n"
                            "if pid == 0: time.sleep(0.5); os._exit(0)\n"
                            "print(pid, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(mid.stdout.readline())
        w = psutil.Process(pid)
        row = {'host': socket.gethostname(), 'pid': 1, 'writer_pid': pid, 'writer_started': w.create_time()}
        t = time.monotonic()
        _wait_for_writer(row, 5)
        took = time.monotonic() - t
        assert 0.3 < took < 2, took
        assert w.status() == psutil.STATUS_ZOMBIE  # ended, not reaped: what the wait used to wait for
    finally:
        mid.kill(); mid.wait()


def test_a_start_journal_that_cannot_create_its_new_file_never_writes_to_its_closed_descriptor():
    """A rotation renames the journal, closes it and creates a new file. When that creation failed (a file system out
    of inodes or space, or no descriptor left), the journal kept the closed descriptor number and wrote its next lines
    to whatever file the app opened next with that number. Now it opens the new file at its next write."""
    from cjm_workers.stores.journal import StartJournal
    other = Path(tempfile.mkdtemp()) / 'other'
    with tmpfs('size=256k,nr_inodes=2', 'cjm-inodes-') as d:
        j = StartJournal(os.path.join(d, 'journal'), rotate_bytes=10)  # the folder and this file: every inode there is
        j.recover()
        j.write([('+', 1, 'a' * 32)])
        j.rotate()  # renamed to .old; the new file cannot be created (no inode left): the next write tries again
        fd = os.open(other, os.O_WRONLY | os.O_CREAT)  # the app opens a file: it gets the number the journal closed
        try: j.write([('+', 1, 'b' * 32)])  # (logged: cannot be written)
        finally: os.close(fd)
        assert other.read_text() == ''
        assert os.path.exists(j.old)  # (its lines are still needed)
        os.remove(j.old)  # an inode free again: the next write creates the new file
        j.write([('+', 1, 'c' * 32)])
        j.close(clean=False)
        assert 'c' * 32 in Path(d, 'journal').read_text()
    shutil.rmtree(other.parent, ignore_errors=True)
