"""Edges of the worker and of the SQLite store's writer process, in real processes (nothing is mocked):

1. a cancel of a job a worker holds queued behind a long one is answered at once by its control thread, and the job
   is skipped without a second answer;
2. a worker whose app is gone (its end of a pipe closed: a SIGKILLed app) exits quietly, without a traceback;
3. the database's -wal and -shm files deleted under a running app: what was committed is checkpointed into the file
   before the writer reconnects (it lived only in the unlinked WAL, lost if the writer process died), and a database
   file moved away is named so."""
import json, multiprocessing as mp, os, queue, random, signal, subprocess, sys, threading, time
from pathlib import Path

import pytest
from cjm_workers.core.channel import PipeChannel
from cjm_workers.stores.sqlite import SQLiteJobStore
from cjm_workers.testing import reference_worker, wait_until
from _a_helpers import wait_gone
from _d_helpers import run_job
from _m_plugins import m_worker

TESTS = Path(__file__).resolve().parent
T = 30


@pytest.fixture
def by_hand():
    "Start a worker (`m_worker` by default) in a spawned process and hand back its channels; stopped (or killed) afterwards."
    made = []
    def start(entry=m_worker, plain=False):
        ctx = mp.get_context('spawn')
        if plain: chans = (ctx.Queue(), ctx.Queue(), ctx.Queue())  # plain queues: no control pipe, cancels in-band
        else: chans = (PipeChannel(ctx, control=True), PipeChannel(ctx), PipeChannel(ctx))
        p = ctx.Process(target=entry, args=chans); p.start()
        made.append((p, chans))
        return (p, *chans)
    yield start
    for p, chans in made:
        if p.is_alive():
            try: chans[0].put({'type': 'stop'})
            except (OSError, ValueError): pass
            p.join(10)
        if p.is_alive(): p.kill(); p.join(10)
        for c in chans:
            try: c.close()
            except OSError: pass


def read_until(res, done, timeout=T):
    "Messages read from `res` until `done(messages)` is true."
    out, end = [], time.monotonic() + timeout
    while not done(out): out.append(res.get(timeout=max(0.01, end - time.monotonic())))
    return out


def results_of(msgs, jid): return [m for m in msgs if m.get('type') == 'result' and m.get('job_id') == jid]


# --------------------------------------------------------------------------------------------------------------
# 1. a cancel of a queued job is answered at once

def test_a_cancel_of_a_job_queued_behind_a_long_one_is_answered_at_once_and_the_job_is_skipped_silently(by_hand):
    """Before: the control thread left a tombstone and the `cancelled` answer came only when the main thread reached the
    job, i.e. after the 30 s job ahead of it. Now the control thread answers within the second; the main thread skips the
    job without a second answer, and serves on."""
    p, req, res, resp = by_hand()
    assert res.get(timeout=60)['type'] == 'ready'
    req.put({'type': 'execute', 'job_id': 'long', 'plugin_name': 'slow', 'seconds': 30})
    req.put({'type': 'execute', 'job_id': 'queued', 'plugin_name': 'echo', 'text': 'never'})
    assert res.get(timeout=10) == {'type': 'started', 'job_id': 'long', 'pid': p.pid}
    t0 = time.monotonic()
    req.control.put({'type': 'cancel', 'job_id': 'queued'})
    try: answer = res.get(timeout=1.0)
    except queue.Empty: pytest.fail("no answer to the cancel of the queued job within 1 s (the job ahead of it still runs)")
    took = time.monotonic() - t0
    assert answer == {'type': 'result', 'job_id': 'queued', 'status': 'cancelled', 'data': None, 'error': None,
                      'traceback': None, 'started': False}, answer
    assert p.is_alive() and took < 1.0
    req.control.put({'type': 'cancel', 'job_id': 'queued'})  # asked twice (the manager never does): answered once
    req.control.put({'type': 'cancel', 'job_id': 'long'})  # the long job ends now; the worker then reaches 'queued'
    req.put({'type': 'execute', 'job_id': 'next', 'plugin_name': 'echo', 'text': 'served'})
    msgs = read_until(res, lambda ms: results_of(ms, 'next'))
    assert [m['status'] for m in results_of(msgs, 'long')] == ['cancelled']
    assert not [m for m in msgs if m.get('job_id') == 'queued'], "a second message for the cancelled job"
    assert [(m['type'], m['job_id']) for m in msgs] == [('result', 'long'), ('started', 'next'), ('result', 'next')]
    assert results_of(msgs, 'next')[0]['data']['text'] == 'served'
    req.put({'type': 'get_state', 'request_id': 1})
    assert resp.get(timeout=10)['data']['jobs_done'] == 2  # 'long' and 'next': the skipped job never ran


def test_a_cancel_naming_a_run_that_has_ended_does_not_skip_or_stop_the_jobs_retry(by_hand):
    """Race review (2026-12-07): a timeout's cancel that met the run's own failure left a tombstone for the job id; the
    manager retried the job on the same worker, which skipped the retry without a word (the job stayed `pending` for
    good), or stopped it if it had started. A cancel now names its run (`attempt`): only that run is skipped, and its
    answer names the run too, so the manager can ignore it."""
    p, req, res, resp = by_hand()
    assert res.get(timeout=60)['type'] == 'ready'
    req.put({'type': 'execute', 'job_id': 'j', 'plugin_name': 'echo', 'text': 'first'})
    req.put({'type': 'execute', 'job_id': 'spacer', 'plugin_name': 'echo', 'text': 'x'})  # (a cancel of the job whose
    msgs = read_until(res, lambda ms: results_of(ms, 'spacer'))  # result was just written is left to that result)
    assert results_of(msgs, 'j')[0]['status'] == 'success'
    req.control.put({'type': 'cancel', 'job_id': 'j', 'attempt': 1})  # late: run 1 has ended
    answer = res.get(timeout=10)
    assert answer == {'type': 'result', 'job_id': 'j', 'status': 'cancelled', 'data': None, 'error': None,
                      'traceback': None, 'started': False, 'attempt': 1}, answer
    req.put({'type': 'execute', 'job_id': 'j', 'plugin_name': 'echo', 'text': 'retry', '_cjm_attempt': 2})
    msgs = read_until(res, lambda ms: results_of(ms, 'j'))
    assert [(m['type'], m.get('status')) for m in msgs] == [('started', None), ('result', 'success')], msgs
    assert results_of(msgs, 'j')[0]['data']['text'] == 'retry'
    # a late cancel of run 1 while run 2 runs leaves run 2 alone; a cancel of run 2 (or of any run) stops it
    req.put({'type': 'execute', 'job_id': 'k', 'plugin_name': 'slow', 'seconds': 30, '_cjm_attempt': 2})
    assert res.get(timeout=10) == {'type': 'started', 'job_id': 'k', 'pid': p.pid}
    req.control.put({'type': 'cancel', 'job_id': 'k', 'attempt': 1})
    assert res.get(timeout=10)['attempt'] == 1  # answered as a run that is not running here
    with pytest.raises(queue.Empty): res.get(timeout=0.5)  # and run 2 runs on
    req.control.put({'type': 'cancel', 'job_id': 'k', 'attempt': 2})
    msgs = read_until(res, lambda ms: results_of(ms, 'k'))
    assert [m['status'] for m in results_of(msgs, 'k')] == ['cancelled']


def test_an_in_band_cancel_on_plain_queues_is_answered_once(by_hand):
    "Plain `multiprocessing.Queue`s (no control pipe): the main thread handles the cancel itself, with the same code."
    p, req, res, resp = by_hand(reference_worker, plain=True)
    assert res.get(timeout=60)['type'] == 'ready'
    req.put({'type': 'cancel', 'job_id': 'q'})  # in-band cancels reach jobs that come after them
    req.put({'type': 'execute', 'job_id': 'q', 'plugin_name': 'echo', 'text': 'never'})
    req.put({'type': 'execute', 'job_id': 'e', 'plugin_name': 'echo', 'text': 'after'})
    msgs = read_until(res, lambda ms: results_of(ms, 'e'))
    assert [m for m in msgs if m.get('job_id') == 'q'] == [
        {'type': 'result', 'job_id': 'q', 'status': 'cancelled', 'data': None, 'error': None, 'traceback': None, 'started': False}]
    assert results_of(msgs, 'e')[0]['status'] == 'success'


def test_cancels_racing_quick_jobs_get_one_verdict_each_never_both_never_neither(by_hand):
    """Hundreds of quick jobs, half of them cancelled on the control pipe while the worker takes them: a job is either
    run (its `started`, then its result) or skipped (a `cancelled`, `started: False` answer and nothing else). A cancel
    that arrives after a job's result may be answered too (the manager, which has the result, ignores it), never before it."""
    p, req, res, resp = by_hand()
    assert res.get(timeout=60)['type'] == 'ready'
    ids = [f"j{i}" for i in range(400)]
    cancelled = set(ids[1::2])
    def cancel():
        for jid in random.Random(7).sample(sorted(cancelled), len(cancelled)):
            req.control.put({'type': 'cancel', 'job_id': jid})
            time.sleep(random.random() * 0.0005)
    t = threading.Thread(target=cancel); t.start()
    for jid in ids: req.put({'type': 'execute', 'job_id': jid, 'plugin_name': 'echo', 'text': jid})
    t.join()
    req.put({'type': 'execute', 'job_id': 'last', 'plugin_name': 'echo', 'text': 'last'})
    msgs = read_until(res, lambda ms: results_of(ms, 'last'))
    time.sleep(0.3)
    res_left = []
    while True:
        try: res_left.append(res.get(timeout=0.2))
        except queue.Empty: break
    msgs += res_left
    skipped = ran = 0
    for jid in ids:
        mine = [m for m in msgs if m.get('job_id') == jid]
        assert mine, f"{jid}: no answer at all"
        first = mine[0]
        if first['type'] == 'started':
            ran += 1
            assert mine[1]['type'] == 'result' and mine[1].get('started', True), (jid, mine)
            assert all(m['type'] == 'result' and m['started'] is False for m in mine[2:]), (jid, mine)  # late, after its result
            if jid not in cancelled: assert len(mine) == 2 and mine[1]['status'] == 'success', (jid, mine)
        else:
            skipped += 1
            assert jid in cancelled and mine == [{'type': 'result', 'job_id': jid, 'status': 'cancelled', 'data': None,
                                                  'error': None, 'traceback': None, 'started': False}], (jid, mine)
    assert ran + skipped == len(ids) and skipped > 0, (ran, skipped)
    print(f"{skipped} of {len(cancelled)} cancelled jobs skipped, the others had run or started")


# --------------------------------------------------------------------------------------------------------------
# 2. a worker whose app is gone exits quietly

def _hold_result(req, res, resp):
    "The app's end of the results pipe closes while a job runs: its result cannot be sent."
    req.put({'type': 'execute', 'job_id': 's', 'plugin_name': 'slow', 'seconds': 0.5})
    assert res.get(timeout=10)['type'] == 'started'
    req.put({'type': 'execute', 'job_id': 'e', 'plugin_name': 'echo', 'text': 'x'})
    res.close()

def _started(req, res, resp):
    "Closed before a job: its 'started' cannot be sent."
    res.close()
    req.put({'type': 'execute', 'job_id': 'e', 'plugin_name': 'echo', 'text': 'x'})

def _progress(req, res, resp):
    "Closed while a job reports progress (a 5 s job: the worker asks it to stop and leaves at once)."
    req.put({'type': 'execute', 'job_id': 't', 'plugin_name': 'transcribe', 'steps': 100, 'delay': 0.05})
    assert res.get(timeout=10)['type'] == 'started'
    res.close()

def _cancel_answer(req, res, resp):
    "Closed while a 30 s job runs; the control thread's answer to a cancel of a queued job cannot be sent."
    req.put({'type': 'execute', 'job_id': 's', 'plugin_name': 'slow', 'seconds': 30})
    req.put({'type': 'execute', 'job_id': 'q', 'plugin_name': 'echo', 'text': 'x'})
    assert res.get(timeout=10)['type'] == 'started'
    res.close()
    req.control.put({'type': 'cancel', 'job_id': 'q'})

def _reply(req, res, resp):
    "The responses pipe closed: a command's reply cannot be sent."
    resp.close()
    req.put({'type': 'get_state', 'request_id': 1})


@pytest.mark.parametrize('how', [_hold_result, _started, _progress, _cancel_answer, _reply],
                         ids=['result', 'started', 'progress', 'cancel-answer', 'command-reply'])
def test_a_worker_whose_app_is_gone_exits_quietly(by_hand, capfd, monkeypatch, how):
    """The app's end of a pipe closes (as when the app is SIGKILLed) while the worker has something to send. Before: a
    `Process cjm-worker-...: Traceback ... _put_many ... BrokenPipeError` on the app's stderr and exit code 1 (or a
    30 s job run to its end). Now: one info line, exit code 0, within seconds. (Here the app is alive, so the worker's
    watchdog does not end it first: every write path is reached.)"""
    monkeypatch.setenv('CJM_WORKERS_LOG_LEVEL', '20')  # the worker logs at INFO to its stderr
    p, req, res, resp = by_hand()
    assert res.get(timeout=60)['type'] == 'ready'
    t0 = time.monotonic()
    how(req, res, resp)
    p.join(10)
    took, err = time.monotonic() - t0, capfd.readouterr().err
    assert p.exitcode == 0, (p.exitcode, err[-3000:])
    assert 'Traceback' not in err and not [l for l in err.splitlines() if l.startswith('BrokenPipeError')], err[-3000:]
    assert err.count('the app is gone') == 1, err[-3000:]
    assert took < 5, took


def _tracebacks(err:str)->list:
    "Each traceback in `err`: its lines up to and including the exception line."
    out = []
    for block in err.split('Traceback (most recent call last):')[1:]:
        lines = []
        for line in block.splitlines()[1:]:
            lines.append(line)
            if line and not line.startswith(' '): break  # the exception line
        out.append('\n'.join(lines))
    return out


def test_workers_of_a_sigkilled_busy_app_leave_without_a_traceback():
    """An app keeps three workers busy with short jobs and is SIGKILLed at a random moment, 15 times. Before: in most
    runs a worker wrote `started` or a held result before its watchdog ended it, and the app's stderr (which the
    workers share) got `Process cjm-worker-...: Traceback ... _put_many ... BrokenPipeError` (13 runs in 15 when this
    test was written). Now no worker traceback. The one traceback that may remain is multiprocessing's own, in a
    worker being spawned as the app died (`spawn.py ... EOFError: Ran out of input`, before any code of ours runs)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get('PYTHONPATH')])))
    env.pop('CJM_WORKERS_LOG_LEVEL', None)
    rng, bad, spawn_eof = random.Random(2026), [], 0
    for run in range(15):
        app = subprocess.Popen([sys.executable, '-c', 'import asyncio, _m_plugins; asyncio.run(_m_plugins.busy_app())'],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(TESTS.parent))
        try:
            line = app.stdout.readline()
            if line.strip() != 'up':
                app.kill()
                pytest.fail(f"run {run}: the app did not start: {line!r}\n{app.communicate(timeout=T)[1][-3000:]}")
            time.sleep(rng.uniform(0.05, 1.0))
            os.kill(app.pid, signal.SIGKILL)
            _, err = app.communicate(timeout=60)  # until every process sharing its stderr (the workers) has ended
        finally:
            if app.poll() is None: app.kill(); app.wait(10)
        for tb in _tracebacks(err):
            if 'multiprocessing/spawn.py' in tb and 'cjm_workers' not in tb: spawn_eof += 1  # not ours to prevent
            else: bad.append(f"run {run}:\n{tb}")
        if 'BrokenPipeError' in err or '_put_many' in err: bad.append(f"run {run}: {err[-2000:]}")
    assert not bad, f"{len(bad)} worker tracebacks, e.g.:\n{bad[0]}"
    print(f"15 SIGKILLs: no worker traceback ({spawn_eof} from multiprocessing's spawn of a worker as its app died)")


# --------------------------------------------------------------------------------------------------------------
# 3. the database's -wal and -shm files deleted (or the database moved) under a running app

_READ = ("import json, sqlite3, sys\n"
         "try: rows = dict(sqlite3.connect(sys.argv[1]).execute('SELECT id, status FROM jobs_reference'))\n"
         "except sqlite3.Error as e: rows = {'<error>': str(e)}\n"
         "print(json.dumps(rows))")

def on_disk(db)->dict:
    "Job id → status, as a new process finds the file now (what an app killed now, writer and all, would leave)."
    out = subprocess.run([sys.executable, '-c', _READ, str(db)], capture_output=True, text=True, timeout=T)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize('files', [('-wal', '-shm'), ('-wal',), ('-shm',)], ids=['wal+shm', 'wal', 'shm'])
async def test_the_wal_deleted_under_a_running_app_loses_nothing(mk, tmp_path, caplog, files):
    """UAT finding: deleting jobs.db-wal and jobs.db-shm under a running app went unnoticed: the writer process went on
    committing into the unlinked WAL, where the jobs committed since the last checkpoint (here: all of them) lived
    only as long as that process; once it was killed (kill -9 of the process group, docker kill) they were gone.
    Now the writer notices before its next batch, checkpoints what was committed into the file, fails that batch
    saying so, and the store's retry goes on with a new writer process and new -wal/-shm files."""
    db = tmp_path / 'jobs.db'
    store = SQLiteJobStore(db, retry_interval=0.05)
    mgr = mk(store)
    before = [await run_job(mgr, 'echo', text=f"before {i}") for i in range(20)]  # returned once committed
    old_writer = store.writer_pid
    caplog.set_level('ERROR', logger='cjm_workers.stores')
    for s in files:
        (tmp_path / f"jobs.db{s}").unlink()  # (a clean-up script, an `rm jobs.db-*` with the app running)
    after = [await run_job(mgr, 'echo', text=f"after {i}") for i in range(20)]
    assert [j.status for j in before + after] == ['completed'] * 40
    failures, failed, writer = store.failures, store.stats['failed'], store.writer_pid
    # the file as it is if the writer process dies now: every job is there
    os.kill(writer, signal.SIGKILL)
    assert not wait_gone([writer], 10)
    assert on_disk(db) == {j.id: 'completed' for j in before + after}
    # noticed once, said so, and went on with a new writer process
    noticed = [r.getMessage() for r in caplog.records if 'WalFileLostError' in r.getMessage()]
    assert len(noticed) == 1, noticed
    what = ' and '.join(files) + (' files were' if len(files) > 1 else ' file was')
    assert f"the database's {what} deleted while in use; what was committed is saved into jobs.db (checkpoint); " \
           f"the store reconnects" in noticed[0], noticed[0]
    assert (failures, failed, store.failing) == (0, 1, False) and writer != old_writer
    await mgr.ashutdown()
    back = SQLiteJobStore(db, worker_type='reference')
    assert {j.id: j.status for j in back.list()} == {j.id: 'completed' for j in before + after}
    assert back.get(before[0].id).result['text'] == 'before 0' and back.get(after[-1].id).result['text'] == 'after 19'
    back.close()


async def test_a_database_file_moved_away_is_named_so(mk, tmp_path):
    "A `mv jobs.db elsewhere.db` under a running app was reported as 'deleted'."
    db = tmp_path / 'jobs.db'
    store = SQLiteJobStore(db, retry_interval=0.05, close_timeout=1.0)
    mgr = mk(store)
    await run_job(mgr, 'echo', text='first')
    os.rename(db, tmp_path / 'elsewhere.db')
    await mgr.start_job('echo', text='second')
    await wait_until(lambda: store.failing, T)
    problem = mgr.get_health()['problems'][0]
    assert f"the database file {db} was deleted or moved away while the job store was using it" in problem, problem


# --------------------------------------------------------------------------------------------------------------
# 4. what a plugin started ends with its worker, with no manager to kill the worker's process group

def _child_of(req, res, jid):
    "Start a `slow` job that spawns a `sleep` child; the child's pid (from the job's progress message)."
    req.put({'type': 'execute', 'job_id': jid, 'plugin_name': 'slow', 'seconds': 60, 'spawn_child': True})
    msgs = read_until(res, lambda ms: any(m.get('type') == 'progress' for m in ms))
    return int(next(m for m in msgs if m.get('type') == 'progress')['message'].split(':')[1])


@pytest.mark.parametrize('how', ['stop', 'sigkill'])
def test_a_plugins_child_ends_with_its_worker_without_a_manager(by_hand, how):
    """Acceptance finding (Ray): the worker leads its own process group, so Ray's cleanup of an actor's group missed
    what plugins started; only the local manager's group kill ended it. Now a worker that stops kills its descendants,
    and the backstop of a worker that died kills the rest of its group."""
    p, req, res, resp = by_hand(reference_worker)
    assert res.get(timeout=60)['type'] == 'ready'
    child = _child_of(req, res, 'j')
    assert wait_gone([child], 0) == [child]  # it runs
    if how == 'stop':
        req.control.put({'type': 'stop', 'cancel': True})  # cancel the job and stop, as a manager's shutdown does
        req.put({'type': 'stop'})
        p.join(T)
        assert p.exitcode == 0, p.exitcode
    else:
        os.kill(p.pid, signal.SIGKILL)
        p.join(T)
    assert not wait_gone([child], 5), f"the plugin's child {child} outlived its worker ({how})"

