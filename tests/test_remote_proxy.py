"""RemotePluginProxy and RemotePluginManager with real Universal Worker processes over real HTTP on 127.0.0.1.

The isolation test builds a tiny wheel, installs it into a second virtualenv the app's environment does not see, and
runs the plugin it contains through the proxy and through a job manager.
"""
import asyncio, os, signal, site, subprocess, sys, sysconfig, textwrap, threading, time, venv
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import psutil, pytest
from cjm_workers.core.config import WorkerConfig
from cjm_workers.remote.adapter import RemotePluginSpec, remote_worker_entry
from cjm_workers.remote.proxy import (RemoteCancelledError, RemotePluginError, RemotePluginProxy,
                                      RemoteWorkerError)
from cjm_workers.testing import RecordingBroadcaster, ReferenceJob, ReferenceJobManager, wait_until
from conftest import descendants
from _a_helpers import can_choose_pids, gone, stranger_with_pid, wait_gone

TESTS = str(Path(__file__).parent)
# A worker's PYTHONPATH: the tests' helpers, then this checkout (before whatever cjm_workers is installed: a test run
# from a clone with PYTHONPATH set must not have its workers import another copy of the package)
WORKER_PATH = os.pathsep.join([TESTS, str(Path(__file__).parent.parent)])

PROBE = 'cjm_iso_probe'




# ---------------------------------------------------------------- isolation: a second virtualenv with its own package

PLUGIN_SRC = '''
import os, sys, time
from importlib.metadata import version
from cjm_workers.remote.plugin import PluginInterface
from . import helper

class ProbePlugin(PluginInterface):
    "Lives only in the isolated environment: reports where it runs."
    name, version = 'probe', version('cjm-iso-probe')
    def initialize(self, config=None): self.config = dict(config or {})
    def get_config_schema(self): return {'type': 'object', 'properties': {'greeting': {'type': 'string'}}}
    def get_current_config(self): return getattr(self, 'config', {})
    def cleanup(self): pass
    def execute(self, text='', steps=3):
        for i in range(steps):
            self.report_progress((i + 1) / steps, f"step {i + 1}")
        return {'text': helper.shout(self.get_current_config().get('greeting', 'hi') + ' ' + text),
                'metadata': {'prefix': sys.prefix, 'executable': sys.executable, 'pid': os.getpid(),
                             'python': list(sys.version_info[:2]),
                             'package_version': version('cjm-iso-probe')}}
    def execute_stream(self, text='', **kw):
        for w in text.split(): yield helper.shout(w)
'''


@pytest.fixture(scope='module')
def probe_wheel(tmp_path_factory):
    "The `cjm-iso-probe` wheel, built here (pure Python: any Python 3 installs it)."
    root = tmp_path_factory.mktemp('iso')
    src = root / 'src'
    (src / PROBE).mkdir(parents=True)
    (src / 'pyproject.toml').write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "cjm-iso-probe"
        version = "1.2.3"
        [tool.setuptools]
        packages = ["cjm_iso_probe"]
    '''))
    (src / PROBE / '__init__.py').write_text('')
    (src / PROBE / 'helper.py').write_text('def shout(s): return s.upper()\n')
    (src / PROBE / 'plugin.py').write_text(PLUGIN_SRC)
    dist = root / 'dist'
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(dist),
                    f'./{src.name}'], cwd=root, check=True, capture_output=True)
    wheel, = dist.glob('cjm_iso_probe-1.2.3-*.whl')
    return wheel


@pytest.fixture(scope='module')
def isolated_python(probe_wheel):
    "Python of a fresh virtualenv holding the `cjm-iso-probe` wheel; the app's environment lacks it."
    wheel = probe_wheel
    env_dir = wheel.parent.parent / 'venv'
    # system site packages: the environment sees cjm_workers and its dependencies; what it installs stays its own
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    # ... which are the base interpreter's: when this test runs in a virtualenv, its packages are not among them
    purelib = sysconfig.get_path('purelib', vars={'base': str(env_dir), 'platbase': str(env_dir)})
    (Path(purelib) / '_cjm_app_env.pth').write_text(''.join(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages()))
    py = env_dir / 'bin' / 'python'
    subprocess.run([str(py), '-m', 'pip', 'install', '--no-deps', '--no-index', '-q', str(wheel)],
                   check=True, capture_output=True)
    assert find_spec(PROBE) is None, "the app's environment must not have the probe package"
    return str(py), str(env_dir)


def test_isolated_plugin_runs_in_its_own_environment(isolated_python):
    py, env_dir = isolated_python
    with RemotePluginProxy(f'{PROBE}.plugin', 'ProbePlugin', python=py, env={'PROBE_FLAG': '1'}) as p:
        assert p.health()['name'] == 'probe' and p.health()['version'] == '1.2.3'
        p.initialize({'greeting': 'hello'})
        r = p.execute(text='world')
        assert r['text'] == 'HELLO WORLD'
        assert r['metadata']['prefix'] == env_dir and r['metadata']['package_version'] == '1.2.3'
        assert Path(r['metadata']['executable']).parent == Path(py).parent
        assert list(p.execute_stream(text='a b')) == ['A', 'B']
        assert p.get_config_schema()['properties']['greeting'] == {'type': 'string'}
        p.initialize({'greeting': 'hey'})
        assert p.get_current_config() == {'greeting': 'hey'}
    # the same plugin under the app's own Python cannot even be imported, and the error says why
    with pytest.raises(RemoteWorkerError, match=f"No module named '{PROBE}'"):
        RemotePluginProxy(f'{PROBE}.plugin', 'ProbePlugin').start()


async def test_job_manager_runs_isolated_plugin(isolated_python, track):
    py, env_dir = isolated_python
    events = RecordingBroadcaster()
    specs = [RemotePluginSpec('probe', f'{PROBE}.plugin', 'ProbePlugin', python=py, streams=True),
             RemotePluginSpec('probe_once', f'{PROBE}.plugin', 'ProbePlugin', python=py)]
    mgr = track(ReferenceJobManager(worker_config=WorkerConfig(), event_broadcaster=events,
                                    entry_point=remote_worker_entry(specs)))
    await mgr.start()
    job = await mgr.wait_for_job((await mgr.start_job('probe', text='isolated world')).id, timeout=60)
    assert job.status == 'completed', (job.error, job.reason)
    assert job.output == 'ISOLATEDWORLD'  # a streamed job: the chunks, in order
    await mgr.flush_events()
    assert [d['chunk'] for t, d in events.events if t == 'reference:chunk'] == ['ISOLATED', 'WORLD']
    once = await mgr.wait_for_job((await mgr.start_job('probe_once', text='there', steps=4)).id, timeout=60)
    assert once.status == 'completed' and once.result['text'] == 'HI THERE'
    assert once.result['metadata']['prefix'] == env_dir  # it ran under the isolated environment's Python
    await mgr.ashutdown()


def other_python():
    "An interpreter of another Python version (>= 3.11, as pyproject.toml requires) on this machine, or None."
    import shutil
    here = sys.version_info[:2]
    for minor in (12, 13, 11):
        if (3, minor) == here: continue
        found = [*sorted(Path('~/.pyenv/versions').expanduser().glob(f'3.{minor}.*/bin/python3.{minor}')),
                 shutil.which(f'python3.{minor}')]  # (a pyenv shim on PATH may not run: each is tried)
        for py in filter(None, found):
            try: ok = subprocess.run([str(py), '-c', 'import venv'], capture_output=True, timeout=30).returncode == 0
            except OSError: ok = False
            if ok: return str(py)
    return None


async def test_plugin_under_another_python_version_installed_as_docs_say(probe_wheel, tmp_path, track):
    """The recipe of docs/plugins.md, step 1, on another Python version: a plain virtualenv (no system site packages),
    cjm_workers installed from this checkout with --no-deps plus the five packages the Universal Worker needs (from
    PyPI), and the plugin's own package; a job manager on this Python runs the plugin there."""
    py = other_python()
    if py is None: pytest.skip("no Python of another version (3.11+) on this machine")
    env_dir = tmp_path / 'venv'
    subprocess.run([py, '-m', 'venv', str(env_dir)], check=True, capture_output=True, timeout=120)
    pip = [str(env_dir / 'bin' / 'python'), '-m', 'pip', 'install', '-q', '--disable-pip-version-check']
    repo = Path(__file__).resolve().parent.parent
    for args in (['--no-deps', str(repo)], ['starlette', 'uvicorn', 'anyio', 'psutil', 'fastcore'], [str(probe_wheel)]):
        r = subprocess.run(pip + args, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"pip install {' '.join(args)} failed:\n{r.stderr[-3000:]}"
    env_py = str(env_dir / 'bin' / 'python')
    mgr = track(ReferenceJobManager(worker_config=WorkerConfig(), entry_point=remote_worker_entry(
        [RemotePluginSpec('probe', f'{PROBE}.plugin', 'ProbePlugin', python=env_py, streams=True),
         RemotePluginSpec('probe_once', f'{PROBE}.plugin', 'ProbePlugin', python=env_py)])))
    await mgr.start()
    job = await mgr.wait_for_job((await mgr.start_job('probe_once', text='there')).id, timeout=60)
    assert job.status == 'completed', (job.error, job.reason)
    meta = job.result['metadata']
    assert meta['prefix'] == str(env_dir) and tuple(meta['python']) != sys.version_info[:2]
    assert job.result['text'] == 'HI THERE'
    streamed = await mgr.wait_for_job((await mgr.start_job('probe', text='other python')).id, timeout=60)
    assert streamed.status == 'completed' and streamed.output == 'OTHERPYTHON'
    await mgr.ashutdown()


# ---------------------------------------------------------------- the proxy with the reference plugins


def test_start_failure_carries_worker_stderr(tmp_path):
    bad = tmp_path / 'broken_plugin.py'
    bad.write_text('import sys\nsys.stderr.write("loading weights...\\n")\nraise RuntimeError("CUDA not available")\n')
    p = RemotePluginProxy('broken_plugin', 'Plugin', cwd=str(tmp_path), env={'PYTHONPATH': str(tmp_path)})
    with pytest.raises(RemoteWorkerError) as e:
        p.start()
    msg = str(e.value)
    assert 'exited with code 2 before it was ready' in msg and 'CUDA not available' in msg and 'loading weights' in msg, msg
    assert not p.alive
    with pytest.raises(RemoteWorkerError, match='cannot launch the worker'):
        RemotePluginProxy('x', 'Y', python=str(tmp_path / 'no-such-python')).start()


def test_initialize_refusal_and_plugin_error_are_plugin_errors():
    tests = str(Path(__file__).parent)
    with RemotePluginProxy('_r_plugins', 'FlakyPlugin', cwd=tests, env={'PYTHONPATH': WORKER_PATH}) as p:
        with pytest.raises(RemotePluginError) as e:
            p.initialize({'fail': 'no such model'})
        assert e.value.status == 422 and 'ValueError: bad config: no such model' in str(e.value)
        assert p.execute(a=1) == {'ok': True, 'kwargs': {'a': 1}}  # still usable
        items, err = [], None
        try:
            for item in p.execute_stream(): items.append(item)
        except RemotePluginError as e2: err = e2
        assert items == ['first', {'second': 2}]  # every item before the failure arrives first
        assert 'RuntimeError: broke after two items' in str(err) and 'broke after two items' in err.traceback
        assert err.remote_traceback == err.traceback  # the name a cjm_workers worker appends to the job's traceback


def test_sync_stream_is_live_and_cancellable():
    with RemotePluginProxy('cjm_workers.testing', 'TokenStreamPlugin') as p:
        gen = p.execute_stream(text=' '.join(f'w{i}' for i in range(200)), delay=0.01)
        assert next(gen) == 'w0 '
        assert p.get_progress()['running'] is True  # the first item arrived while the plugin is still producing
        assert p.cancel()['status'] == 'cancelled'
        rest = []
        with pytest.raises(RemoteCancelledError):
            for item in gen: rest.append(item)
        assert len(rest) < 199 and all(w.startswith('w') for w in rest)
        assert list(p.execute_stream(text='a b', delay=0)) == ['a ', 'b']  # usable after the cancel
        gen = p.execute_stream(text=' '.join(['x'] * 500), delay=0.01)
        assert next(gen) == 'x '
        gen.close()  # closing early ends the run on the worker too
        p2 = p.get_progress()
        while p2['running']: p2 = p.get_progress(since=p2['seq'], wait=5)


async def test_async_calls_stream_and_cancel():
    async with RemotePluginProxy('cjm_workers.testing', 'TranscribePlugin') as p:
        assert (await p.ainitialize({'model': 'base'})) == {'status': 'initialized'}
        r = await p.aexecute(steps=2, delay=0)
        assert r['metadata']['model'] == 'base'
        prog = await p.aget_progress()
        task = asyncio.create_task(p.aexecute(steps=300, delay=0.01))
        seen = []
        while len(seen) < 3:
            prog = await p.aget_progress(since=prog['seq'], wait=5)
            if prog['progress'] is not None: seen.append(prog['progress'])
        assert seen == sorted(seen) and seen[-1] < 1
        assert (await p.acancel())['status'] == 'cancelled'
        with pytest.raises(RemoteCancelledError):
            await task
        assert (await p.aget_stats())['pid'] == p.pid
    async with RemotePluginProxy('cjm_workers.testing', 'TokenStreamPlugin') as p:
        agen = p.aexecute_stream(text=' '.join(f't{i}' for i in range(100)), delay=0.01)
        first = await agen.__anext__()
        assert first == 't0 ' and (await p.aget_progress())['running'] is True
        rest = [x async for x in agen]
        assert [first, *rest] == [f't{i} ' for i in range(99)] + ['t99']


def test_worker_death_mid_call_names_the_signal():
    with RemotePluginProxy('cjm_workers.testing', 'SlowPlugin') as p, ThreadPoolExecutor(1) as pool:
        prog = p.get_progress()
        fut = pool.submit(p.execute, seconds=30)
        while not prog['running']: prog = p.get_progress(since=prog['seq'], wait=5)
        os.kill(p.pid, signal.SIGKILL)
        with pytest.raises(RemoteWorkerError, match='killed by SIGKILL'):
            fut.result(30)
        assert not p.alive
        p.start()  # a dead worker can be started again
        assert p.execute(seconds=0)['text'] == 'slept 0s'


def test_stop_kills_the_whole_tree_even_mid_call():
    p = RemotePluginProxy('cjm_workers.testing', 'SlowPlugin', stop_timeout=1.0).start()
    with ThreadPoolExecutor(1) as pool:
        prog = p.get_progress()
        fut = pool.submit(p.execute, seconds=60, ignore_cancel=True, spawn_child=True)
        while not prog['message'].startswith('child:'): prog = p.get_progress(since=prog['seq'], wait=5)
        child, worker = int(prog['message'].split(':')[1]), p.pid
        p.cleanup()  # /cancel (ignored), SIGTERM, then SIGKILL of the whole tree, within stop_timeout
        assert wait_gone([worker, child]) == []
        with pytest.raises(RemoteWorkerError, match=r'was stopped \(stop\(\) was called\) while this call ran'):
            fut.result(10)
    p.stop()  # idempotent


def test_health_says_a_run_ignores_its_cancel():
    """Last session's leftover: a plugin that ignores cancels kept `/health` at a plain ok while later calls timed out.
    `/health` now says a run is in progress, for how long, and since when it was told to cancel."""
    with RemotePluginProxy('cjm_workers.testing', 'SlowPlugin', stop_timeout=1.0) as p, ThreadPoolExecutor(1) as pool:
        idle = p.health()
        assert (idle['status'], idle['running'], idle['run_seconds'], idle['cancel_pending_seconds']) == ('ok', False, None, None)
        prog = p.get_progress()
        fut = pool.submit(p.execute, seconds=30, ignore_cancel=True)
        while not prog['running']: prog = p.get_progress(since=prog['seq'], wait=5)
        busy = p.health()
        assert busy['running'] and busy['run_seconds'] >= 0 and busy['cancel_pending_seconds'] is None, busy
        p.cancel()
        time.sleep(0.3)
        stuck = p.health()
        assert stuck['running'] and 0.3 <= stuck['cancel_pending_seconds'] <= stuck['run_seconds'], stuck
        p.cancel()  # a second cancel does not restart the count
        assert p.health()['cancel_pending_seconds'] >= stuck['cancel_pending_seconds']
        p.stop()
        with pytest.raises(RemoteWorkerError): fut.result(10)




def test_stop_mid_call_cancels_the_call_then_cleans_up(tmp_path):
    "stop() cancels the running call first, so the plugin stops where it is and its cleanup() still runs."
    journal = tmp_path / 'journal'
    p = RemotePluginProxy('_r_plugins', 'Journaled', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH, 'R_JOURNAL': str(journal)},
                          stop_timeout=30.0).start()
    with ThreadPoolExecutor(1) as pool:
        prog = p.get_progress()
        fut = pool.submit(p.execute, n=6000)  # a minute if it ran to the end
        while prog['progress'] is None: prog = p.get_progress(since=prog['seq'], wait=5)
        worker = p.pid
        p.stop()
        with pytest.raises(RemoteWorkerError) as e:
            fut.result(10)
    assert str(e.value) == "the worker for _r_plugins.Journaled was stopped (stop() was called) while this call ran"
    assert journal.read_text().split('\n')[:-1] == ['execute', 'stopped early', 'cleanup']
    assert wait_gone([worker]) == [] and not p.alive


def test_a_cancel_names_the_calls_in_flight_even_those_not_yet_begun():
    "Two calls in flight, the second waiting behind the first: one cancel() stops both, and the second never runs."
    with RemotePluginProxy('cjm_workers.testing', 'SlowPlugin') as p, ThreadPoolExecutor(2) as pool:
        prog = p.get_progress()
        first = pool.submit(p.execute, seconds=60)
        while not prog['running']: prog = p.get_progress(since=prog['seq'], wait=5)
        second = pool.submit(p.execute, seconds=60)
        assert wait_until_sync(lambda: len(p._calls) == 2)  # both sent (the worker runs one at a time)
        assert p.cancel()['status'] == 'cancelled'
        for fut in (first, second):
            with pytest.raises(RemoteCancelledError, match='^the call to cjm_workers.testing.SlowPlugin was cancelled'):
                fut.result(10)
        assert p.get_stats()['executions'] == 2 and p.execute(seconds=0) == {'text': 'slept 0s', 'metadata': {}}


def test_a_call_for_a_cancelled_job_is_not_sent():
    "Inside a cjm_workers job that has been asked to stop, a call raises at once and the plugin never sees it."
    from cjm_workers.core.worker import JobContext, set_current_job
    with RemotePluginProxy('cjm_workers.testing', 'EchoPlugin') as p:
        job = JobContext('job-7f3a', 'echo', lambda msg: None)
        set_current_job(job)
        try:
            assert p.execute(text='runs') ['text'] == 'runs'
            job.cancel()
            with pytest.raises(RemoteCancelledError) as e:
                p.execute(text='never')
        finally: set_current_job(None)
        assert str(e.value) == 'job job-7f3a: the call to cjm_workers.testing.EchoPlugin was cancelled (cancelled before it was sent)'
        assert p.get_stats()['executions'] == 1 and p._calls == set()


def wait_until_sync(predicate, timeout=10.0):
    import time
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end: return False
        time.sleep(0.005)
    return True


def test_token_is_required_by_the_proxys_worker():
    import httpx
    with RemotePluginProxy('cjm_workers.testing', 'EchoPlugin') as p:
        assert httpx.get(p.base_url + '/health', trust_env=False).status_code == 200
        assert httpx.post(p.base_url + '/execute', json={}, trust_env=False).status_code == 401
        p.token = 'wrong'
        p._client.headers['Authorization'] = 'Bearer wrong'
        with pytest.raises(RemoteWorkerError, match='refused the token'):
            p.execute(text='x')


def test_parent_death_ends_the_proxys_worker(tmp_path):
    script = tmp_path / 'app.py'
    script.write_text(textwrap.dedent('''
        import sys, time
        from cjm_workers.remote.proxy import RemotePluginProxy
        p = RemotePluginProxy('cjm_workers.testing', 'SlowPlugin').start()
        sys.stdout.write(f"{p.pid}\\n"); sys.stdout.flush()
        p.execute(seconds=600)
    '''))
    app = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(app.stdout.readline())
        assert not gone(worker)
        app.kill(); app.wait()
        assert wait_gone([worker]) == []
    finally:
        if app.poll() is None: app.kill()


# ---------------------------------------------------------------- a job manager on remote plugins


def remote_manager(track, config=None, **spec_kw):
    events = RecordingBroadcaster()
    specs = [RemotePluginSpec('transcribe', 'cjm_workers.testing', 'TranscribePlugin'),
             RemotePluginSpec('tokens', 'cjm_workers.testing', 'TokenStreamPlugin', streams=True),
             RemotePluginSpec('slow', 'cjm_workers.testing', 'SlowPlugin'),
             RemotePluginSpec('crash', 'cjm_workers.testing', 'CrashPlugin')]
    mgr = track(ReferenceJobManager(worker_config=WorkerConfig(**(config or {})), event_broadcaster=events,
                                    entry_point=remote_worker_entry(specs)))
    return mgr, events


def worker_tree(mgr):
    "Pids of the manager's worker processes and all their descendants (the Universal Workers among them)."
    out = []
    for s in mgr.get_worker_stats():
        pid = s.get('pid')
        if pid is None: continue
        try: out += [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess: pass
    return out


async def test_progress_and_chunk_events_from_remote_plugins(track):
    mgr, events = remote_manager(track)
    await mgr.start()
    t = await mgr.wait_for_job((await mgr.start_job('transcribe', steps=4, delay=0.02)).id, timeout=60)
    s = await mgr.wait_for_job((await mgr.start_job('tokens', text='one two three', delay=0.01)).id, timeout=60)
    await mgr.flush_events()
    assert t.status == 'completed' and t.result['text'] == 'clip.wav: segment1 segment2 segment3 segment4'
    kinds = events.of(t.id)
    assert kinds[:2] == ['pending', 'started'] and kinds[-1] == 'completed' and set(kinds[2:-1]) == {'progress'}, kinds
    # the app polls a remote plugin's progress (the latest value, long-polled): on a busy machine two reports can fall
    # between polls and arrive as one; the order holds, and the last one goes out before the result
    prog = [d['progress'] for k, d in events.events if k == 'reference:progress' and d['job_id'] == t.id]
    assert prog == sorted(set(prog)) and set(prog) <= {0.25, 0.5, 0.75, 1.0} and prog[-1] == 1.0, prog
    assert s.status == 'completed' and s.result['text'] == 'one two three'
    assert [d['chunk'] for k, d in events.events if k == 'reference:chunk' and d['job_id'] == s.id] == ['one ', 'two ', 'three']


async def test_cancel_reaches_the_remote_plugin(track):
    mgr, events = remote_manager(track, config=dict(cancel_grace_seconds=30))
    await mgr.start()
    job = await mgr.start_job('transcribe', steps=500, delay=0.01)
    await wait_until(lambda: (mgr.get_job(job.id).progress or 0) > 0.01, timeout=60)
    tree = worker_tree(mgr)
    await mgr.cancel_job(job.id)
    job = await mgr.wait_for_job(job.id, timeout=20)  # well inside the grace period: the plugin stopped itself
    assert job.status == 'cancelled'
    assert worker_tree(mgr) == tree  # cooperative: nothing was killed, the Universal Worker keeps its model loaded
    again = await mgr.wait_for_job((await mgr.start_job('transcribe', steps=2, delay=0)).id, timeout=60)
    assert again.status == 'completed'


async def test_plugin_ignoring_cancel_is_killed_with_its_universal_worker(track):
    mgr, events = remote_manager(track, config=dict(cancel_grace_seconds=0.5))
    await mgr.start()
    job = await mgr.start_job('slow', seconds=120, ignore_cancel=True, spawn_child=True)
    await wait_until(lambda: (mgr.get_job(job.id).progress_message or '').startswith('child:'), timeout=60)
    tree = worker_tree(mgr)
    child = int(mgr.get_job(job.id).progress_message.split(':')[1])
    assert child in tree and len(tree) >= 3  # worker process → Universal Worker → the plugin's child
    await mgr.cancel_job(job.id)
    job = await mgr.wait_for_job(job.id, timeout=30)
    assert job.status == 'cancelled'
    assert wait_gone(tree) == []  # the whole tree, Universal Worker and the plugin's child included
    again = await mgr.wait_for_job((await mgr.start_job('slow', seconds=0)).id, timeout=60)
    assert again.status == 'completed'


async def test_universal_worker_crash_fails_the_job_then_recovers(track):
    mgr, events = remote_manager(track)
    await mgr.start()
    job = await mgr.wait_for_job((await mgr.start_job('crash', mode='sigkill')).id, timeout=60)
    assert job.status == 'failed'
    assert 'RemoteWorkerError' in job.error and 'killed by SIGKILL' in job.error, job.error
    assert not [p for p in descendants() if 'cjm_workers.remote.worker' in ' '.join(p.cmdline()) and
                'CrashPlugin' in p.cmdline()]  # the dead one is not left behind
    ok = await mgr.wait_for_job((await mgr.start_job('crash', mode='unknown')).id, timeout=60)
    assert ok.status == 'failed' and "unknown crash mode 'unknown'" in ok.error  # a fresh Universal Worker ran it
    tree = worker_tree(mgr)
    assert len(tree) >= 2  # the worker process and its Universal Worker
    await mgr.ashutdown()
    assert wait_gone(tree) == []  # shutdown leaves no Universal Worker behind


async def test_a_remote_workers_stderr_stays_out_of_the_job_error_clients_see(track, tmp_path):
    """Security review: when a Universal Worker died, the job's `error` (which pages and JSON show to clients even
    without `show_traceback`) carried its stderr: what the plugin printed, tracebacks with the app's paths. The
    stderr now goes to the job's server-side `traceback`; the worker's own error line stays in the error."""
    (tmp_path / 'leaky_plugin.py').write_text(
        'import sys\nsys.stderr.write("API_KEY=sk-secret-123\\n")\nraise RuntimeError("CUDA not available")\n')
    spec = RemotePluginSpec('leaky', 'leaky_plugin', 'Plugin', cwd=str(tmp_path), env={'PYTHONPATH': str(tmp_path)})
    mgr = track(ReferenceJobManager(entry_point=remote_worker_entry([spec])))
    await mgr.start()
    job = await mgr.wait_for_job((await mgr.start_job('leaky')).id, timeout=60)
    assert job.status == 'failed' and 'CUDA not available' in job.error, job.error
    assert 'sk-secret' not in job.error and 'sk-secret' in job.traceback, (job.error, job.traceback)
    await mgr.ashutdown()

async def test_cancel_while_the_plugin_loads_stops_the_load(track, tmp_path):
    "A cancel that arrives while the Universal Worker runs initialize() reaches it: the load stops, nothing is killed."
    journal = tmp_path / 'journal'
    spec = RemotePluginSpec('slowload', '_r_plugins', 'SlowLoad', cwd=TESTS,  # its load takes 30 s
                            env={'PYTHONPATH': WORKER_PATH, 'R_JOURNAL': str(journal)})
    mgr = track(ReferenceJobManager(worker_config=WorkerConfig(cancel_grace_seconds=60),
                                    entry_point=remote_worker_entry([spec])))
    await mgr.start()
    job = await mgr.start_job('slowload', seconds=0)
    await wait_until(lambda: journal.exists() and 'loading' in journal.read_text(), timeout=60)
    worker = mgr.jobs[job.id].worker_pid
    await mgr.cancel_job(job.id)
    job = await mgr.wait_for_job(job.id, timeout=20)  # far less than the load, and inside the grace period
    assert job.status == 'cancelled' and job.reason == 'cancelled on request', (job.status, job.reason)
    assert journal.read_text().split('\n')[:-1] == ['loading', 'load stopped']
    assert [s['pid'] for s in mgr.get_worker_stats()] == [worker]  # cooperative: the worker process was not killed


async def test_a_partial_result_survives_the_cancel(track):
    "A remote plugin that stops early on a cancel and returns what it has: the cancelled job keeps it, as a local one."
    spec = RemotePluginSpec('softstop', '_r_plugins', 'SoftStop', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH})
    mgr = track(ReferenceJobManager(worker_config=WorkerConfig(cancel_grace_seconds=60),
                                    entry_point=remote_worker_entry([spec])))
    await mgr.start()
    job = await mgr.start_job('softstop', n=3000)
    await wait_until(lambda: (mgr.get_job(job.id).progress or 0) > 0, timeout=60)
    await mgr.cancel_job(job.id)
    job = await mgr.wait_for_job(job.id, timeout=20)
    assert job.status == 'cancelled' and job.result is not None, (job.status, job.result)
    assert job.result['metadata'] == {'partial': True} and job.result['text'].endswith(' of 3000'), job.result


async def test_a_remote_plugin_sees_its_jobs_attempt_as_a_local_one_does(track):
    """A retry's attempt and its job's id reach the plugin in its Universal Worker (`current_job()`), as in a worker
    process. (Remote review: `current_job().job_id` was the proxy's id of the call, another one each attempt, so a
    plugin had no key to find what an earlier run of its job left.)"""
    spec = RemotePluginSpec('attempts', '_r_plugins', 'Attempts', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH})
    class OddIds(ReferenceJobManager):  # an id that is no plain header value
        def create_job(self, plugin_id, **kw): return ReferenceJob(id='job/ü 1\t%', plugin_id=plugin_id, params=kw)
    mgr = track(OddIds(entry_point=remote_worker_entry([spec])))
    job = await mgr.wait_for_job((await mgr.start_job('attempts', succeed_at=3, max_retries=3,
                                                     retry_backoff_seconds=0.01)).id, timeout=60)
    assert (job.status, job.attempts, job.result) == ('completed', 3, {'attempt': 3, 'job_id': job.id}), (job.status, job.error)
    assert [a['error'] for a in job.attempt_log] == [f'RemotePluginError: RuntimeError: attempt {n} of job {job.id} fails'
                                                     for n in (1, 2)]


async def test_stream_items_and_errors_as_with_a_local_plugin(track):
    "Items that are not strings become str(item), as the worker process does for local plugins; the plugin's own traceback reaches the job."
    events = RecordingBroadcaster()
    spec = RemotePluginSpec('flaky', '_r_plugins', 'FlakyPlugin', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH}, streams=True)
    mgr = track(ReferenceJobManager(event_broadcaster=events, entry_point=remote_worker_entry([spec])))
    await mgr.start()
    job = await mgr.wait_for_job((await mgr.start_job('flaky')).id, timeout=60)
    await mgr.flush_events()
    assert [d['chunk'] for t, d in events.events if t == 'reference:chunk'] == ['first', str({'second': 2})]
    assert job.status == 'failed' and 'RuntimeError: broke after two items' in job.error, job.error
    assert 'raise RuntimeError("broke after two items")' in job.traceback  # a line of the plugin-side traceback


# ---------------------------------------------------------------- unruly plugins, stream return values, cancels at start


def unruly_spec(**kw):
    return RemotePluginSpec('unruly', '_r_plugins', 'Unruly', cwd=TESTS, **{'env': {'PYTHONPATH': WORKER_PATH}, **kw})


def test_what_a_plugin_raises_is_its_error_and_the_next_call_works():
    "SystemExit, KeyboardInterrupt, a message UTF-8 cannot encode: each a RemotePluginError with the plugin's traceback; every next call succeeds."
    texts = {'sysexit': 'SystemExit: 4 (the plugin called sys.exit; the worker serves on)',
             'kbint': 'KeyboardInterrupt (raised by the plugin; the worker serves on)',
             'surrogate': 'RuntimeError: bad ?'}
    with RemotePluginProxy('_r_plugins', 'Unruly', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH}) as p:
        pid = p.execute()['pid']
        for i in range(12):
            what = list(texts)[i % 3]
            with pytest.raises(RemotePluginError) as e: p.execute(raise_=what)
            assert str(e.value) == texts[what] and 'raise _raised(raise_)' in e.value.remote_traceback
            assert p.execute() == {'pid': pid}  # the same worker, its plugin still loaded; no connection reset
        with pytest.raises(RemotePluginError, match='SystemExit: 4'): list(p.execute_stream(raise_='sysexit'))
        assert p.execute() == {'pid': pid} and p.alive


def test_execute_stream_returns_the_plugins_return_value():
    items = ['a', {'return': 1}, {'item': 2}, {'error': 'not one'}]  # items shaped like the protocol's own lines
    with RemotePluginProxy('_r_plugins', 'Unruly', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH}) as p:
        stream, got = p.execute_stream(items=items, ret={'finish_reason': 'length', 'tokens': 4}), []
        while True:
            try: got.append(next(stream))
            except StopIteration as stop: returned = stop.value; break
        assert got == items and returned == {'finish_reason': 'length', 'tokens': 4}

        async def in_async(): return [x async for x in p.aexecute_stream(items=items, ret=1)]
        assert asyncio.run(in_async()) == items  # the return line is not an item



async def test_aexecute_stream_gives_the_plugins_return_value_to_its_caller():
    "As `execute_stream` returns it: the `RemoteStream` has it as `value` once the stream has ended; the items stay the plugin's alone."
    from collections.abc import AsyncGenerator
    items = ['a', {'return': 1}, {'item': 2}, {'error': 'not one'}]  # items shaped like the protocol's own lines
    async with RemotePluginProxy('_r_plugins', 'Unruly', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH}) as p:
        stream = p.aexecute_stream(items=items, ret={'finish_reason': 'length', 'tokens': 4})
        assert isinstance(stream, AsyncGenerator) and stream.value is None  # nothing sent yet
        assert [x async for x in stream] == items
        assert stream.value == {'finish_reason': 'length', 'tokens': 4}
        plain = p.aexecute_stream(items=['x'])  # its generator returns nothing
        assert [x async for x in plain] == ['x'] and plain.value is None
        failing, got = p.aexecute_stream(items=['x', 'y'], raise_='sysexit', ret=5), []
        with pytest.raises(RemotePluginError, match='SystemExit: 4'):
            async for x in failing: got.append(x)
        assert got == ['x'] and failing.value is None  # a failed stream returned nothing
        early = p.aexecute_stream(items=['x', 'y', 'z'], ret=7)
        assert await anext(early) == 'x'
        await early.aclose()  # closed before its end: no value, and the plugin is free again
        assert early.value is None and await p.aexecute() == {'pid': p.pid}

async def test_a_streams_return_value_is_the_jobs_result_as_locally(track):
    "As docs/plugins.md says of a local plugin: the returned dict is the result, its `text` the whole stream; no `metadata` added."
    events = RecordingBroadcaster()
    mgr = track(ReferenceJobManager(event_broadcaster=events, entry_point=remote_worker_entry([unruly_spec(streams=True)])))
    await mgr.start()
    job = await mgr.wait_for_job((await mgr.start_job('unruly', items=['tok0 ', 'tok1 ', {'return': 1}],
                                                      ret={'finish_reason': 'length', 'tokens': 3})).id, timeout=60)
    await mgr.flush_events()
    assert job.status == 'completed', (job.status, job.error)
    assert job.result == {'finish_reason': 'length', 'tokens': 3, 'text': "tok0 tok1 {'return': 1}"}, job.result
    assert [d['chunk'] for t, d in events.events if t == 'reference:chunk'] == ['tok0 ', 'tok1 ', "{'return': 1}"]
    plain = await mgr.wait_for_job((await mgr.start_job('unruly', items=['x', 'y'])).id, timeout=60)  # returns nothing
    assert plain.result == {'text': 'xy', 'metadata': {}}, plain.result


async def test_a_cancel_while_the_universal_worker_starts_kills_it_at_once(track):
    "The plugin module takes 60 s to import: a cancel does not wait for it; the starting Universal Worker is killed."
    spec = unruly_spec(env={'PYTHONPATH': WORKER_PATH, 'R_IMPORT_SECONDS': '60'}, start_timeout=120)
    mgr = track(ReferenceJobManager(worker_config=WorkerConfig(cancel_grace_seconds=60), entry_point=remote_worker_entry([spec])))
    await mgr.start()
    job = await mgr.start_job('unruly')
    starting = lambda: [p for p in descendants() if '_r_plugins' in p.cmdline() and 'Unruly' in p.cmdline()]
    await wait_until(lambda: starting(), timeout=60)
    uw = starting()
    worker = mgr.jobs[job.id].worker_pid
    await mgr.cancel_job(job.id)
    job = await mgr.wait_for_job(job.id, timeout=15)  # far less than the import
    assert job.status == 'cancelled' and job.reason == 'cancelled on request', (job.status, job.reason, job.error)
    assert wait_gone([p.pid for p in uw]) == []
    assert [s['pid'] for s in mgr.get_worker_stats()] == [worker]  # only the starting Universal Worker was killed


def test_proxy_cancel_during_start_stops_the_start():
    p = RemotePluginProxy('_r_plugins', 'Unruly', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH, 'R_IMPORT_SECONDS': '60'},
                          start_timeout=120)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(p.start)
        assert wait_until_sync(lambda: p._starting is not None)
        assert p.cancel() == {'status': 'cancelled', 'running': False}
        with pytest.raises(RemoteCancelledError, match=r'the start of the worker for _r_plugins.Unruly was cancelled'):
            fut.result(10)
    assert not p.alive
    p.stop()


from _r_plugins import QUITTERS  # noqa: E402  (the plugin module the Universal Worker tests write)


async def test_a_constructor_that_exits_fails_the_start_and_the_job_like_one_that_raises(tmp_path, track):
    """sys.exit(4) or a KeyboardInterrupt in the plugin's constructor: the proxy's RemoteWorkerError and the job's error
    are those of a constructor raising ValueError (exit code 2, the worker's message naming the exception and the
    class); the job manager's worker process is unharmed and serves the next job."""
    (tmp_path / '_r_quitters.py').write_text(QUITTERS)
    path = os.pathsep.join([str(tmp_path), TESTS])
    for cls, why in (('Raises', 'ValueError: no GPU'), ('Exits', 'SystemExit: 4; the plugin called sys.exit'),
                     ('Interrupted', 'KeyboardInterrupt')):
        p = RemotePluginProxy('_r_quitters', cls, cwd=TESTS, env={'PYTHONPATH': path})
        with pytest.raises(RemoteWorkerError) as e: await p.astart()
        assert f"the worker for _r_quitters.{cls} exited with code 2 before it was ready" in str(e.value), str(e.value)
        assert f"error: creating _r_quitters.{cls}() failed ({why})" in str(e.value), str(e.value)
        assert not p.alive
    specs = [RemotePluginSpec('exits', '_r_quitters', 'Exits', cwd=TESTS, env={'PYTHONPATH': path}), unruly_spec()]
    mgr = track(ReferenceJobManager(entry_point=remote_worker_entry(specs)))
    await mgr.start()
    for _ in range(2):  # the start is tried again for the next job, and fails the same way
        job = await mgr.wait_for_job((await mgr.start_job('exits')).id, timeout=60)
        assert job.status == 'failed' and 'RemoteWorkerError' in job.error, (job.status, job.error)
        assert 'exited with code 2 before it was ready' in job.error, job.error
        assert 'creating _r_quitters.Exits() failed (SystemExit: 4; the plugin called sys.exit)' in job.error, job.error
    worker = mgr.jobs[job.id].worker_pid
    assert worker is not None
    ok = await mgr.wait_for_job((await mgr.start_job('unruly')).id, timeout=60)
    assert ok.status == 'completed' and mgr.jobs[ok.id].worker_pid == worker, (ok.status, ok.error)


def test_async_clients_close_on_their_own_event_loops():
    """Each event loop that called the proxy gets an async HTTP client. It is closed when its loop shuts down (each
    `asyncio.run` here), and `stop()` closes a running loop's on that loop; before, they were dropped open, and their
    sockets leaked until garbage collection (ResourceWarning: unclosed transport)."""
    import gc, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', ResourceWarning)
        p = RemotePluginProxy('_r_plugins', 'FlakyPlugin', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH}).start()
        try:
            for _ in range(3): assert asyncio.run(p.aexecute(n=1)) == {'ok': True, 'kwargs': {'n': 1}}
            assert p._aclients == {}  # each closed with its loop
            loop = asyncio.new_event_loop()
            t = threading.Thread(target=loop.run_forever)
            t.start()
            try:
                assert asyncio.run_coroutine_threadsafe(p.aexecute(), loop).result(30) == {'ok': True, 'kwargs': {}}
                (_, client, _), = p._aclients.values()
                p.stop()  # from this thread, while that loop runs
                assert client.is_closed
            finally:
                loop.call_soon_threadsafe(loop.stop); t.join(10); loop.close()
        finally: p.stop()
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_a_call_the_caller_gives_up_on_is_cancelled_on_the_worker():
    """Remote review: a call that hit `request_timeout` went on running on the worker, and so did the calls queued
    behind it, for nobody, after their callers had failed (and the timeout read "cannot be reached"). The proxy now
    cancels a call it stops waiting for, and says it timed out."""
    with RemotePluginProxy('cjm_workers.testing', 'SlowPlugin', request_timeout=1.0) as p:
        t = time.monotonic()
        with pytest.raises(RemoteWorkerError, match=r'did not answer in time \(request_timeout=1.0\); the worker was told to cancel it'):
            p.execute(seconds=30)
        prog = p.get_progress()
        while prog['running']: prog = p.get_progress(since=prog['seq'], wait=5)  # the plugin stopped...
        assert time.monotonic() - t < 5
        assert p.execute(seconds=0.1)['text'] == 'slept 0.1s'  # ...and the next call runs at once

    async def main():
        async with RemotePluginProxy('cjm_workers.testing', 'SlowPlugin') as p:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(p.aexecute(seconds=30), 0.5)  # a cancelled task
            t = time.monotonic()
            assert (await p.aexecute(seconds=0.1))['text'] == 'slept 0.1s' and time.monotonic() - t < 5
    asyncio.run(main())


def test_a_progress_bar_on_stderr_is_kept_as_its_last_state_and_long_lines_are_cut():
    """Remote review: the proxy kept a stderr "line" until its newline, so a tqdm-style bar (redrawn after '\\r')
    80,000 times made a 6.6 MB line that a crash then pasted into its error message (and a job's traceback)."""
    tests = str(Path(__file__).parent)
    with RemotePluginProxy('_r_plugins', 'BarThenCrash', cwd=tests, env={'PYTHONPATH': WORKER_PATH}) as p:
        with pytest.raises(RemoteWorkerError) as e:
            p.execute()
    msg, tail = str(e.value), e.value.stderr
    assert 'exited with code 3' in msg and len(msg) < 20_000, (len(msg), msg[:300])
    assert 'loading: 80000/80000 |####################|' in tail and 'loading: 1/' not in tail  # what a terminal showed
    assert 'xxxx [... 991,808 more bytes]' in tail and tail.rstrip().endswith('loading: done'), tail[-300:]


async def test_a_spec_sets_the_universal_workers_limits(track):
    """Remote review: `RemotePluginSpec` had no way to raise the Universal Worker's 16 MiB request limit (nor to set a
    call's timeout, the environment it starts from, or its log level), so a job with 17 MB of parameters could not run."""
    spec = RemotePluginSpec('echo', 'cjm_workers.testing', 'EchoPlugin', max_body_bytes=40 * 2**20, request_timeout=30,
                            inherit_env=False, log_level='info')
    p = spec.proxy()
    assert (p.max_body_bytes, p.request_timeout, p.inherit_env, p.log_level) == (40 * 2**20, 30, False, 'info')
    mgr = track(ReferenceJobManager(entry_point=remote_worker_entry([spec])))
    job = await mgr.wait_for_job((await mgr.start_job('echo', text='x' * 17_000_000)).id, timeout=60)
    assert job.status == 'completed' and len(job.result['text']) == 17_000_000, (job.status, (job.error or '')[:300])


async def test_a_workers_cpu_counts_its_universal_worker(track):
    """Remote review: `get_worker_stats()` gave the CPU % of the worker process alone (a plugin burning a core in its
    Universal Worker showed as 1.6 %), while the RSS was the whole tree's. Both are the tree's now."""
    spec = RemotePluginSpec('burn', '_r_plugins', 'Burn', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH})
    mgr = track(ReferenceJobManager(entry_point=remote_worker_entry([spec])))
    job = await mgr.start_job('burn', seconds=30)
    await wait_until(lambda: mgr.get_job(job.id).status == 'running', 30)
    await asyncio.sleep(0.5)  # the Universal Worker has started and burns
    mgr.get_worker_stats()  # the first look starts the measurement of processes seen for the first time
    await asyncio.sleep(1.0)
    cpu = mgr.get_worker_stats()[0]['cpu_percent']
    assert cpu > 30, cpu
    await mgr.cancel_job(job.id)


def test_a_call_that_times_out_while_it_waits_its_turn_never_runs(tmp_path):
    """Newest-features review: a call that timed out while queued behind another still ran later, for nobody: the proxy
    waited half a second (for a worker that might be dying) before it sent the call's cancel, and by then the call had
    had its turn. Also: its error said "it was cancelled" of a call the worker was only asked to cancel."""
    journal = tmp_path / 'journal'
    with RemotePluginProxy('_r_plugins', 'Gate', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH, 'R_JOURNAL': str(journal)},
                           request_timeout=1.0) as p:
        out = {}
        def call(tag, seconds):
            try: out[tag] = p.execute(tag=tag, seconds=seconds)
            except RemoteWorkerError as e: out[tag] = e
        items = p.execute_stream(tag='A', n=12, gap=0.1)  # 1.2 s in all, an item every 0.1 s: never a timeout
        assert next(items) == 0
        time.sleep(0.05)
        b = threading.Thread(target=call, args=('B', 0.2))  # its turn comes at 1.1 s, after its timeout
        b.start()
        assert list(items) == list(range(1, 12))
        b.join()
        assert isinstance(out['B'], RemoteWorkerError) and 'the worker was told to cancel it' in str(out['B']), out['B']
        time.sleep(0.5)  # (B, had it run, would have ended by now)
        assert p.execute(tag='C') == {'tag': 'C'}
    assert journal.read_text().split('\n')[:-1] == ['start A', 'done A', 'start C', 'done C']


async def test_a_stream_closed_early_is_cancelled_on_the_worker(tmp_path):
    """Newest-features review: closing a remote stream before its end stopped the reading, but the plugin went on to
    its next item (4 s away), holding up the next call that long: the proxy now cancels the call, as for a timeout."""
    journal = tmp_path / 'journal'
    with RemotePluginProxy('_r_plugins', 'Gate', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH, 'R_JOURNAL': str(journal)}) as p:
        s = p.execute_stream(tag='sync', n=5, gap=2)  # closed while the plugin waits 2 s before its next item
        assert next(s) == 0
        s.close()
        assert p.execute(tag='after') == {'tag': 'after'}
        s = p.aexecute_stream(tag='async', n=5, gap=2)
        async for item in s: break
        await s.aclose()
        assert await p.aexecute(tag='after2') == {'tag': 'after2'}
    lines = journal.read_text().split('\n')[:-1]
    assert lines == ['start sync', 'stopped sync JobCancelledError', 'start after', 'done after',  # (not closed at its
                     'start async', 'stopped async JobCancelledError', 'start after2', 'done after2'], lines  # next yield)


DROPPED_STREAMS = """
import asyncio, gc, logging, sys
logging.basicConfig()
from cjm_workers.remote.proxy import RemotePluginProxy
KEEP = []
async def main(p):
    s = p.aexecute_stream(tag='timed', n=5, gap=2)
    await s.__anext__()
    try: await asyncio.wait_for(s.__anext__(), 0.3)  # times out: the stream is left mid-item
    except asyncio.TimeoutError: pass
    del s; gc.collect(); await asyncio.sleep(0.5)
    s = p.aexecute_stream(tag='kept', n=5, gap=2)
    async for item in s: break
    KEEP.append(s)  # still open when the loop ends: asyncio.run closes it
with RemotePluginProxy('_r_plugins', 'Gate', cwd=sys.argv[1], env={'PYTHONPATH': sys.argv[1], 'R_JOURNAL': sys.argv[2]}) as p:
    asyncio.run(main(p))
"""

def test_an_async_stream_dropped_without_aclose_is_cancelled_quietly(tmp_path):
    """Last session's leftover: a `RemoteStream` dropped unclosed (after a timed-out `anext`, or still open when its
    loop ends) was cancelled on the worker, but asyncio logged "Task exception was never retrieved ... already
    running" or "error occurred during closing of asynchronous generator" (httpx's stream context manager)."""
    journal = tmp_path / 'journal'
    r = subprocess.run([sys.executable, '-c', DROPPED_STREAMS, TESTS, str(journal)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'Traceback' not in r.stderr and 'never retrieved' not in r.stderr, r.stderr
    assert journal.read_text().split('\n')[:-1] == ['start timed', 'stopped timed JobCancelledError',
                                                     'start kept', 'stopped kept JobCancelledError']


def test_an_async_call_that_times_out_is_cancelled_even_if_its_event_loop_ends_at_once(tmp_path):
    """Review of the day's fix: an async call's cancel was sent by a task of its event loop, which never ran when the
    loop ended with the timeout's error (`asyncio.run` returning): the call queued behind a stream ran later, for nobody."""
    journal = tmp_path / 'journal'
    with RemotePluginProxy('_r_plugins', 'Gate', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH, 'R_JOURNAL': str(journal)},
                           request_timeout=1.0) as p:
        items = p.execute_stream(tag='A', n=14, gap=0.1)  # 1.4 s, an item every 0.1 s
        assert next(items) == 0
        out = {}
        def call():
            try: out['B'] = asyncio.run(p.aexecute(tag='B', seconds=0.2))  # the loop ends with the error
            except RemoteWorkerError as e: out['B'] = e
        t = threading.Thread(target=call)
        t.start()
        assert list(items) == list(range(1, 14))
        t.join()
        assert isinstance(out['B'], RemoteWorkerError), out['B']
        time.sleep(0.6)  # (B, had it run, would have ended by now)
        assert p.execute(tag='C') == {'tag': 'C'}
    assert journal.read_text().split('\n')[:-1] == ['start A', 'done A', 'start C', 'done C']


def test_a_restart_after_the_worker_died_mid_call_ends_what_its_plugin_started(tmp_path):
    """Race review (2026-12-07): a worker killed mid-call (an OOM kill) and started again by `start()` left its plugin's
    children running for good, and with them the old output reader and its pipes; now `start()` first kills what
    remains of the dead worker's process group, then ends its reader and closes its pipes. (Since the worker has a
    backstop, the backstop usually ends the child first, as the worker dies; `start()` does it where there is none.)"""
    journal = tmp_path / 'journal'
    p = RemotePluginProxy('_r_plugins', 'SpawnThenDie', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH, 'R_JOURNAL': str(journal)},
                          stop_timeout=1)
    try:
        p.start()
        with pytest.raises(RemoteWorkerError, match='killed by SIGKILL'): p.execute(die=True)
        child = int(journal.read_text().split()[0])
        old_reader, old_out = p._reader, p.process.stdout
        p.start()
        assert not wait_gone([child], 5), "the dead worker's child outlived the restart"
        assert not old_reader.is_alive() and old_out.closed
        assert p.execute(die=False)['child'] > 0  # the new worker serves
    finally:
        p.stop()
        for pid in map(int, journal.read_text().split()):
            try: os.kill(pid, signal.SIGKILL)
            except ProcessLookupError: pass


@pytest.mark.parametrize('how', ['kill', 'stop'])
def test_kill_and_stop_do_not_wait_for_a_slow_start(how):
    """Race review (2026-12-07): `kill()` and `stop()` from another thread waited for the lock `start()` holds until
    the worker is ready (a slow import: as long as `start_timeout`); now they end the start in progress at once, and
    `start()` raises `RemoteWorkerError` saying which of them was called."""
    p = RemotePluginProxy('_r_plugins', 'Unruly', cwd=TESTS, env={'PYTHONPATH': WORKER_PATH, 'R_IMPORT_SECONDS': '60'},
                          start_timeout=120, stop_timeout=1)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(p.start)
        assert wait_until_sync(lambda: p._starting is not None)
        pid, t = p.pid, time.monotonic()
        getattr(p, how)()
        assert time.monotonic() - t < 5
        with pytest.raises(RemoteWorkerError, match=rf'was stopped \({how}\(\) was called\) while it started'):
            fut.result(10)
    assert not p.alive and not wait_gone([pid], 5)
    p.stop()


def test_a_job_cancelled_just_before_its_worker_starts_does_not_wait_for_the_start():
    """Race review (2026-12-07): a job cancelled while its Universal Worker was being launched (before `start()` had
    registered the process it waits for) was not stopped: `cancel()` found neither a start nor a call, and `start()`
    never looked at the job's flag, so the job waited out the whole start (a slow import); now `start()` checks the
    job's flag once a cancel can find it, and `load_plugin` / a restart check it before they start a worker."""
    from cjm_workers.core.worker import JobContext, set_current_job
    from cjm_workers.remote.adapter import RemotePluginManager
    env = {'PYTHONPATH': WORKER_PATH, 'R_IMPORT_SECONDS': '8'}
    ctx = JobContext('job-1', 'unruly', lambda m: None)
    ctx.cancel()  # what the control thread does first, before it calls the plugin manager's cancel hook
    set_current_job(ctx)
    try:
        p = RemotePluginProxy('_r_plugins', 'Unruly', cwd=TESTS, env=env, start_timeout=60)
        t = time.monotonic()
        with pytest.raises(RemoteCancelledError, match='job job-1: the start of the worker for _r_plugins.Unruly was cancelled'):
            p.start()
        assert time.monotonic() - t < 4 and not p.alive
        p.stop()
        spec = RemotePluginSpec('unruly', '_r_plugins', 'Unruly', cwd=TESTS, env=env)
        pm = RemotePluginManager([spec])
        t = time.monotonic()
        with pytest.raises(RemoteCancelledError, match="job job-1: cancelled before remote plugin 'unruly' was loaded"):
            pm.load_plugin(spec, {})
        assert time.monotonic() - t < 4 and not pm.proxies
        pm.close()
    finally: set_current_job(None)


def test_a_call_whose_client_stop_closed_fails_with_a_remote_worker_error():
    """Race review (2026-12-07): a call made while another thread ran `stop()` read the proxy's HTTP client just before
    `stop()` closed it, and failed with httpx's bare `RuntimeError: Cannot send a request, as the client has been
    closed`; now it fails with `RemoteWorkerError` saying the worker was stopped. The clients are closed here as `stop()`
    closes them first, at the moment such a call has already picked them up."""
    stopped = r'was stopped \(stop\(\) was called, or it was restarted\) before this request was sent'
    with RemotePluginProxy('cjm_workers.testing', 'EchoPlugin', stop_timeout=1) as p:
        async def main():
            assert (await p.aexecute(text='x'))['text']  # this loop's client, now made
            await (await p._aclient()).aclose()
            with pytest.raises(RemoteWorkerError, match=stopped): await p.aexecute(text='x')
            with pytest.raises(RemoteWorkerError, match=stopped): await p.aget_progress()
            with pytest.raises(RemoteWorkerError, match=stopped): [i async for i in p.aexecute_stream(text='x')]
        asyncio.run(main())
        p._client.close()
        for call in (lambda: p.execute(text='x'), p.get_progress, p.get_stats, lambda: list(p.execute_stream(text='x'))):
            with pytest.raises(RemoteWorkerError, match=stopped): call()
        p._client = None  # as `stop()` leaves it, once it has closed it


def test_a_job_is_not_shown_the_progress_of_an_earlier_call_that_runs_on():
    """Race review (2026-12-07): job 1's call timed out but ran on in the worker (its plugin ignores cancels), and job 2,
    whose call waited its turn behind it, was shown job 1's progress as its own: `/progress` did not say which call it
    described; now it names the call (`call`), and a job relays only its own call's reports."""
    from cjm_workers.core.worker import JobContext, set_current_job
    from cjm_workers.remote.adapter import RemotePluginManager
    env = {'PYTHONPATH': os.pathsep.join(p for p in (TESTS, os.environ.get('PYTHONPATH')) if p)}  # (this cjm_workers)
    spec = RemotePluginSpec('stub', '_r_plugins', 'Stubborn', cwd=TESTS, env=env, request_timeout=0.5, stop_timeout=1)
    pm = RemotePluginManager([spec]); pm.load_plugin(spec, {})
    got = {1: [], 2: []}
    try:
        for job in (1, 2):
            ctx = JobContext(f'job{job}', 'stub', lambda m, job=job: got[job].append(m['message']))
            set_current_job(ctx)
            try:
                with pytest.raises(RemoteWorkerError, match='did not answer in time'):
                    pm.execute_plugin('stub', tag=f'job{job}', steps=8 if job == 1 else 2, delay=0.15)
            finally: ctx.end(); set_current_job(None)
        assert got[1] and all(m.startswith('job1') for m in got[1]), got
        assert not [m for m in got[2] if 'job1' in m], got
        p = pm.proxies['stub'].get_progress()
        assert set(p) == {'progress', 'message', 'running', 'seq', 'call'} and p['call']
    finally: pm.close()


def test_a_spec_refuses_a_progress_wait_the_worker_would_refuse():
    """Race review (2026-12-07): `RemotePluginSpec(progress_wait=60)` was accepted, then the worker refused every long
    poll (at most 30 s) and the job's progress silently never arrived; now the spec refuses it with a `ValueError`."""
    for bad in (60, 30.5, 0, -1, True, '5', float('nan'), None):
        with pytest.raises(ValueError, match=r'progress_wait must be a number of seconds above 0 and at most 30'):
            RemotePluginSpec('t', 'cjm_workers.testing', 'TranscribePlugin', progress_wait=bad)
    for good in (0.1, 5, 30): assert RemotePluginSpec('t', 'cjm_workers.testing', 'TranscribePlugin', progress_wait=good)


_choose_pids = pytest.mark.skipif(not can_choose_pids(), reason="giving a process a chosen pid needs root (ns_last_pid)")

@_choose_pids
def test_a_restart_does_not_kill_the_process_group_that_took_the_dead_workers_pid():
    """Pid-reuse review (2026-12-07): a worker that died (an OOM kill) was reaped as soon as anyone asked `alive`, and
    `start()` then SIGKILLed the process group with the dead worker's id, which by then could lead another process (a
    group of the app's, or of anyone else's). Now nothing reaps the worker before its group is killed: until then its
    id stays its own, and no other process can be given it. (The kernel is asked for the id, as pid reuse would.)"""
    p, stranger = RemotePluginProxy('cjm_workers.testing', 'SlowPlugin', stop_timeout=1), None
    try:
        p.start(); old = p.pid
        os.kill(old, signal.SIGKILL)  # the worker dies
        assert wait_until_sync(lambda: not p.alive)
        stranger = stranger_with_pid(old)  # an unrelated process leading its own group, given the id if it is free
        p.start()  # kills what is left of the dead worker's group, then starts a worker
        assert wait_gone([stranger], 1), f"the restart killed pid {stranger}'s process group (the dead worker's was {old})"
        assert stranger != old and p.execute(seconds=0)['text'] == 'slept 0s'
    finally:
        p.stop()
        if stranger is not None: os.kill(stranger, signal.SIGKILL)


@_choose_pids
def test_kill_or_stop_after_the_worker_was_reaped_spares_the_process_now_given_its_pid():
    """Pid-reuse review (2026-12-07): `kill()` again (or `stop()`) after a `kill()` listed and SIGKILLed the
    descendants and the process group of whatever process had the reaped worker's id by then. Now a reaped worker's
    id is not signalled at all."""
    p = RemotePluginProxy('cjm_workers.testing', 'SlowPlugin', stop_timeout=1).start()
    old = p.pid
    p.kill()  # killed and reaped: the id is free
    stranger = stranger_with_pid(old)
    try:
        if stranger != old: pytest.skip(f"another process took pid {old} first")
        p.kill()
        assert wait_gone([stranger], 1), "kill() killed the process given the reaped worker's pid"
        p.stop()
        assert wait_gone([stranger], 1), "stop() killed the process given the reaped worker's pid"
    finally:
        p.stop()
        os.kill(stranger, signal.SIGKILL)


def test_a_restart_is_not_woken_by_the_end_of_the_dead_workers_output(tmp_path):
    """Race review (2026-12-07): a worker killed (an OOM kill) while a child of its plugin, in a session of its own,
    held its stdout/stderr: `start()` waits 2 s for the old output reader, then starts a new worker; when the child
    later closed the pipes, the OLD reader set the proxy's one ready event, and the NEW start, woken with no ready
    line, killed its worker ('did not start serving within 60 s'). Now each start has an event of its own, and a
    reader of an earlier worker only logs."""
    mark = tmp_path / 'slow'
    p = RemotePluginProxy('_r_plugins', 'SessionChildThenDie', cwd=TESTS, stop_timeout=1,
                          env={'PYTHONPATH': WORKER_PATH, 'R_SLOW_MARK': str(mark), 'R_SLOW_SECONDS': '6'})
    try:
        p.start()
        with pytest.raises(RemoteWorkerError, match='killed by SIGKILL'): p.execute(child_seconds=4.5)
        mark.touch()  # the child ends after start() stops waiting for the old reader (2 s), while the new worker
        p.start()     # constructs its plugin (6 s)
        assert p.alive and p.health()['status'] == 'ok'
    finally: p.stop()


def test_the_async_clients_of_loops_closed_without_shutdown_are_let_go():
    """Leak review (2026-12-07): an async call from an event loop then closed without `shutdown_asyncgens()`
    (`run_until_complete`, then `close()`) left the proxy holding that loop, its `httpx.AsyncClient` and the client's
    kept-alive socket until `stop()`: one more fd per such loop. Now a new loop's first call drops those of closed
    loops, and their sockets close as they are collected."""
    import gc
    me = psutil.Process()
    with RemotePluginProxy('cjm_workers.testing', 'EchoPlugin') as p:
        def connections(): return sum(1 for c in me.net_connections('tcp') if c.raddr and c.raddr.port == p.port)
        for i in range(30):
            loop = asyncio.new_event_loop()
            try: assert loop.run_until_complete(p.aexecute(text=str(i)))['text'] == str(i)
            finally: loop.close()
        gc.collect()
        assert len(p._aclients) <= 1, f"{len(p._aclients)} async clients of closed loops kept"
        assert connections() <= 2, f"{connections()} connections to the worker open"  # (the last loop's, kept)


def test_stop_ends_a_dead_workers_child_that_holds_its_output_and_the_output_reader(tmp_path):
    """Leak review (2026-12-07): `stop()` after the worker died (an OOM kill) while a child of its plugin, in a session
    of its own, held its stdout/stderr left that child running (out of the worker's group, and no longer its child,
    nothing found it), and closed the pipes under the output reader (after waiting 2 s for it): the reader then waited
    on a selector left with nothing to watch, for good (a thread and an epoll fd per such stop). Now what holds the
    worker's output after it is killed is killed too, and a reader still reading closes the pipes itself."""
    journal = tmp_path / 'journal'
    p = RemotePluginProxy('_r_plugins', 'SessionChildThenDie', cwd=TESTS, stop_timeout=1,
                          env={'PYTHONPATH': WORKER_PATH, 'R_JOURNAL': str(journal)})
    child = None
    try:
        p.start()
        with pytest.raises(RemoteWorkerError, match='killed by SIGKILL'): p.execute(child_seconds=300)
        child = psutil.Process(int(journal.read_text().split()[0]))
        reader, out = p._reader, p.process.stdout
        p.stop()
        assert not wait_gone([child], 5), "stop() left the dead worker's child running"
        reader.join(10)
        assert not reader.is_alive(), "the output reader never ended"
        assert out.closed
    finally:
        p.stop()
        if child is not None and not gone(child): child.kill()


# ---------------------------------------------------------------- what a remote plugin started ends with its worker

from test_remote_worker import assert_escapees_end, escapee_pids  # noqa: E402
HERE = os.pathsep.join(filter(None, [TESTS, os.environ.get('PYTHONPATH')]))  # the plugins, and this cjm_workers


@pytest.mark.parametrize('how', ['kill', 'oom'])
def test_what_a_remote_plugin_started_ends_when_its_worker_is_killed(how, tmp_path):
    """`kill()` (a hard cancel), or the OS SIGKILLing the worker mid-call: the plugin's processes outside the worker's
    group end too (before, a double-forked daemon, one that closed its descriptors and a shell's `setsid cmd &` ran on;
    and after an OOM kill the call hung: the daemon held the connection open)."""
    p = RemotePluginProxy('_r_plugins', 'Escapees', cwd=TESTS, env={'PYTHONPATH': HERE}).start()
    pidfile, out = str(tmp_path / 'pids.json'), {}
    def call():
        try: out['result'] = p.execute(pidfile=pidfile, end='sleep')
        except Exception as e: out['error'] = e
    t = threading.Thread(target=call, daemon=True); t.start()
    try:
        pids = escapee_pids(pidfile)
        if how == 'kill': p.kill()
        else: os.kill(p.pid, signal.SIGKILL)
        t.join(30)  # hang guard
        assert isinstance(out.get('error'), RemoteWorkerError), out
        if how == 'oom': assert 'killed by SIGKILL' in str(out['error']), out
        assert_escapees_end(pids)
    finally: p.stop()


def test_what_a_remote_plugin_started_ends_with_the_app(tmp_path):
    "The app (the proxy's process, the worker's --ppid) SIGKILLed mid-call: the worker's watchdog ends it all."
    pidfile = str(tmp_path / 'pids.json')
    script = tmp_path / 'app.py'
    script.write_text(textwrap.dedent(f'''
        from cjm_workers.remote.proxy import RemotePluginProxy
        p = RemotePluginProxy('_r_plugins', 'Escapees', cwd={TESTS!r}, env={{'PYTHONPATH': {HERE!r}}}).start()
        p.execute(pidfile={pidfile!r}, end='sleep')
    '''))
    app = subprocess.Popen([sys.executable, str(script)])
    try:
        pids = escapee_pids(pidfile)
        app.kill(); app.wait(10)
        assert_escapees_end(pids)
    finally:
        if app.poll() is None: app.kill(); app.wait(10)


def _apart(**kw):
    """The spec of `_r_plugins.Escapees` in a Universal Worker started without the app's environment, and so without
    the mark of the worker process that starts it: what its plugin starts carries the Universal Worker's mark alone."""
    return RemotePluginSpec('escapees', '_r_plugins', 'Escapees', cwd=TESTS, inherit_env=False, env={'PYTHONPATH': HERE}, **kw)


async def test_what_a_remote_plugin_started_ends_with_a_hard_cancel_of_its_job(track, tmp_path):
    "The job's worker process is killed with its tree: the Universal Worker's backstop, spared, ends the rest."
    mgr = track(ReferenceJobManager(worker_config=WorkerConfig(cancel_grace_seconds=0), entry_point=remote_worker_entry([_apart()])))
    await mgr.start(wait=True)
    pidfile = str(tmp_path / 'pids.json')
    job = await mgr.start_job('escapees', pidfile=pidfile, end='sleep')
    pids = await asyncio.to_thread(escapee_pids, pidfile)
    await mgr.cancel_job(job.id)
    job = await mgr.wait_for_job(job.id, timeout=30)
    assert job.status == 'cancelled', (job.status, job.error)
    await asyncio.to_thread(assert_escapees_end, pids)


def test_what_a_remote_plugin_started_ends_with_the_app_of_its_job(tmp_path):
    """The app SIGKILLed while a job runs: its worker process ends its descendants (`kill_own_children`), which must
    spare the Universal Worker's backstop (before, it killed it with its worker, and the daemons ran on)."""
    pidfile = str(tmp_path / 'pids.json')
    script = tmp_path / 'app.py'
    script.write_text(textwrap.dedent(f'''
        import asyncio
        from cjm_workers.core.config import WorkerConfig
        from cjm_workers.remote.adapter import RemotePluginSpec, remote_worker_entry
        from cjm_workers.testing import ReferenceJobManager
        async def main():
            spec = RemotePluginSpec('escapees', '_r_plugins', 'Escapees', cwd={TESTS!r}, inherit_env=False,
                                    env={{'PYTHONPATH': {HERE!r}}})  # (as `_apart()`)
            mgr = ReferenceJobManager(worker_config=WorkerConfig(), entry_point=remote_worker_entry([spec]))
            await mgr.start(wait=True)
            await mgr.start_job('escapees', pidfile={pidfile!r}, end='sleep')
            await asyncio.sleep(600)
        if __name__ == '__main__': asyncio.run(main())
    '''))
    app = subprocess.Popen([sys.executable, str(script)])
    try:
        pids = escapee_pids(pidfile)
        app.kill(); app.wait(10)
        assert_escapees_end(pids, 20)
    finally:
        if app.poll() is None: app.kill(); app.wait(10)


def test_stop_and_a_dead_workers_error_in_an_app_with_over_1024_descriptors_open():
    """A busy app (many connections) has descriptors numbered above 1024: the proxy waited for its worker to end with
    `select.select` on a pidfd, which refuses those (`ValueError: filedescriptor out of range in select()`): `stop()`
    raised and left the worker running, and a call whose worker died raised that instead of `RemoteWorkerError`. It
    waits with `core.process.wait_ended` now (poll)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200: pytest.skip(f"at most {hard} descriptors may be open here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = []
    try:
        held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # the next ones are numbered above 1024
        p = RemotePluginProxy('cjm_workers.testing', 'CrashPlugin').start()
        try:
            with pytest.raises(RemoteWorkerError, match='killed by SIGKILL'): p.execute(mode='sigkill')
        finally: p.stop()
        p = RemotePluginProxy('cjm_workers.testing', 'SlowPlugin').start()
        worker = p.process
        p.stop()
        assert worker.returncode is not None and p.process is None
    finally:
        for fd in held: os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
