"""Workers as Ray actors (`cjm_workers.backends.ray`) against a real local Ray cluster.

These drive `RayActorProcess` through the same channels and messages the job manager uses; the worker inside the
actor is the reference worker of `cjm_workers.testing`, unchanged.
"""
import os, select, subprocess, sys, time
import psutil, pytest

ray = pytest.importorskip('ray', reason='the Ray extra is not installed (pip install -e ".[ray]")')

from cjm_workers.backends.ray import RayActorProcess  # noqa: E402
from cjm_workers.core.channel import PipeChannel  # noqa: E402
from cjm_workers.testing import failing_factory_worker, reference_worker  # noqa: E402

pytestmark = pytest.mark.xdist_group('ray')  # under pytest-xdist, the process that runs every Ray test (one cluster)


@pytest.fixture
def cluster(ray_cluster):
    "The session's local Ray cluster (tests/conftest.py)."
    return ray_cluster


class Worker:
    "A RayActorProcess with the manager's side of its channels."
    def __init__(self, target=reference_worker, **kw):
        self.req, self.res, self.resp = PipeChannel(control=True), PipeChannel(), PipeChannel()
        self.p = RayActorProcess(target, (self.req, self.res, self.resp), name='test', **kw)
        self.p.start()
        self.req.close_reader(); self.res.close_writer(); self.resp.close_writer()

    def get(self, timeout=60): return self.res.get(timeout=timeout)

    def until(self, kind, timeout=60):
        "Messages up to and including the first of type `kind`."
        out = []
        while not out or out[-1].get('type') != kind: out.append(self.get(timeout))
        return out

    def ended(self, timeout=30): return bool(select.select([self.p.sentinel], [], [], timeout)[0])


def test_jobs_progress_and_streams_run_in_the_actor(cluster):
    w = Worker()
    ready = w.get()
    assert ready['type'] == 'ready' and ready['pid'] != os.getpid() and w.p.is_alive()
    w.req.put({'type': 'execute', 'job_id': 'a', 'plugin_name': 'echo', 'text': 'hi'})
    msgs = w.until('result')
    assert [m['type'] for m in msgs] == ['started', 'result'] and msgs[-1]['data']['text'] == 'hi'
    assert msgs[-1]['data']['metadata']['pid'] == ready['pid']  # it ran in the worker process …
    assert w.p.local and psutil.Process(ready['pid']).ppid() == w.p.actor_pid  # … which the actor started
    w.req.put({'type': 'execute', 'job_id': 'b', 'plugin_name': 'transcribe', 'steps': 3, 'delay': 0.01})
    msgs = w.until('result')
    assert [m['progress'] for m in msgs if m['type'] == 'progress'] == [1 / 3, 2 / 3, 1.0]
    w.req.put({'type': 'execute', 'job_id': 'c', 'plugin_name': 'tokens', 'text': 'x y z', 'delay': 0})
    msgs = w.until('result')
    assert [m['chunk'] for m in msgs if m['type'] == 'stream_chunk'] == ['x ', 'y ', 'z']
    assert msgs[-1]['data']['text'] == 'x y z'
    w.p.kill_tree()


def test_cooperative_cancel_then_kill_of_the_whole_tree(cluster):
    w = Worker()
    w.get()
    w.req.put({'type': 'execute', 'job_id': 'a', 'plugin_name': 'slow', 'seconds': 60})
    assert w.get()['type'] == 'started'
    w.req.control.put({'type': 'cancel', 'job_id': 'a'})  # overtakes the queue, reaches the running job
    assert w.until('result')[-1]['status'] == 'cancelled'
    w.req.put({'type': 'execute', 'job_id': 'b', 'plugin_name': 'slow', 'seconds': 60, 'ignore_cancel': True,
               'spawn_child': True})
    child = int([m for m in w.until('progress') if m['type'] == 'progress'][-1]['message'].split(':')[1])
    assert psutil.pid_exists(child)
    w.p.kill_tree()  # hard cancel: the plugin ignores cancels
    assert w.ended(5) and w.p.exitcode == -9 and w.p.death_reason is None and not w.p.is_alive()
    psutil.wait_procs([psutil.Process(child)], timeout=5) if psutil.pid_exists(child) else None
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(EOFError):  # the manager sees end-of-file on the results channel
        while True: w.get(5)


def test_actor_crash_ends_the_worker_with_a_reason(cluster):
    w = Worker()
    w.get()
    w.req.put({'type': 'execute', 'job_id': 'a', 'plugin_name': 'crash', 'mode': 'segfault'})
    assert w.ended(30)
    assert w.get()['type'] == 'started'  # relayed before the crash: it was in the pipe
    with pytest.raises(EOFError):  # no result: the results channel just ends
        w.get(5)
    assert w.p.exitcode == -11 and w.p.death_reason is None, (w.p.exitcode, w.p.death_reason)  # the real SIGSEGV


def test_actor_death_ends_the_worker_too(cluster):
    "The actor itself dies (here `ray.kill` from outside, as when a node is lost): the worker goes with it."
    w = Worker()
    pid = w.get()['pid']
    w.req.put({'type': 'execute', 'job_id': 'a', 'plugin_name': 'slow', 'seconds': 60})
    assert w.get()['type'] == 'started'
    ray.kill(w.p.actor)
    assert w.ended(30)
    assert w.p.exitcode == -9 and 'with its Ray actor, which died' in w.p.death_reason and w.p.start_may_be_lost, w.p.death_reason
    assert '\x1b' not in w.p.death_reason and 'repr=<' not in w.p.death_reason  # no terminal colours, no object repr
    assert 'The actor is dead because it was killed by `ray.kill`.' in w.p.death_reason, w.p.death_reason  # and Ray's why
    if psutil.pid_exists(pid): psutil.wait_procs([psutil.Process(pid)], timeout=10)  # its parent watchdog ends it
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_stop_and_factory_failure_end_with_exit_codes(cluster):
    w = Worker()
    w.get()
    w.req.close_writer()  # the manager goes away: the worker reads end-of-file and stops
    assert w.ended(30) and w.p.exitcode == 0 and w.p.death_reason is None
    f = Worker(target=failing_factory_worker)
    err = f.get()
    assert err['type'] == 'error' and 'model weights not found' in err['error']
    assert f.ended(30) and f.p.exitcode == 3 and f.p.death_reason is None


# ---------------------------------------------------------------- the job manager with workers as Ray actors
# The same behaviour tests run on both backends: local processes and Ray actors.

from cjm_workers.backends.ray import RayBackend  # noqa: E402
from cjm_workers.core.config import RestartPolicy, WorkerConfig  # noqa: E402
from cjm_workers.testing import RecordingBroadcaster, ReferenceJobManager, wait_until  # noqa: E402


def manager(track, backend, **config):
    events = RecordingBroadcaster()
    m = track(ReferenceJobManager(worker_config=WorkerConfig(backend=backend, **config), event_broadcaster=events))
    return m, events


@pytest.mark.backends('local', 'ray')
async def test_jobs_events_progress_and_streams(track, backend):
    m, events = manager(track, backend)
    await m.start(wait=True)
    e = await m.wait_for_job((await m.start_job('echo', text='hi')).id, timeout=60)
    t = await m.wait_for_job((await m.start_job('transcribe', steps=3, delay=0.01)).id, timeout=60)
    s = await m.wait_for_job((await m.start_job('tokens', text='a b c', delay=0)).id, timeout=60)
    f = await m.wait_for_job((await m.start_job('echo', fail='bad input')).id, timeout=60)
    await m.flush_events()
    assert (e.status, e.result['text']) == ('completed', 'hi') and e.worker_pid != os.getpid()
    assert events.of(t.id) == ['pending', 'started', 'progress', 'progress', 'progress', 'completed']
    assert s.output == 'a b c' and [d['chunk'] for k, d in events.events if k.endswith(':chunk')] == ['a ', 'b ', 'c']
    assert f.status == 'failed' and f.error == 'ValueError: bad input' and 'raise ValueError(fail)' in f.traceback
    stats = m.get_worker_stats()
    assert stats[0]['pid'] == e.worker_pid


@pytest.mark.backends('local', 'ray')
async def test_cooperative_then_hard_cancel_and_restart(track, backend):
    m, events = manager(track, backend, cancel_grace_seconds=0.5)
    await m.start(wait=True)
    job = await m.start_job('transcribe', steps=500, delay=0.01)
    await wait_until(lambda: (m.get_job(job.id).progress or 0) > 0, timeout=60)
    pid = m.get_job(job.id).worker_pid
    await m.cancel_job(job.id)
    assert (await m.wait_for_job(job.id, timeout=30)).status == 'cancelled'
    job = await m.start_job('slow', seconds=120, ignore_cancel=True, spawn_child=True)
    await wait_until(lambda: (m.get_job(job.id).progress_message or '').startswith('child:'), timeout=60)
    assert m.get_job(job.id).worker_pid == pid  # the cooperative cancel left the worker (and its model) alone
    child = int(m.get_job(job.id).progress_message.split(':')[1])
    await m.cancel_job(job.id)
    job = await m.wait_for_job(job.id, timeout=30)
    assert job.status == 'cancelled' and 'ignored the cooperative cancel' in job.reason
    if psutil.pid_exists(child): psutil.wait_procs([psutil.Process(child)], timeout=5)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    again = await m.wait_for_job((await m.start_job('echo', text='back')).id, timeout=60)
    assert again.status == 'completed' and again.worker_pid != pid  # ON_CANCELLATION: a fresh worker


@pytest.mark.backends('local', 'ray')
async def test_crash_fails_the_job_and_always_restarts(track, backend):
    m, events = manager(track, backend, restart_policy=RestartPolicy.ALWAYS)
    await m.start(wait=True)
    job = await m.wait_for_job((await m.start_job('crash', mode='segfault')).id, timeout=60)
    assert job.status == 'failed' and job.error.startswith('WorkerDied') and 'SIGSEGV' in job.error, job.error
    again = await m.wait_for_job((await m.start_job('echo', text='x')).id, timeout=60)
    assert again.status == 'completed' and again.worker_pid != job.worker_pid
    await m.flush_events()
    assert [k.split(':')[1] for k, d in events.events if k.split(':')[1].startswith('worker_')][:3] == \
        ['worker_started', 'worker_stopped', 'worker_restarting']


async def test_ray_resource_requests_and_an_unschedulable_worker(track, cluster):
    ok, _ = manager(track, RayBackend(num_cpus=0.5, resources={'cjm_test_slot': 1}))
    done = await ok.wait_for_job((await ok.start_job('echo', text='placed')).id, timeout=60)
    assert done.status == 'completed'
    bad, _ = manager(track, RayBackend(resources={'no_such_resource': 1}), worker_start_timeout_seconds=2)
    job = await bad.wait_for_job((await bad.start_job('echo', text='never')).id, timeout=60)
    assert job.status == 'failed' and 'did not become ready within 2' in job.error, job.error
    # it says what Ray could not find, not that a worker "was killed by SIGKILL": no worker ever ran
    assert "Ray found no node with {'CPU': 1, 'no_such_resource': 1} free" in job.error and 'SIGKILL' not in job.error, job.error


@pytest.mark.backends('local', 'ray')
async def test_worker_env_reaches_the_worker(mk, backend):
    "`WorkerConfig.worker_env` (and the app's log level) reach the worker on every backend."
    m = mk(config=dict(backend=backend, worker_env=WorkerConfig.gpu_env(['3'])))
    job = await m.wait_for_job((await m.start_job('env', names=['CUDA_VISIBLE_DEVICES', 'CJM_WORKERS_LOG_LEVEL'])).id, timeout=60)
    assert job.status == 'completed', job.error
    import logging
    assert job.result['metadata']['env'] == {'CUDA_VISIBLE_DEVICES': '3',
                                             'CJM_WORKERS_LOG_LEVEL': str(logging.getLogger().getEffectiveLevel())}


@pytest.mark.backends('local', 'ray')
async def test_commands_timeouts_and_the_sqlite_store(track, backend, tmp_path):
    from cjm_workers.stores.sqlite import SQLiteJobStore
    db = str(tmp_path / 'jobs.db')
    events = RecordingBroadcaster()
    m = track(ReferenceJobManager(worker_config=WorkerConfig(backend=backend, cancel_grace_seconds=0.5),
                                  event_broadcaster=events, job_store=SQLiteJobStore(db)))
    await m.start(wait=True)
    first = await m.wait_for_job((await m.start_job('echo', text='a')).id, timeout=60)
    assert first.result['metadata']['config'] == {'prefix': ''}
    assert await m.reload_plugin('echo', {'prefix': '> '})  # a command and its reply travel through the actor too
    second = await m.wait_for_job((await m.start_job('echo', text='b')).id, timeout=60)
    assert second.result['text'] == '> b'
    slow = await m.wait_for_job((await m.start_job('slow', seconds=60, timeout_seconds=0.3)).id, timeout=60)
    assert slow.status == 'failed' and slow.reason == 'timeout'
    await m.ashutdown()
    again = track(ReferenceJobManager(worker_config=WorkerConfig(backend=backend), job_store=SQLiteJobStore(db)))
    assert {j.id: j.status for j in again.get_all_jobs()} == {first.id: 'completed', second.id: 'completed',
                                                               slow.id: 'failed'}


def test_live_job_pages_on_ray_actors(cluster):
    "The demo app (SSE broadcaster, job routes) with its workers as Ray actors: a streamed job's page and events."
    import json
    from starlette.testclient import TestClient
    from cjm_workers.demo import create_demo_app
    app = create_demo_app(worker_config=WorkerConfig(backend='ray', prefetch=1))
    mgr, bc = app.state.manager, app.state.broadcaster
    with TestClient(app) as cli:
        sub = bc.subscribe(last_event_id=bc.last_id)
        r = cli.post('/jobs/start', data={'plugin_id': 'tokens', 'params': json.dumps({'text': 'on ray', 'delay': 0})},
                     follow_redirects=False)
        jid = r.headers['location'].rsplit('/', 1)[1]
        job = cli.portal.call(mgr.wait_for_job, jid, 60)
        cli.portal.call(mgr.flush_events)
        assert job.status == 'completed' and job.worker_pid != os.getpid()
        page = cli.get(f'/jobs/{jid}').text
        assert 'on ray' in page and 'completed' in page
        kinds = [e.type.split(':')[1] for e in sub.take() if e.data.get('job_id') == jid]
        assert kinds == ['pending', 'started', 'chunk', 'chunk', 'completed'], kinds
        bc.close()


async def test_restarting_actors_leaks_no_fds_or_threads(track, cluster):
    "Worker deaths and restarts on Ray: the manager process ends with the fds and threads it had."
    import gc
    from conftest import resource_counts
    m, _ = manager(track, 'ray', restart_policy=RestartPolicy.ALWAYS, restart_backoff_base_seconds=0.0,
                   max_restart_attempts=100)
    await m.start(wait=True)
    await m.wait_for_job((await m.start_job('crash', mode='exit')).id, timeout=60)  # warm-up: lazily made objects
    await m.wait_until_ready(60)
    gc.collect(); before = resource_counts()
    for _ in range(5):  # each leaked descriptor would show: 5 restarts, 5 more fds
        job = await m.wait_for_job((await m.start_job('crash', mode='exit')).id, timeout=60)
        assert job.status == 'failed' and 'exited with code 3' in job.error, job.error
        assert await m.wait_until_ready(60)
    gc.collect(); after = resource_counts()
    assert after == before, (before, after)


async def test_an_entry_point_the_actors_cannot_import_fails_naming_the_missing_module(track, cluster, tmp_path):
    """UAT finding: the job's error carried Ray's coloured repr of the actor and "the worker's own output on stderr
    says why", while the cause (`No module named ...`) was only in Ray's log stream. Now the error names it."""
    import importlib, sys
    (tmp_path / 'cjm_only_here.py').write_text("from cjm_workers.testing import reference_worker\n"
                                               "def entry(requests, results, responses): reference_worker(requests, results, responses)\n")
    sys.path.insert(0, str(tmp_path))  # importable in the app only: the actors' path does not have it
    try: entry = importlib.import_module('cjm_only_here').entry  # pickled by reference: the actor imports the module
    finally: sys.path.remove(str(tmp_path))
    m = track(ReferenceJobManager(worker_config=WorkerConfig(backend='ray'), entry_point=entry))
    job = await m.wait_for_job((await m.start_job('echo', text='x')).id, timeout=60)
    assert job.status == 'failed' and "No module named 'cjm_only_here'" in job.error, job.error
    assert '\x1b' not in job.error and 'output on stderr' not in job.error, job.error


from dataclasses import dataclass  # noqa: E402
import asyncio, threading  # noqa: E402


@dataclass
class GatedBackend(RayBackend):
    "A Ray backend whose actor creation waits for `gate`: what an unreachable cluster does to `ray.init` and actor creation."
    gate: threading.Event = None
    def prepare(self):
        super().prepare()
        self.gate.wait()


async def test_a_worker_start_that_ray_holds_up_blocks_neither_the_event_loop_nor_the_manager(track, cluster):
    """UAT finding: after `ray stop` the restart of a worker blocked in Ray's actor creation for a minute while holding
    the manager's lock, so the event loop froze in `get_worker_stats()` and `/health` timed out. Now the actor is
    created in a thread of its own: the manager answers, a job queued meanwhile runs once Ray answers, and a
    shutdown while Ray still holds the creation up finishes at once and leaves no actor behind."""
    gate = threading.Event(); gate.set()
    m, _ = manager(track, GatedBackend(gate=gate), restart_policy=RestartPolicy.ALWAYS, restart_backoff_base_seconds=0.0)
    await m.start(wait=True)
    gate.clear()  # from now on, creating an actor hangs
    crashed = await m.wait_for_job((await m.start_job('crash', mode='sigkill')).id, timeout=60)
    assert crashed.status == 'failed'
    queued = await m.start_job('echo', text='after')
    await wait_until(lambda: m.get_worker_stats()[0]['status'] == 'starting', 30)  # the restart hangs in Ray …
    h = await asyncio.wait_for(asyncio.to_thread(m.get_health), 10)  # … and the manager's lock is free
    assert h['ok'] and h['warnings'] == ['1 job(s) wait and no worker is ready yet'], h
    gate.set()
    done = await m.wait_for_job(queued.id, timeout=60)
    assert done.status == 'completed' and done.result['text'] == 'after'
    ours = lambda: [n for n in ray.util.list_named_actors() if n.startswith(f"cjm-worker-{m.worker_type}-0-{os.getpid()}-")]
    gate.clear()
    await m.wait_for_job((await m.start_job('crash', mode='sigkill')).id, timeout=60)
    await wait_until(lambda: m.get_worker_stats()[0]['status'] == 'starting', 30)
    await asyncio.wait_for(m.ashutdown(), 20)  # the kill of a worker whose actor Ray has not made yet: at once
    gate.set()  # Ray makes the actor now: the creating thread ends it
    await wait_until(lambda: ours() == [], 30)


def _gone(pid, timeout=5.0):
    "Has process `pid` ended (or is it a zombie) within `timeout` seconds?"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE: return True
        except psutil.NoSuchProcess: return True
        time.sleep(0.05)
    return False


async def _child_of_a_running_job(m):
    "Start a `slow` job whose plugin starts a `sleep` subprocess: (job, the subprocess's pid)."
    job = await m.start_job('slow', seconds=120, spawn_child=True)
    await wait_until(lambda: (m.get_job(job.id).progress_message or '').startswith('child:'), timeout=60)
    return m.get_job(job.id), int(m.get_job(job.id).progress_message.split(':')[1])


async def test_a_plugins_subprocess_ends_with_its_worker_on_ray(track, cluster):
    """UAT finding: a plugin's subprocess outlived its worker on Ray (clean shutdown, worker SIGKILLed, ...): the
    worker leads a process group of its own, which Ray's cleanup of the actor's group misses. Now the actor kills
    what is left of the worker's group once the worker has ended."""
    import signal
    m, _ = manager(track, 'ray', restart_policy=RestartPolicy.ALWAYS, restart_backoff_base_seconds=0.0)
    await m.start(wait=True)
    job, child = await _child_of_a_running_job(m)
    os.kill(job.worker_pid, signal.SIGKILL)  # the worker dies first: its plugin's subprocess must not outlive it
    assert (await m.wait_for_job(job.id, timeout=60)).status == 'failed'
    assert _gone(child), f"the plugin's subprocess {child} outlived its SIGKILLed worker"
    assert await m.wait_until_ready(60)
    job, child = await _child_of_a_running_job(m)
    await m.ashutdown()  # the worker cancels the job and exits normally
    assert _gone(child), f"the plugin's subprocess {child} outlived its worker's clean exit"


def run_script(script, *args, timeout=240, own_ray=False, env=None):
    """Run a Python `script` in a process of its own that imports the package this process tests; `own_ray`: it starts
    a Ray of its own (no RAY_ADDRESS of the session's). The finished process (stdout and stderr captured)."""
    import cjm_workers
    here = os.path.dirname(os.path.dirname(os.path.abspath(cjm_workers.__file__)))
    e = {k: v for k, v in os.environ.items() if not (own_ray and k == 'RAY_ADDRESS')}
    e.update(env or {}, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get('PYTHONPATH')])))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, env=e)


def run_own_ray_app(source, auth_off=True):
    """Write the script `source` to a short temp dir (Ray's socket paths must stay short) and run it with a Ray of its
    own (`run_script`), which gets a temp dir for Ray as `sys.argv[1]`; `auth_off`: with RAY_AUTH_MODE as the session's
    cluster has it (else the environment's). Checks that it exited 0; the JSON of its last line of stdout, and the
    finished process."""
    import json, tempfile
    tmp = tempfile.mkdtemp(prefix='rs', dir='/tmp')
    script = os.path.join(tmp, 'app.py')
    with open(script, 'w') as f: f.write(source)
    env = {'RAY_AUTH_MODE': os.environ.get('RAY_AUTH_MODE', 'disabled')} if auth_off else None
    out = run_script(script, os.path.join(tmp, 'r'), own_ray=True, env=env)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1]), out


def test_connecting_to_an_address_where_no_ray_listens_gives_up_after_connect_timeout_seconds(tmp_path):
    """UAT finding: a wrong Ray address hung `start()` forever (`ray.init` never gives up), and with it the app's exit.
    Now `prepare` gives up after `connect_timeout_seconds` with a ConnectionError naming the address; a second
    `prepare` meanwhile waits for the same connection attempt rather than starting another. In a process of its
    own: this one's Ray is connected already (and a failed `ray.init` is not something to leave behind here)."""
    import subprocess, sys
    script = tmp_path / 'connect.py'
    script.write_text(
        "import socket, threading, time\n"
        "from cjm_workers.backends.ray import RayBackend\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()  # nothing listens there\n"
        "b = RayBackend(address=f'127.0.0.1:{port}', connect_timeout_seconds=2)\n"
        "for attempt in (1, 2):\n"
        "    t = time.monotonic()\n"
        "    try: b.prepare(); print('connected')\n"
        "    except ConnectionError as e: print(f'{time.monotonic() - t:.1f}', e.args[0].replace(str(port), 'PORT'))\n"
        "print(sum(t.name == 'cjm-ray-init' for t in threading.enumerate()), 'init thread(s)', flush=True)\n")
    t = time.monotonic()
    out = run_script(script, timeout=120)
    took = time.monotonic() - t
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 3, (out.returncode, out.stdout, out.stderr[-2000:])
    for line in lines[:2]:
        secs, msg = line.split(' ', 1)
        assert 1.5 <= float(secs) < 5, line
        assert msg == ("could not connect to the Ray cluster at '127.0.0.1:PORT' within 2s: is it running, and is the "
                       "address right?"), msg
    assert lines[2] == '1 init thread(s)'  # the second `prepare` waited for the first one's attempt
    assert took < 60, took  # and the process exited: the attempt still under way does not hold it


def test_a_manager_whose_ray_cannot_be_reached_starts_and_fails_its_jobs_with_the_reason(tmp_path):
    """`start()` does not wait for the connection (the workers' start threads connect): the app comes up, a job is queued
    at once, health says why nothing runs, and the jobs fail naming the connection error (before: `start()` hung in
    `ray.init`, and then a `start_job` during it waited for the connection too). In a process of its own."""
    import subprocess, sys
    script = tmp_path / 'app.py'
    script.write_text(
        "import asyncio, json, socket, time\n"
        "from cjm_workers.backends.ray import RayBackend\n"
        "from cjm_workers.core.config import WorkerConfig\n"
        "from cjm_workers.testing import ReferenceJobManager\n"
        "async def main():\n"
        "    s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "    cfg = WorkerConfig(backend=RayBackend(address=f'127.0.0.1:{port}', connect_timeout_seconds=5))\n"
        "    t = time.monotonic()\n"
        "    async with ReferenceJobManager(worker_config=cfg) as mgr:\n"
        "        job = await mgr.start_job('echo', text='x')\n"
        "        queued = time.monotonic() - t\n"
        "        job = await mgr.wait_for_job(job.id, timeout=60)\n"
        "        health = mgr.get_health()\n"
        "    print(json.dumps({'status': job.status, 'error': job.error, 'ok': health['ok'], 'queued': queued}), flush=True)\n"
        "if __name__ == '__main__': asyncio.run(main())\n")
    out = run_script(script, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-3000:])
    import json
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info['status'] == 'failed' and 'could not connect to the Ray cluster' in info['error'], info
    assert info['ok'] is False
    assert info['queued'] < 4, info  # the start and the first job did not wait for the connection (5 s timeout)


def test_the_short_form_starts_a_local_ray_that_runs_jobs():
    """Newcomer finding (2026-12-07): docs/ray.md's short form, `WorkerConfig(backend='ray')` with no Ray running,
    started a local Ray and then no actor ever ran: `ray.init` ran in a thread that ended after connecting, and Ray
    starts its processes with a parent-death signal that Linux sends when the parent *thread* ends. Every job failed
    30 s later (the tests had called `ray.init` on the main thread). In a process of its own, with its own Ray."""
    info, out = run_own_ray_app(
        "import asyncio, json, time\n"
        "from cjm_workers.backends.ray import RayBackend\n"
        "from cjm_workers.core.config import WorkerConfig\n"
        "from cjm_workers.testing import ReferenceJobManager\n"
        "async def main(tmp):\n"
        "    be = RayBackend(init_kwargs=dict(num_cpus=1, _temp_dir=tmp, logging_level='warning', log_to_driver=False))\n"
        "    async with ReferenceJobManager(worker_config=WorkerConfig(backend=be, worker_start_timeout_seconds=60)) as mgr:\n"
        "        await asyncio.sleep(3)  # the connecting thread has long returned from ray.init\n"
        "        t = time.monotonic()\n"
        "        job = await mgr.wait_for_job((await mgr.start_job('echo', text='hi')).id, timeout=90)\n"
        "        print(json.dumps({'status': job.status, 'error': job.error, 'secs': time.monotonic() - t}), flush=True)\n"
        "if __name__ == '__main__':\n"
        "    import sys; asyncio.run(main(sys.argv[1]))\n", auth_off=False)
    assert info['status'] == 'completed', (info, out.stderr[-3000:])


async def test_a_hard_cancel_of_an_unresponsive_ray_worker_does_not_block_the_event_loop(track, cluster):
    """UAT finding: killing an unresponsive Ray worker (a hard cancel) blocked the event loop for 1-2 s: the manager
    holds its lock while it kills a worker, and `kill_tree` waited for the actor to answer and end. Now `kill_tree`
    returns at once and the actor is ended from a thread of its own; no actor of the manager is left once it has
    shut down. Here the worker and its actor are both stopped (SIGSTOP), as a hung or overloaded node would be."""
    import asyncio, signal
    m, _ = manager(track, 'ray', cancel_grace_seconds=0.2)
    await m.start(wait=True)
    job = await m.start_job('slow', seconds=120)
    await wait_until(lambda: m.get_job(job.id).status == 'running', timeout=60)
    pid = m.get_worker_stats()[0]['pid']
    stopped = [pid, psutil.Process(pid).ppid()]  # the worker and its actor
    for p in stopped: os.kill(p, signal.SIGSTOP)
    try:
        gaps, stop = [], asyncio.Event()
        async def ticker():  # what a page showing the workers does meanwhile (it takes the manager's lock)
            last = time.monotonic()
            while not stop.is_set():
                m.get_worker_stats()
                await asyncio.sleep(0.01)
                now = time.monotonic(); gaps.append(now - last); last = now
        t = asyncio.create_task(ticker())
        await m.cancel_job(job.id)
        done = await m.wait_for_job(job.id, timeout=30)
        await asyncio.sleep(0.5)
        stop.set(); await t
        assert done.status == 'cancelled' and 'ignored the cooperative cancel' in done.reason, done.reason
        assert max(gaps) < 0.5, f"the event loop was blocked for {max(gaps):.2f}s"
    finally:
        for p in stopped:
            try: os.kill(p, signal.SIGKILL); os.kill(p, signal.SIGCONT)
            except ProcessLookupError: pass
    again = await m.wait_for_job((await m.start_job('echo', text='back')).id, timeout=60)
    assert again.status == 'completed' and again.worker_pid != pid  # a fresh worker (and actor) took over
    ours = lambda: [n for n in ray.util.list_named_actors() if n.startswith(f"cjm-worker-{m.worker_type}-0-{os.getpid()}-")]
    await m.ashutdown()
    await wait_until(lambda: ours() == [], 10)


import subprocess  # noqa: E402
from cjm_workers.core.worker import base_worker_process  # noqa: E402
from cjm_workers.testing import REFERENCE_PLUGINS, ReferencePlugin, ReferencePluginManager  # noqa: E402


class DaemonPlugin(ReferencePlugin):
    "Starts `sleep` in the background of a shell that exits at once: a daemon, in the worker's process group but no longer its descendant."
    name = 'daemon'
    def execute(self, **kwargs):
        out = subprocess.run(['sh', '-c', 'sleep 300 >/dev/null 2>&1 & echo $!'], capture_output=True, text=True, check=True)
        return {'text': out.stdout.strip(), 'metadata': {}}

class SessionChildPlugin(ReferencePlugin):
    "Starts `sleep` in a session of its own (in no process group of the worker's), reports its pid, and ignores cancels."
    name = 'session_child'
    def execute(self, **kwargs):
        from cjm_workers.core.worker import report_progress
        child = subprocess.Popen(['sleep', '300'], start_new_session=True)
        report_progress(0.5, f"child:{child.pid}")
        while True: time.sleep(0.05)

class WindDownPlugin(ReferencePlugin):
    "Runs until cancelled, says so ('cancel seen'), takes `linger` seconds to wind down and returns normally."
    name = 'wind_down'
    def execute(self, linger=1.0, **kwargs):
        from cjm_workers.core.worker import report_progress
        self.cancelled = False
        while not self._stop_requested(): time.sleep(0.005)
        report_progress(0.5, 'cancel seen')
        time.sleep(linger)
        return {'text': 'wound down', 'metadata': {}}

class MarkPlugin(ReferencePlugin):
    "Appends a line to the file `path` each time it starts (counts its runs), then sleeps `sleep` seconds."
    name = 'mark'
    def execute(self, path='', sleep=1.0, **kwargs):
        with open(path, 'a') as f: f.write(f"{os.getpid()}\n")
        time.sleep(sleep)
        return {'text': 'marked', 'metadata': {}}

def _daemon_plugin_manager():
    return ReferencePluginManager({**REFERENCE_PLUGINS, 'daemon': DaemonPlugin, 'session_child': SessionChildPlugin,
                                   'wind_down': WindDownPlugin, 'mark': MarkPlugin})

def daemon_worker(requests, results, responses):
    "Worker entry point: the reference plugins and `daemon` (importable by the actors: tests/ is on their path)."
    base_worker_process(requests, results, responses, plugin_manager_factory=_daemon_plugin_manager, supports_streaming=True)


@pytest.mark.backends('local', 'ray')
async def test_a_daemon_a_plugin_started_ends_with_its_worker(track, backend):
    """What a plugin started and let go of (a shell's `cmd &`: no longer the worker's descendant, still in its process
    group) ends with the worker: a local worker's group is killed by the manager after the worker ends, a Ray worker's
    by its actor (the manager cannot: the worker may be on another machine)."""
    m = track(ReferenceJobManager(worker_config=WorkerConfig(backend=backend), entry_point=daemon_worker))
    job = await m.wait_for_job((await m.start_job('daemon')).id, timeout=60)
    assert job.status == 'completed', job.error
    pid = int(job.result['text'])
    assert psutil.Process(pid).ppid() != job.worker_pid and os.getpgid(pid) == job.worker_pid
    await m.ashutdown()  # the worker exits normally
    assert _gone(pid), f"the daemon {pid} a plugin started outlived its worker"


@pytest.mark.backends('local', 'ray')
async def test_a_hard_cancel_kills_a_plugins_child_in_a_session_of_its_own(track, backend):
    """Ray review: on the app's own node, a hard cancel of a Ray worker left its plugin's `start_new_session` child
    running (ppid 1) in 4 of 4 tries: the manager SIGKILLed the worker at once, and the actor listed the worker's
    children only afterwards, when that child (in no group of the worker's) was no longer one. The manager now lists
    them first, as for a local worker."""
    m = track(ReferenceJobManager(worker_config=WorkerConfig(backend=backend, cancel_grace_seconds=0.2), entry_point=daemon_worker))
    job = await m.start_job('session_child')
    await wait_until(lambda: (m.get_job(job.id).progress_message or '').startswith('child:'), timeout=60)
    child = int(m.get_job(job.id).progress_message.split(':')[1])
    assert os.getsid(child) == child
    await m.cancel_job(job.id)  # it ignores the cooperative cancel: killed after 0.2 s
    assert (await m.wait_for_job(job.id, timeout=60)).status == 'cancelled'
    try: assert _gone(child), f"the plugin's child {child} in a session of its own outlived its hard-cancelled worker"
    finally:
        try: os.kill(child, 9)
        except OSError: pass


async def test_a_killed_ray_workers_last_messages_reach_the_manager_and_a_job_sent_ahead_runs_once(track, cluster, tmp_path):
    """Ray review: when the manager killed a Ray worker (here at the end of a cancel's grace period), what the worker
    had sent just before, still on its way through the actor, was dropped with the handle: a job that wound down in
    time was reported as having ignored the cancel, and the job sent ahead (`prefetch`), which had started meanwhile,
    went back to the queue and ran a second time (15 of 36 such kills). Now the handle ends only once the actor has
    relayed the worker's last messages and its end. Made certain here: the actor is stopped (SIGSTOP, as an overloaded
    node would be late) from just after the worker saw the cancel until the manager has killed the worker, so that
    the job's end and the next job's start are still in the actor when the kill comes."""
    import signal
    m = track(ReferenceJobManager(worker_config=WorkerConfig(backend='ray', cancel_grace_seconds=2.0, prefetch_max_job_seconds=None),
                                  entry_point=daemon_worker))
    await m.start(wait=True)
    for i in range(3):
        path = tmp_path / f'runs{i}'
        a = await m.start_job('wind_down', linger=1.0)  # ends 1 s after the cancel, 1 s before the kill
        b = await m.start_job('mark', path=str(path), sleep=2.0)  # sent ahead: it starts as soon as `a` ends
        await wait_until(lambda: m.get_job(a.id).status == 'running', timeout=60)
        await asyncio.sleep(1.0)  # `b` reaches the worker's request pipe meanwhile
        worker = m.get_job(a.id).worker_pid
        actor = psutil.Process(worker).ppid()
        cancel = asyncio.create_task(m.cancel_job(a.id))  # (it returns once the job has ended)
        await wait_until(lambda: m.get_job(a.id).progress_message == 'cancel seen', timeout=30)
        os.kill(actor, signal.SIGSTOP)  # from now on, what the worker sends waits in the actor's pipes
        try: await wait_until(lambda: _gone(worker, 0.01), timeout=30)  # the manager kills it at the end of the grace period
        finally: os.kill(actor, signal.SIGCONT)  # the actor relays what the worker sent, and its end
        assert await asyncio.wait_for(cancel, 60)
        a, b = await m.wait_for_job(a.id, timeout=60), await m.wait_for_job(b.id, timeout=60)
        runs = len(path.read_text().splitlines()) if path.exists() else 0
        assert runs == 1, f"round {i}: the job sent ahead ran {runs} times ({b.status}: {b.error}; the first: {a.reason})"
        assert (a.status, a.reason) == ('cancelled', 'cancelled on request'), (i, a.status, a.reason)  # it wound down in time
        assert b.status == 'failed' and 'WorkerDied' in b.error and 'SIGKILL' in b.error, (i, b.status, b.error)
        assert await m.wait_until_ready(60)


def test_a_ray_shutdown_in_the_app_ends_its_workers_with_the_reason_and_starts_no_ray(tmp_path):
    """Ray review: after the app's `ray.shutdown()` while a worker ran, the bridge threads' Ray calls started a fresh
    local Ray (Ray's auto-init; its agents outlived the app), and the worker was said to have "exited with code 1" or
    to have died of an unknown object owner. Now the handle ends, killed, with the reason, and no Ray is started.
    In a process of its own, with its own Ray."""
    info, _ = run_own_ray_app(
        "import json, select, sys, time, ray\n"
        "from cjm_workers.backends.ray import RayActorProcess\n"
        "from cjm_workers.core.channel import PipeChannel\n"
        "from cjm_workers.testing import reference_worker\n"
        "ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1], logging_level='error', log_to_driver=False)\n"
        "req, res, resp = PipeChannel(control=True), PipeChannel(), PipeChannel()\n"
        "p = RayActorProcess(reference_worker, (req, res, resp), name='t', prepare=lambda: None)\n"
        "p.start(); req.close_reader(); res.close_writer(); resp.close_writer()\n"
        "assert res.get(timeout=60)['type'] == 'ready'\n"
        "req.put({'type': 'execute', 'job_id': 'a', 'plugin_name': 'slow', 'seconds': 60})\n"
        "assert res.get(timeout=60)['type'] == 'started'\n"
        "inits, init = [], ray.init\n"
        "ray.init = lambda *a, **kw: (inits.append(1), init(*a, **kw))[1]  # what Ray's auto-init calls\n"
        "ray.shutdown()\n"
        "ended = bool(select.select([p.sentinel], [], [], 30)[0])\n"
        "req.put({'type': 'execute', 'job_id': 'b', 'plugin_name': 'echo'}); req.control.put({'type': 'cancel', 'job_id': 'a'})\n"
        "time.sleep(3)  # the bridges' last calls (the requests just sent)\n"
        "print(json.dumps({'ended': ended, 'exitcode': p.exitcode, 'reason': p.death_reason, 'inits': len(inits),\n"
        "                  'initialized': ray.is_initialized()}), flush=True)\n"
        "ray.shutdown()\n")
    assert info['inits'] == 0 and not info['initialized'], info  # no Ray was started after the app's shutdown
    assert info['ended'] and info['exitcode'] == -9, info
    assert info['reason'] == "was ended by `ray.shutdown()` in the app (which ends the app's Ray actors)", info


def test_after_a_ray_shutdown_in_the_app_a_restart_starts_no_ray_and_the_jobs_fail_with_the_reason():
    """Ray review: after the app's `ray.shutdown()` the workers ended with the reason, but the restart policy's restart
    connected again: `RayBackend.prepare` started a new local Ray behind the app's back (its agents can outlive the
    app), and the next job ran there. Now a backend that has seen Ray connected refuses to start Ray: the start fails
    naming `ray.shutdown()` and the worker is failed at once (the jobs fail with the reason, no backoff to sit out);
    once the app has called `ray.init()` again, `restart_workers()` and the policy's restarts use the app's new Ray.
    In a process of its own, with its own Ray."""
    info, _ = run_own_ray_app(
        "import asyncio, json, sys, ray\n"
        "from cjm_workers.backends.ray import RayBackend\n"
        "from cjm_workers.core.config import WorkerConfig\n"
        "from cjm_workers.testing import ReferenceJobManager\n"
        "kw = dict(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1], logging_level='error', log_to_driver=False)\n"
        "ray.init(**kw)\n"
        "inits, init = [], ray.init\n"
        "ray.init = lambda *a, **k: (inits.append(1), init(*a, **k))[1]  # counts the others: Ray's auto-init, a backend's\n"
        "async def main():\n"
        "    out = {}\n"
        "    cfg = WorkerConfig(backend=RayBackend(reconnect_wait_seconds=0.5), restart_policy='backoff')  # (its wait for an app's ray.init)\n"
        "    async with ReferenceJobManager(worker_config=cfg) as m:\n"
        "        await m.start(wait=True)\n"
        "        a = await m.start_job('slow', seconds=120)\n"
        "        while m.get_job(a.id).status == 'pending': await asyncio.sleep(0.02)\n"
        "        ray.shutdown()  # while the worker runs a job\n"
        "        a = await m.wait_for_job(a.id, timeout=60)\n"
        "        b = await m.wait_for_job((await m.start_job('echo', text='b')).id, timeout=120)\n"
        "        out['down'] = [a.error, b.status, b.error, len(inits), ray.is_initialized(), [s['status'] for s in m.get_worker_stats()], m.restart_count]\n"
        "        init(**kw); await m.restart_workers()  # the app starts Ray again\n"
        "        c = await m.wait_for_job((await m.start_job('echo', text='c')).id, timeout=60)\n"
        "        d = await m.wait_for_job((await m.start_job('crash', mode='exit')).id, timeout=60)  # then the policy restarts it\n"
        "        e = await m.wait_for_job((await m.start_job('echo', text='e')).id, timeout=60)\n"
        "        out['back'] = [c.status, d.status, e.status, len(inits)]\n"
        "    print(json.dumps(out), flush=True)\n"
        "asyncio.run(main())\n"
        "ray.shutdown()\n")
    a_error, b_status, b_error, inits, initialized, workers, restarts = info['down']
    assert 'ended by `ray.shutdown()` in the app' in a_error, info
    assert inits == 0 and not initialized, info  # no Ray was started behind the app's back
    assert b_status == 'failed' and b_error.startswith('WorkerFailed: no worker can run the job') and \
        'was not started: the app shut Ray down (`ray.shutdown()`)' in b_error, info
    assert workers == ['failed'], info
    assert restarts == 1 and 'in a row' not in b_error, info  # failed at its first refused start, not after max_restart_attempts
    assert info['back'] == ['completed', 'failed', 'completed', 0], info  # on the app's new Ray (started by the app only)


def test_a_kill_of_an_actor_ray_never_placed_ends_the_handle_at_once(cluster):
    """Ray review: killing a worker whose actor Ray never placed (it asks for a resource no node has) ended the handle
    only after `KILL_RELAY_SECONDS` (3 s), waiting for an actor that had relayed nothing. Its receiving thread relays
    the worker's messages only once the actor has reported where it runs: before that nothing is left to relay, and
    the handle now ends when `kill_tree` returns; the actor is ended too."""
    w = Worker(actor_options={'resources': {'no_such_resource': 1}})
    end = time.monotonic() + 60
    while w.p.actor is None and time.monotonic() < end: time.sleep(0.01)  # Ray made the actor (it waits to be placed)
    name = next(n for n in ray.util.list_named_actors() if n == w.p.actor_name)
    assert w.p.actor_pid is None
    w.p.kill_tree()
    assert w.ended(0) and w.p.exitcode == -9 and w.p.death_reason is None and not w.p.is_alive()
    while name in ray.util.list_named_actors() and time.monotonic() < end: time.sleep(0.05)
    assert name not in ray.util.list_named_actors()


async def test_the_shutdown_of_a_manager_whose_actor_ray_never_placed_does_not_wait_to_stop_it(track, cluster):
    """Ray review: a manager's shutdown sent a worker whose actor Ray never placed a stop, and waited
    `shutdown_timeout_seconds` (then 1 s more for the kill) for a worker that was not there. Now it is killed at once
    (the hang guard below is far shorter than the configured wait)."""
    m, _ = manager(track, RayBackend(resources={'no_such_resource': 1}), shutdown_timeout_seconds=120,
                   worker_start_timeout_seconds=120)
    await m.start()
    job = await m.start_job('echo', text='never')
    await wait_until(lambda: getattr(m._slots[0].process, 'actor', None) is not None, 60)
    p = m._slots[0].process
    await asyncio.wait_for(m.ashutdown(), 30)
    assert m.get_job(job.id).status == 'cancelled' and p.exitcode == -9
    await wait_until(lambda: not any(n == p.actor_name for n in ray.util.list_named_actors()), 30)


def test_a_start_that_saw_no_ray_as_another_start_connected_is_not_refused():
    """Review (2026-12-07): `RayBackend.prepare` read its `_connected` flag after `ray.is_initialized()`: a worker's
    start that saw no Ray just before another worker's start finished connecting (two workers starting at once, the
    backend starting Ray) took the flag the other had just set for the app's `ray.shutdown()`, raised
    `RayShutDownError`, and its worker was failed at once ("the app shut Ray down"), though nothing had shut Ray down.
    The window is held open here: start B's first `ray.is_initialized()` returns False only after start A connected.
    In a process of its own, with its own Ray."""
    info, _ = run_own_ray_app(
        "import json, sys, threading, ray\n"
        "from cjm_workers.backends.ray import RayBackend\n"
        "b = RayBackend(init_kwargs=dict(num_cpus=1, _temp_dir=sys.argv[1], logging_level='error', log_to_driver=False),\n"
        "               reconnect_wait_seconds=0.5)  # (after the shutdown below: its wait for an app's ray.init)\n"
        "real, connected_by_a, out, first = ray.is_initialized, threading.Event(), {}, {'B': True}\n"
        "def is_initialized():\n"
        "    v = real()\n"
        "    if threading.current_thread().name == 'B' and first['B']:  # B has just seen no Ray; A connects meanwhile\n"
        "        first['B'] = False\n"
        "        connected_by_a.wait(180)\n"
        "    return v\n"
        "ray.is_initialized = is_initialized\n"
        "def start(name):\n"
        "    try: b.prepare(); out[name] = 'connected'\n"
        "    except Exception as e: out[name] = f'{type(e).__name__}: {e}'\n"
        "    if name == 'A': connected_by_a.set()\n"
        "tb = threading.Thread(target=start, args=('B',), name='B'); tb.start()\n"
        "while first['B']: pass\n"
        "ta = threading.Thread(target=start, args=('A',), name='A'); ta.start()\n"
        "ta.join(200); tb.join(200)\n"
        "ray.is_initialized = real\n"
        "out['initialized'] = ray.is_initialized()\n"
        "ray.shutdown()\n"
        "out['after_shutdown'] = None\n"
        "try: b.prepare()\n"
        "except Exception as e: out['after_shutdown'] = type(e).__name__\n"
        "print(json.dumps(out), flush=True)\n")
    assert info == {'A': 'connected', 'B': 'connected', 'initialized': True, 'after_shutdown': 'RayShutDownError'}, info


def test_a_restart_while_the_apps_own_ray_init_is_under_way_waits_for_it(cluster, tmp_path):
    """Found here (2026-12-07): the app shut Ray down and called its own `ray.init()` again (to reconnect, or restart Ray
    with other settings); a worker restart that came while that call was still connecting (the worker ended with the
    app's Ray) found no Ray, took it for a final `ray.shutdown()`, and failed the worker at once: the jobs after it
    failed ("no worker can run the job") though Ray was back a moment later. Now the restart waits, in its start
    thread, up to `RayBackend.reconnect_wait_seconds` for the app's connection, then starts on it. The app's call is
    held "under way" here until the restart has looked for Ray and found none. In a process of its own, connected
    to the session's cluster (no Ray is started)."""
    import json
    script = tmp_path / 'reinit.py'
    script.write_text(
        "import asyncio, json, sys, threading, ray\n"
        "from cjm_workers.backends.ray import RayBackend\n"
        "from cjm_workers.core.config import WorkerConfig\n"
        "from cjm_workers.testing import ReferenceJobManager\n"
        "kw = dict(address=sys.argv[1], logging_level='error', log_to_driver=False)\n"
        "ray.init(**kw)\n"
        "real, looked = ray.is_initialized, threading.Event()\n"
        "def is_initialized():  # notes a worker's start that looked for Ray and found none\n"
        "    v = real()\n"
        "    if not v and threading.current_thread().name.startswith('cjm-ray-start-'): looked.set()\n"
        "    return v\n"
        "ray.is_initialized = is_initialized\n"
        "def app_init():  # the app's own `ray.init()`, under way until the restart has looked for Ray\n"
        "    out['looked'] = looked.wait(60)\n"
        "    ray.init(**kw)\n"
        "out = {}\n"
        "async def main():\n"
        "    cfg = WorkerConfig(backend=RayBackend(), restart_policy='always', restart_backoff_base_seconds=0.0)\n"
        "    async with ReferenceJobManager(worker_config=cfg) as m:\n"
        "        await m.start(wait=True)\n"
        "        a = await m.start_job('slow', seconds=120)\n"
        "        while m.get_job(a.id).status == 'pending': await asyncio.sleep(0.02)\n"
        "        ray.shutdown()  # the worker ends with it, and is restarted\n"
        "        await asyncio.to_thread(app_init)\n"
        "        a = await m.wait_for_job(a.id, timeout=60)\n"
        "        b = await m.wait_for_job((await m.start_job('echo', text='b')).id, timeout=60)\n"
        "        out.update(a=a.error, b=[b.status, b.error], workers=[s['status'] for s in m.get_worker_stats()])\n"
        "    print(json.dumps(out), flush=True)\n"
        "asyncio.run(main())\n"
        "ray.shutdown()\n")
    address = cluster.get_runtime_context().gcs_address
    out = run_script(script, address, env={'RAY_AUTH_MODE': os.environ.get('RAY_AUTH_MODE', 'disabled')})
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-3000:])
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info['looked'] and 'ended by `ray.shutdown()` in the app' in info['a'], info
    assert info['b'] == ['completed', None] and info['workers'] == ['idle'], info  # on the app's Ray, connected again
