"""The Universal Worker (`python -m cjm_workers.remote.worker`) as a real process, over real HTTP on 127.0.0.1.

Cancellation, as defined by the worker: a cancelled `/execute` answers 409 `{"error", "cancelled": true, "result"}`
(`result` is null when the plugin stopped by raising, as the reference plugins do through `check_cancelled()`); a
cancelled `/execute_stream` ends with the line `{"error": "cancelled", "cancelled": true}`.
"""
import json, os, queue, signal, socket, subprocess, sys, tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import httpx, psutil, pytest
from cjm_workers.core.process import kill_process_group
from _a_helpers import gone

TESTS = Path(__file__).resolve().parent
READY = 'CJM_WORKER_READY '
TOKEN = 'tok-' + os.urandom(8).hex()
AUTH = {'Authorization': f'Bearer {TOKEN}'}


def worker_env(**extra):
    "This environment with tests/ importable (for _r_plugins) and no inherited worker token."
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(TESTS), env.get('PYTHONPATH')) if p)
    env.pop('CJM_WORKER_TOKEN', None)
    env.update(extra)
    return env




def wait_for(predicate, timeout, interval=0.005):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end: return False
        time.sleep(interval)
    return True


class Worker:
    "A worker subprocess; `ready()` waits for its ready line (no fixed sleeps), `stop()` kills its process group."
    def __init__(self, cls, module='cjm_workers.testing', args=(), env=None):
        self.stderr = tempfile.TemporaryFile(mode='w+')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'cjm_workers.remote.worker', '--module', module, '--class', cls, '--port', '0', *args],
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=worker_env(**(env or {})), cwd=str(TESTS))
        self.lines, self.info = queue.Queue(), None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout: self.lines.put(line)
        self.lines.put(None)

    def ready(self, timeout=30):
        if self.info is None:
            try: line = self.lines.get(timeout=timeout)
            except queue.Empty: line = None
            if not line or not line.startswith(READY):
                self.stderr.seek(0)
                pytest.fail(f"worker printed {line!r} instead of the ready line; stderr:\n{self.stderr.read()}")
            self.info = json.loads(line[len(READY):])
            self.url = f"http://127.0.0.1:{self.info['port']}"
        return self

    def client(self, auth=False):
        return httpx.Client(base_url=self.url, timeout=10, headers=AUTH if auth else None)

    def stop(self):
        if self.proc.poll() is None:
            try: is_leader = os.getpgid(self.proc.pid) == self.proc.pid
            except ProcessLookupError: is_leader = False
            if is_leader: kill_process_group(self.proc.pid)  # the worker and whatever its plugin started
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close(); self.stderr.close()


@pytest.fixture(scope='module')
def workers():
    "One worker per plugin, started together; all killed (with their process groups) at the end."
    specs = {
        'slow': ('SlowPlugin', 'cjm_workers.testing', ['--ppid', str(os.getpid())], None),
        'echo': ('EchoPlugin', 'cjm_workers.testing', ['--max-body-bytes', '4096', '--token-env', 'R_TEST_TOKEN'],
                 {'R_TEST_TOKEN': TOKEN}),
        'transcribe': ('TranscribePlugin', 'cjm_workers.testing', [], None),
        'tokens': ('TokenStreamPlugin', 'cjm_workers.testing', [], None),
        'flaky': ('FlakyPlugin', '_r_plugins', [], None),
        'slowload': ('SlowLoad', '_r_plugins', [], None),
    }
    ws = {}
    try:
        for k, (cls, mod, args, env) in specs.items(): ws[k] = Worker(cls, mod, args, env)
        for w in ws.values(): w.ready()
        yield ws
    finally:
        for w in ws.values(): w.stop()


def test_ready_line_health_and_process_group(workers):
    names = {'slow': 'slow', 'echo': 'echo', 'transcribe': 'transcribe', 'tokens': 'tokens', 'flaky': 'flaky',
             'slowload': 'slowload'}
    for key, w in workers.items():
        assert w.info['pid'] == w.proc.pid and w.info['port'] > 0 and w.info['host'] == '127.0.0.1'
        with w.client() as c: h = c.get('/health').json()
        assert h == {'status': 'ok', 'pid': w.proc.pid, 'name': names[key],
                     'version': '0.1' if key in ('flaky', 'slowload') else '1.0.0',
                     'running': False, 'run_seconds': None, 'cancel_pending_seconds': None}
        assert os.getpgid(w.proc.pid) == w.proc.pid  # a group leader: a proxy can kill its whole tree
    assert len({w.info['port'] for w in workers.values()}) == len(workers)


def test_every_endpoint(workers):
    w = workers['echo']
    with w.client(auth=True) as c:
        assert c.post('/initialize', json={'prefix': '>> '}).json() == {'status': 'initialized'}
        assert c.get('/config').json() == {'prefix': '>> '}
        assert c.get('/config_schema').json() == {'type': 'object', 'properties': {'prefix': {'type': 'str'}}}
        r = c.post('/execute', json={'args': [], 'kwargs': {'text': 'hi'}})
        assert r.status_code == 200 and r.headers['content-type'] == 'application/json'
        assert r.json() == {'text': '>> hi', 'metadata': {'pid': w.proc.pid, 'config': {'prefix': '>> '}}}
        assert c.post('/execute', json={'args': ['positional']}).json()['text'] == '>> positional'
        r = c.post('/execute', json={'kwargs': {'fail': 'nope'}})
        assert r.status_code == 500 and r.json()['error'] == 'ValueError: nope'
        assert 'raise ValueError(fail)' in r.json()['traceback']
        p = c.get('/progress').json()
        assert (p['progress'], p['message'], p['running']) == (None, '', False)
        assert c.post('/cancel').json() == {'status': 'not_running', 'running': False}  # nothing running: says so
        lines = c.post('/execute_stream', json={'kwargs': {'text': 'once'}}).text.splitlines()
        assert lines == ['">> once"']
        s = c.get('/stats').json()
        assert s['pid'] == w.proc.pid and s['num_threads'] >= 1 and s['uptime_seconds'] > 0
        assert s['memory_rss_mb'] >= s['memory_rss_mb_self'] > 5 and s['cpu_percent'] >= 0
        assert s['executions'] >= 4 and s['running'] is False
        assert c.post('/cleanup').json() == {'status': 'cleaned_up'}
        assert c.get('/config').json() == {}


def test_optional_methods_and_initialize_errors(workers):
    with workers['flaky'].client() as c:
        r = c.post('/initialize', json={'fail': 'model not found'})
        assert r.status_code == 422 and r.json()['error'] == 'ValueError: bad config: model not found'
        assert c.post('/initialize', json={'a': 1}).json() == {'status': 'initialized'}
        assert c.get('/config').json() == {'a': 1}
        assert c.post('/initialize').json() == {'status': 'initialized'}  # empty body: config None
        assert c.get('/config').json() == {}
        assert c.get('/config_schema').json() == {}  # the plugin has no get_config_schema
        assert c.post('/cancel').json() == {'status': 'not_running', 'running': False}
        assert c.post('/cleanup').json() == {'status': 'not_supported'}
        assert c.post('/execute', json={'kwargs': {'x': [1, 2]}}).json() == {'ok': True, 'kwargs': {'x': [1, 2]}}


def test_progress_and_cancel_while_execute_runs(workers):
    "TranscribePlugin: 100 steps of 20 ms (2 s). Progress advances while the request is in flight; a cancel ends it early."
    w = workers['transcribe']
    with w.client() as c, w.client() as c2, ThreadPoolExecutor(1) as pool:
        p = c.get('/progress').json()
        fut = pool.submit(c2.post, '/execute', json={'kwargs': {'audio': 'talk.wav', 'steps': 100, 'delay': 0.02}})
        seen = []
        while not (len(seen) >= 3 and seen[-1] >= 0.1):  # long poll: each answer is a new report (or the run starting)
            p = c.get('/progress', params={'since': p['seq'], 'wait': 5}).json()
            assert p['running'], p
            if p['progress'] is not None: seen.append(p['progress'])
        assert p['running'] is True and p['message'].startswith('segment ') and p['message'].endswith('/100')
        assert len(seen) >= 3 and seen == sorted(seen) and 0 < seen[0] < seen[-1] < 1, seen
        for path in ('/health', '/stats'):  # answered during the run, not after it
            assert c.get(path).status_code == 200
        assert not fut.done()
        assert c.post('/cancel').json() == {'status': 'cancelled', 'running': True}
        r = fut.result(5)
        assert r.status_code == 409, r.text
        body = r.json()
        assert body == {'error': 'cancelled', 'cancelled': True, 'result': None}, body  # no internal run id in it
        last = c.get('/progress').json()
        assert last['running'] is False and seen[-1] <= last['progress'] < 1
        r = c.post('/execute', json={'kwargs': {'steps': 3, 'delay': 0}})  # the next run is not cancelled
        assert r.status_code == 200 and r.json()['text'] == 'clip.wav: segment1 segment2 segment3'
        p = c.get('/progress').json()
        assert (p['progress'], p['message'], p['running']) == (1.0, 'segment 3/3', False)


def test_stream_lines_arrive_in_order_as_produced(workers):
    with workers['tokens'].client() as c:
        t0, got = time.monotonic(), []
        with c.stream('POST', '/execute_stream', json={'kwargs': {'text': 'one two three four five', 'delay': 0.1}}) as r:
            assert r.status_code == 200 and r.headers['content-type'] == 'application/x-ndjson'
            for line in r.iter_lines():
                if line: got.append((json.loads(line), time.monotonic() - t0))
        assert [v for v, _ in got] == ['one ', 'two ', 'three ', 'four ', 'five']
        assert got[0][1] < got[-1][1] - 0.3, got  # streamed as produced, not buffered to the end


def test_error_mid_stream_is_the_final_line(workers):
    with workers['flaky'].client() as c:
        r = c.post('/execute_stream', json={})
        assert r.status_code == 200
        lines = [json.loads(l) for l in r.text.splitlines()]
        assert lines[:2] == ['first', {'second': 2}] and len(lines) == 3
        assert lines[2]['error'] == 'RuntimeError: broke after two items' and 'broke after two items' in lines[2]['traceback']


def test_cancel_and_disconnect_end_a_stream(workers):
    w = workers['tokens']
    text = ' '.join(f'w{i}' for i in range(100))  # 100 × 20 ms = 2 s if it ran to the end
    with w.client() as c, w.client() as c2, ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c2.post, '/execute_stream', json={'kwargs': {'text': text, 'delay': 0.02}})
        assert wait_for(lambda: c.get('/progress').json()['running'], 5)
        time.sleep(0.1)
        assert c.post('/cancel').json() == {'status': 'cancelled', 'running': True}
        lines = [json.loads(l) for l in fut.result(5).text.splitlines()]
        assert lines[-1] == {'error': 'cancelled', 'cancelled': True} and 1 <= len(lines) - 1 < 60, lines
        assert lines[:-1] == [f'w{i} ' for i in range(len(lines) - 1)]
        # a client that goes away mid-stream releases the plugin: the next call is served at once
        with c2.stream('POST', '/execute_stream', json={'kwargs': {'text': text, 'delay': 0.02}}) as r:
            assert json.loads(next(r.iter_lines())) == 'w0 '
        t = time.monotonic()
        assert wait_for(lambda: not c.get('/progress').json()['running'], 2), "the abandoned stream kept running"
        r = c.post('/execute', json={'kwargs': {'text': 'a b', 'delay': 0}})
        assert r.json() == {'text': 'a b', 'metadata': {}} and time.monotonic() - t < 1


def test_token_is_required_except_for_health(workers):
    w = workers['echo']
    assert TOKEN not in ' '.join(psutil.Process(w.proc.pid).cmdline())  # read from the environment, not argv
    with w.client() as c:
        assert c.get('/health').status_code == 200
        for method, path in [('GET', '/stats'), ('GET', '/config'), ('GET', '/config_schema'), ('GET', '/progress'),
                             ('POST', '/initialize'), ('POST', '/execute'), ('POST', '/execute_stream'),
                             ('POST', '/cancel'), ('POST', '/cleanup')]:
            for headers in ({}, {'Authorization': 'Bearer wrong'}, {'Authorization': TOKEN}):
                r = c.request(method, path, headers=headers, json={})
                assert r.status_code == 401 and r.headers['www-authenticate'] == 'Bearer', (method, path, headers)
        r = c.post('/execute', headers=AUTH, json={'kwargs': {'text': 'let in'}})
        assert r.status_code == 200 and r.json()['text'].endswith('let in')



def test_requests_from_web_pages_and_rebound_host_names_are_refused(workers):
    """A page of any site can POST to a worker on this machine (a no-cors fetch needs no preflight), and a DNS-rebinding
    page can even read the answers: requests a browser marks as sent by a page are refused, and a worker without a
    token takes only IP addresses and localhost as its Host. (A client with the token may name any host.)"""
    tokenless, with_token = workers['transcribe'], workers['echo']
    body = {'kwargs': {'steps': 1, 'delay': 0}}
    with tokenless.client() as c:
        assert c.post('/execute', json=body).status_code == 200  # an ordinary client
        assert c.post('/execute', json=body, headers={'Host': 'localhost'}).status_code == 200
        for headers in ({'Origin': 'https://evil.example'}, {'Sec-Fetch-Site': 'cross-site'}, {'Origin': 'null'},
                        {'Host': 'rebound.evil.example'}, {'Host': 'rebound.evil.example:80'}):
            r = c.post('/execute', json=body, headers=headers)
            assert r.status_code == 403 and ('refused' in r.text or 'not a name' in r.text), (headers, r.text)
        assert c.post('/shutdown', headers={'Origin': 'https://evil.example'}).status_code == 403
        assert c.get('/health').status_code == 200  # still serving
    with with_token.client(auth=True) as c:
        assert c.post('/execute', json={'kwargs': {'text': 'x'}}, headers={'Host': 'worker.internal'}).status_code == 200
        assert c.post('/execute', json={'kwargs': {'text': 'x'}}, headers={'Origin': 'https://evil.example'}).status_code == 403

def test_oversized_and_malformed_bodies(workers):
    with workers['echo'].client(auth=True) as c:  # --max-body-bytes 4096
        r = c.post('/execute', json={'kwargs': {'text': 'x' * 8000}})
        assert r.status_code == 413 and 'exceeds the limit of 4096 bytes' in r.json()['error']
        r = c.post('/execute', content=(b'x' * 1024 for _ in range(8)))  # chunked: no Content-Length
        assert r.status_code == 413
        r = c.post('/execute', content=b'{"kwargs": {"text": "x"}', headers={'content-type': 'application/json'})
        assert r.status_code == 400 and 'not valid JSON' in r.json()['error']
        r = c.post('/execute', content=b'\xff\xfe\xfd')
        assert r.status_code == 400 and 'not valid JSON' in r.json()['error']
        r = c.post('/execute', json={'text': 'hi'})
        assert r.status_code == 400 and "unknown field(s) ['text']" in r.json()['error']
        assert c.post('/execute', json={'kwargs': ['a']}).status_code == 400
        assert c.post('/initialize', json=[1]).status_code == 400
        assert c.post('/execute', json={'kwargs': {'text': 'still fine'}}).status_code == 200
    # default limit (16 MiB): a declared 64 MiB body is refused from its headers, before any of it is sent
    w = workers['transcribe']
    with socket.create_connection(('127.0.0.1', w.info['port']), timeout=5) as s:
        s.sendall(b'POST /execute HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                  b'Content-Length: 67108864\r\n\r\n')
        t, data = time.monotonic(), b''
        while b'\r\n\r\n' not in data:
            chunk = s.recv(4096)
            if not chunk: break
            data += chunk
        assert data.startswith(b'HTTP/1.1 413'), data[:200]
        assert time.monotonic() - t < 2


def test_plugin_children_count_in_stats_and_cancel_leaves_worker_usable(workers):
    w = workers['slow']
    with w.client() as c, w.client() as c2, ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c2.post, '/execute', json={'kwargs': {'seconds': 30, 'spawn_child': True}})
        assert wait_for(lambda: c.get('/progress').json()['message'].startswith('child:'), 10)
        child = int(c.get('/progress').json()['message'].split(':')[1])
        assert os.getpgid(child) == w.proc.pid  # in the worker's group: killed with it
        s = c.get('/stats').json()
        assert s['running'] is True and s['num_children'] >= 1 and s['memory_rss_mb'] > s['memory_rss_mb_self']
        assert c.post('/cancel').json()['status'] == 'cancelled'
        assert fut.result(5).status_code == 409
        assert c.post('/execute', json={'kwargs': {'seconds': 0.01}}).json() == {'text': 'slept 0.01s', 'metadata': {}}


def test_startup_failures_exit_2_with_the_reason():
    busy = socket.socket(); busy.bind(('127.0.0.1', 0)); busy.listen()
    cases = [('no_such_module_r', 'X', [], "cannot import plugin module 'no_such_module_r'"),
             ('cjm_workers.testing', 'NoSuchClass', [], "has no class 'NoSuchClass'"),
             ('_r_plugins', 'NoExecute', [], "class _r_plugins.NoExecute cannot be hosted: it has no execute() method"),
             ('_r_plugins', 'Incomplete', [], "is abstract: it does not implement cleanup, get_config_schema"),
             ('cjm_workers.testing', 'EchoPlugin', ['--port', str(busy.getsockname()[1])],
              f"cannot listen on 127.0.0.1:{busy.getsockname()[1]} (Address already in use)"),
             # argument errors, argparse-style, naming the argument
             ('cjm_workers.testing', 'EchoPlugin', ['--port', '99999'], "argument --port: must be between 0 and 65535"),
             ('cjm_workers.testing', 'EchoPlugin', ['--port', '0', '--ppid', '-5'], "argument --ppid: must be at least 1"),
             ('cjm_workers.testing', 'EchoPlugin', ['--port', '0', '--ppid', '0'], "argument --ppid: must be at least 1"),
             ('cjm_workers.testing', 'EchoPlugin', ['--port', '0', '--ppid', str(2**22 + 7)],  # above any pid_max
              f"argument --ppid: no process {2**22 + 7}"),
             ('cjm_workers.testing', 'EchoPlugin', ['--port', '0', '--max-body-bytes', '-1'],
              "argument --max-body-bytes: must be at least 1")]
    procs = []
    try:
        for mod, cls, extra, _ in cases:
            port = [] if '--port' in extra else ['--port', '0']
            procs.append(subprocess.Popen([sys.executable, '-m', 'cjm_workers.remote.worker', '--module', mod,
                                           '--class', cls, *port, *extra], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=worker_env(), cwd=str(TESTS)))
        for p, (mod, cls, _, expected) in zip(procs, cases):
            out, err = p.communicate(timeout=30)
            assert p.returncode == 2, (mod, cls, p.returncode, err)
            assert expected in err and READY not in out, (expected, err)
    finally:
        busy.close()
        for p in procs:
            if p.poll() is None: p.kill(); p.wait(10)


def test_worker_dies_with_its_parent():
    parent = subprocess.Popen([sys.executable, str(TESTS / '_r_parent.py')], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=worker_env(), cwd=str(TESTS), start_new_session=True)
    wpid = child = None
    try:
        lines = queue.Queue()
        threading.Thread(target=lambda: lines.put(parent.stdout.readline()), daemon=True).start()
        line = lines.get(timeout=30)
        assert line.strip(), f"the parent printed nothing; stderr: {parent.stderr.read() if parent.poll() is not None else ''}"
        wpid, port = map(int, line.split())
        assert psutil.Process(wpid).ppid() == parent.pid
        c = httpx.Client(base_url=f'http://127.0.0.1:{port}', timeout=10)
        pool = ThreadPoolExecutor(1)
        pool.submit(lambda: c.post('/execute', json={'kwargs': {'seconds': 60, 'spawn_child': True}}))
        with httpx.Client(base_url=f'http://127.0.0.1:{port}', timeout=10) as c2:
            assert wait_for(lambda: c2.get('/progress').json()['message'].startswith('child:'), 10)
            child = int(c2.get('/progress').json()['message'].split(':')[1])
        assert not gone(wpid) and not gone(child)
        t0 = time.monotonic()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        ok = wait_for(lambda: gone(wpid) and gone(child), 2.0, interval=0.001)
        took = time.monotonic() - t0
        print(f"\nworker and its child gone {took * 1000:.1f} ms after the parent was SIGKILLed")
        assert ok, f"worker gone: {gone(wpid)}, its child gone: {gone(child)} after {took:.2f} s"
        pool.shutdown(wait=True)
        c.close()
    finally:
        if parent.poll() is None: parent.kill(); parent.wait(10)
        for pid in (wpid, child):
            if pid is not None and not gone(pid):
                try: os.kill(pid, signal.SIGKILL)
                except ProcessLookupError: pass
        parent.stdout.close(); parent.stderr.close()


def test_a_cancel_naming_a_call_counts_even_before_the_call_begins(workers):
    "A cancel that reaches the worker before its call does is kept for it: the call then does not run the plugin."
    w = workers['slow']
    with w.client() as c, w.client() as c2, w.client() as c3, ThreadPoolExecutor(2) as pool:
        running = pool.submit(c2.post, '/execute', json={'kwargs': {'seconds': 60}}, headers={'X-Call-Id': 'first'})
        assert wait_for(lambda: c.get('/progress').json()['running'], 10)
        # 'second' has not been sent yet: the cancel is kept for it, and leaves the running call alone
        assert c.post('/cancel', json={'calls': ['second']}).json() == {'status': 'pending', 'running': True}
        queued = pool.submit(c3.post, '/execute', json={'kwargs': {'seconds': 60}}, headers={'X-Call-Id': 'second'})
        assert not running.done()
        assert c.post('/cancel', json={'calls': ['first']}).json() == {'status': 'cancelled', 'running': True}
        assert running.result(10).status_code == 409
        r = queued.result(10)  # it waited behind 'first', then began cancelled, without sleeping its 60 s
        assert (r.status_code, r.json()) == (409, {'error': 'cancelled before it started', 'cancelled': True,
                                                   'result': None})
        assert c.post('/execute', json={'kwargs': {'seconds': 0}}, headers={'X-Call-Id': 'third'}).status_code == 200
        r = c.post('/cancel', json={'calls': 'first'})
        assert r.status_code == 400 and '"calls" must be a JSON array' in r.json()['error']


def test_a_cancel_stops_a_long_initialize(workers):
    "`/initialize` runs with a job context: a plugin loading a model sees `check_cancelled()` after a `/cancel`."
    w = workers['slowload']
    with w.client() as c, w.client() as c2, ThreadPoolExecutor(1) as pool:
        load = pool.submit(c2.post, '/initialize', json={'steps': 3000}, headers={'X-Call-Id': 'load-1'})
        assert wait_for(lambda: c.get('/config').json().get('loading'), 10)  # /config does not wait for the lock
        assert c.post('/cancel', json={'calls': ['load-1']}).json() == {'status': 'cancelled', 'running': False}
        r = load.result(10)
        assert (r.status_code, r.json()) == (409, {'error': 'cancelled', 'cancelled': True})
        assert c.get('/config').json() == {'loading': False, 'stopped': True}
        assert c.post('/initialize', json={'steps': 1}).json() == {'status': 'initialized'}  # the next one is not cancelled
        assert c.post('/cancel').json() == {'status': 'not_running', 'running': False}


def test_unknown_paths_wrong_methods_and_the_bearer_scheme_over_http(workers):
    w = workers['echo']
    with w.client() as c:
        for scheme in ('Bearer', 'bearer', 'BEARER'):  # RFC 7235: the scheme is case-insensitive
            r = c.get('/config', headers={'Authorization': f'{scheme} {TOKEN}'})
            assert r.status_code == 200, (scheme, r.text)
        r = c.get('/nope', headers=AUTH)
        assert r.status_code == 404 and r.headers['content-type'] == 'application/json'
        assert r.json()['error'].startswith("no endpoint '/nope'; the worker serves /health, /stats"), r.json()
        r = c.get('/execute', headers=AUTH)
        assert r.status_code == 405 and r.headers['content-type'] == 'application/json'
        assert r.json() == {'error': 'GET is not allowed on /execute; use POST'} and r.headers['allow'] == 'POST'


# ---------------------------------------------------------------- what a plugin raises never costs the worker

@pytest.fixture(scope='module')
def unruly():
    w = Worker('Unruly', '_r_plugins')
    try: yield w.ready()
    finally: w.stop()


def test_a_plugins_base_exception_fails_its_call_and_the_worker_serves_on(unruly):
    "SystemExit / KeyboardInterrupt / GeneratorExit from the plugin: the call fails naming it, with the plugin's traceback; the worker lives on."
    texts = {'sysexit': 'SystemExit: 4 (the plugin called sys.exit; the worker serves on)',
             'kbint': 'KeyboardInterrupt (raised by the plugin; the worker serves on)',
             'genexit': 'GeneratorExit (raised by the plugin; the worker serves on)'}
    with unruly.client() as c:
        pid = c.post('/execute', json={}).json()['pid']
        for what, text in texts.items():
            r = c.post('/execute', json={'kwargs': {'raise_': what}})
            assert r.status_code == 500 and r.json()['error'] == text, r.text
            assert 'raise _raised(raise_)' in r.json()['traceback']
            lines = [json.loads(l) for l in c.post('/execute_stream', json={'kwargs': {'raise_': what}}).text.splitlines()]
            assert lines[0] == 'a' and len(lines) == 2 and lines[1]['error'] == text, lines
            assert 'raise _raised(raise_)' in lines[1]['traceback']
            assert c.post('/execute', json={}).json() == {'pid': pid}  # the same worker, on the same connection
    assert unruly.proc.poll() is None


def test_error_text_utf8_cannot_encode_still_reaches_the_client(unruly):
    "RuntimeError('bad \\udcff'): the error and its traceback arrive ('?' for the surrogate); the connection stays usable."
    with httpx.Client(base_url=unruly.url, timeout=10, limits=httpx.Limits(max_connections=1)) as c:
        for _ in range(3):
            r = c.post('/execute', json={'kwargs': {'raise_': 'surrogate'}})
            assert r.status_code == 500 and r.json()['error'] == 'RuntimeError: bad ?', r.text
            assert r.json()['traceback'].endswith('RuntimeError: bad ?\n') and r.headers.get('connection') != 'close'
            lines = [json.loads(l) for l in c.post('/execute_stream', json={'kwargs': {'raise_': 'surrogate'}}).text.splitlines()]
            assert lines[0] == 'a' and lines[1]['error'] == 'RuntimeError: bad ?', lines
            assert c.post('/execute', json={}).status_code == 200  # the one kept-alive connection was not dropped


def test_an_idle_connection_is_kept_longer_than_the_proxy_keeps_it():
    "The worker keeps an idle connection 60 s, the proxy 30 s: no request meets a connection the worker is closing."
    from cjm_workers.remote.proxy import _LIMITS
    from cjm_workers.remote.worker import KEEP_ALIVE_SECONDS
    assert _LIMITS.keepalive_expiry < KEEP_ALIVE_SECONDS
    w = Worker('EchoPlugin').ready()
    try:
        import http.client
        conn = http.client.HTTPConnection('127.0.0.1', w.info['port'], timeout=10)  # one connection, never reopened
        try:
            for wait in (0, 6):  # 6 s: longer than uvicorn's default keep-alive (5 s), which would have closed it
                time.sleep(wait)
                conn.request('GET', '/health')
                r = conn.getresponse()
                assert r.status == 200 and json.loads(r.read())['status'] == 'ok'
        finally: conn.close()
    finally: w.stop()


def test_a_streams_return_value_is_its_last_line_for_a_client_that_asks(unruly):
    body = {'kwargs': {'items': ['a', {'return': 1}, {'item': 2}, {'error': 'not one'}], 'ret': {'tokens': 4}}}
    with unruly.client() as c:
        r = c.post('/execute_stream', json=body)  # a client that does not know the return line: the lines it knows
        assert 'x-stream-return' not in r.headers
        assert [json.loads(l) for l in r.text.splitlines()] == body['kwargs']['items']
        r = c.post('/execute_stream', json=body, headers={'X-Stream-Return': '1'})
        assert r.headers['x-stream-return'] == '1'
        assert [json.loads(l) for l in r.text.splitlines()] == [
            'a', {'item': {'return': 1}}, {'item': {'item': 2}}, {'item': {'error': 'not one'}}, {'return': {'tokens': 4}}]
        r = c.post('/execute_stream', json={'kwargs': {'raise_': 'sysexit'}}, headers={'X-Stream-Return': '1'})
        lines = [json.loads(l) for l in r.text.splitlines()]  # a failed stream has no return line
        assert lines[0] == 'a' and len(lines) == 2 and lines[1]['error'].startswith('SystemExit: 4'), lines


from _r_plugins import QUITTERS  # noqa: E402


def test_a_constructor_that_exits_or_is_interrupted_fails_the_start_like_one_that_raises(tmp_path):
    """SystemExit / KeyboardInterrupt from the plugin's constructor (or its module) take the path of a ValueError: exit
    code 2 (not the plugin's own), no ready line, and stderr naming the exception and the class, without a traceback."""
    (tmp_path / '_r_quitters.py').write_text(QUITTERS)
    (tmp_path / '_r_exits_on_import.py').write_text('import sys\nsys.exit(3)\n')
    cases = [('_r_quitters', 'Raises', "creating _r_quitters.Raises() failed (ValueError: no GPU)"),  # the path all take
             ('_r_quitters', 'Exits', "creating _r_quitters.Exits() failed (SystemExit: 4; the plugin called sys.exit)"),
             ('_r_quitters', 'ExitsSaying',
              "creating _r_quitters.ExitsSaying() failed (SystemExit: no CUDA device; the plugin called sys.exit)"),
             ('_r_quitters', 'ExitsQuietly', "creating _r_quitters.ExitsQuietly() failed (SystemExit; the plugin called sys.exit)"),
             ('_r_quitters', 'Interrupted', "creating _r_quitters.Interrupted() failed (KeyboardInterrupt)"),
             ('_r_exits_on_import', 'Plugin',
              "cannot import plugin module '_r_exits_on_import' (SystemExit: 3; the plugin called sys.exit)")]
    env = worker_env()
    env['PYTHONPATH'] = os.pathsep.join([str(tmp_path), env['PYTHONPATH']])
    procs = [subprocess.Popen([sys.executable, '-m', 'cjm_workers.remote.worker', '--module', mod, '--class', cls,
                               '--port', '0', '--ppid', str(os.getpid())], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=str(TESTS)) for mod, cls, _ in cases]
    try:
        for p, (mod, cls, expected) in zip(procs, cases):
            out, err = p.communicate(timeout=30)
            assert (p.returncode, READY in out) == (2, False), (cls, p.returncode, out, err)
            assert f"python -m cjm_workers.remote.worker: error: {expected}\n" in err and 'Traceback' not in err, (cls, err)
    finally:
        for p in procs:
            if p.poll() is None: p.kill(); p.wait(10)


def test_many_waiting_calls_hold_up_neither_a_running_stream_nor_a_cancel(workers):
    """Remote review: plugin calls waited for the plugin's lock in anyio's 40 shared threads, so 45 calls queued behind a
    stream took every thread: the stream never got one for its next item, a /cancel none to run in, and nothing moved
    again. Calls now wait for their turn on the event loop, and /cancel has threads of its own."""
    import asyncio
    w = workers['tokens']
    async def run(words, cancel):
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=w.url, timeout=30, limits=limits) as c:
            async with c.stream('POST', '/execute_stream', json={'kwargs': {'text': ' '.join(words), 'delay': 0.05}}) as r:
                lines = r.aiter_lines()
                got = [json.loads(await lines.__anext__())]
                calls = [asyncio.create_task(c.post('/execute', json={'kwargs': {'text': f'c{i}', 'delay': 0}})) for i in range(45)]
                await asyncio.sleep(0.3)  # all 45 wait for the plugin now
                if cancel:
                    t = time.monotonic()
                    answer = (await asyncio.wait_for(c.post('/cancel'), 5)).json()
                    assert answer['status'] == 'cancelled' and time.monotonic() - t < 2, answer
                async def rest():
                    async for line in lines:
                        if line: got.append(json.loads(line))
                await asyncio.wait_for(rest(), 15)
            answers = await asyncio.wait_for(asyncio.gather(*calls), 15)
        assert sorted(a.json()['text'] for a in answers) == sorted(f'c{i}' for i in range(45))
        return got
    words = [f'w{i}' for i in range(20)]
    assert asyncio.run(run(words, cancel=False)) == [f'{x} ' for x in words[:-1]] + [words[-1]]
    got = asyncio.run(run([f'w{i}' for i in range(200)], cancel=True))
    assert got[-1] == {'error': 'cancelled', 'cancelled': True} and len(got) < 100, got


def test_a_plugins_slow_cancel_of_one_call_does_not_stop_the_call_after_it():
    """Race review (2026-12-07): a `/cancel` of call A ran the plugin's `cancel()` after releasing the host's state; A
    ended meanwhile, B began (resetting `self.cancelled`), then the late `cancel()` set the flag and stopped B; now a
    run begins only once the plugin's `cancel()` has returned, and B runs to its end."""
    w = Worker('SlowCancel', '_r_plugins').ready()
    try:
        with w.client() as c, ThreadPoolExecutor(2) as pool:
            for i in range(3):
                def call(name, **kw):
                    with w.client() as cc: return cc.post('/execute', json={'kwargs': kw}, headers={'X-Call-Id': name})
                a = pool.submit(call, f'A{i}', tag='A', seconds=10, stop_on_ctx=True)  # stops at the context's flag, at once
                assert wait_for(lambda: c.get('/health').json()['running'], 10)
                b = pool.submit(call, f'B{i}', tag='B', seconds=0.3)  # waits its turn behind A
                time.sleep(0.05)
                assert c.post('/cancel', json={'calls': [f'A{i}']}).json()['status'] == 'cancelled'
                assert a.result(10).status_code == 409
                r = b.result(10)
                assert (r.status_code, r.json()) == (200, {'tag': 'B', 'stopped_by': None})
    finally: w.stop()


def test_sigterm_during_a_call_ends_what_the_plugin_started_and_the_worker_dies_of_it():
    """Race review (2026-12-07): a SIGTERM to a standalone worker (no --managed) during a call left the plugin's child
    processes running: uvicorn re-raised the signal after its graceful shutdown, and the default handler ended the
    process before `run_worker` killed them; now they are killed, and the worker still ends as killed by SIGTERM."""
    w, child = Worker('SlowPlugin').ready(), None
    try:
        with w.client() as c, ThreadPoolExecutor(1) as pool:
            pool.submit(lambda: httpx.post(w.url + '/execute', json={'kwargs': {'seconds': 30, 'spawn_child': True}},
                                           timeout=60))
            assert wait_for(lambda: c.get('/progress').json()['message'].startswith('child:'), 10)
            child = psutil.Process(int(c.get('/progress').json()['message'].split(':')[1]))
            w.proc.send_signal(signal.SIGTERM)
            assert w.proc.wait(15) == -signal.SIGTERM
            assert wait_for(lambda: gone(child), 5), "the plugin's child outlived its worker"
    finally:
        if child is not None and not gone(child): child.kill()  # first: it holds the worker's stdout open
        w.stop()


def test_shutdown_during_a_long_initialize_does_not_wait_for_the_load():
    """Race review (2026-12-07): POST /shutdown while the plugin's `initialize` ran (a model loading) let the worker
    exit only once the load had ended: its exit skipped waiting only for an execution, not for an `initialize` (or a
    `cleanup`); now it does not wait for any call of the plugin, and exits within the graceful shutdown (3 s)."""
    w = Worker('SlowPlugin').ready()
    try:
        with w.client() as c, ThreadPoolExecutor(1) as pool:
            load = pool.submit(lambda: httpx.post(w.url + '/initialize', json={'load_seconds': 30}, timeout=60))
            time.sleep(0.5)  # the load has begun
            assert c.post('/shutdown').json() == {'status': 'stopping'}
            t = time.monotonic()
            assert w.proc.wait(10) == 1  # (1: it stopped with a call of the plugin running)
            assert time.monotonic() - t < 8
            try: r = load.result(10)
            except httpx.HTTPError: r = None
            assert r is None or r.status_code != 200, r.text  # the load never finished
    finally: w.stop()


@pytest.mark.parametrize('how', ['shutdown', 'sigterm'])
def test_a_pending_progress_long_poll_is_answered_when_the_worker_stops(how):
    """Race review (2026-12-07): a `/progress` long poll waiting when the worker was told to stop (POST /shutdown, or
    the SIGTERM that follows it from the proxy) held up the graceful shutdown, 3 s, was then cut off without an
    answer (a 'timeout graceful shutdown exceeded' traceback on stderr), and its thread, which the interpreter joins
    at exit, kept the process alive for the rest of the poll's wait (up to 30 s). Now the poll is answered at once."""
    w = Worker('EchoPlugin').ready()
    try:
        with w.client() as c, ThreadPoolExecutor(1) as pool:
            seq = c.get('/progress').json()['seq']
            poll = pool.submit(lambda: httpx.get(w.url + '/progress', params={'since': seq, 'wait': 30}, timeout=60))
            time.sleep(0.5)  # the poll waits in the worker
            if how == 'shutdown': assert c.post('/shutdown').json() == {'status': 'stopping'}
            else: w.proc.send_signal(signal.SIGTERM)
            r = poll.result(20)
            assert r.status_code == 200 and r.json()['seq'] == seq, r.text
            assert w.proc.wait(20) == (0 if how == 'shutdown' else -signal.SIGTERM)  # (not after the poll's 30 s)
        w.stderr.seek(0)
        assert 'graceful shutdown exceeded' not in w.stderr.read()
    finally: w.stop()


# ---------------------------------------------------------------- what the plugin started ends with the worker

ESCAPED = ('plain', 'session', 'daemon', 'closed', 'shell')  # what `_r_plugins.Escapees` leaves that must end with its worker


def escapees(url, tmp_path, end, headers=None):
    """Run `_r_plugins.Escapees` (ending its worker as `end` says) in a thread; its processes' pids once they all run.
    The call's answer is not waited for: a worker that dies has none."""
    pidfile = str(tmp_path / 'pids.json')
    def call():
        try: httpx.post(url + '/execute', json={'kwargs': {'pidfile': pidfile, 'end': end}}, headers=headers, timeout=60)
        except httpx.HTTPError: pass
    threading.Thread(target=call, daemon=True).start()
    return escapee_pids(pidfile)


def escapee_pids(pidfile):
    "The pids `_r_plugins.Escapees` wrote to `pidfile`, once it has (a hang guard: 30 s)."
    assert wait_for(lambda: os.path.exists(pidfile), 30), "the plugin did not start its processes"
    with open(pidfile) as f: pids = json.load(f)
    with open(pidfile + '.plain') as f: pids['plain'] = int(f.read())
    for k in ESCAPED[1:]: assert os.getsid(pids[k]) != os.getsid(0), k  # (they did leave: a session of their own)
    return pids


def assert_escapees_end(pids, timeout=10):
    "They end (`timeout`: a hang guard), all but `unmarked` (started without the worker's mark: opted out); then all are killed."
    try:
        wait_for(lambda: all(gone(pids[k]) for k in ESCAPED), timeout, interval=0.01)
        assert not [k for k in ESCAPED if not gone(pids[k])], f"still running after their worker ended: {pids}"
        assert not gone(pids['unmarked']), "a process started without the worker's mark was killed"
    finally:
        for p in pids.values():
            try: os.kill(p, signal.SIGKILL)
            except ProcessLookupError: pass


@pytest.mark.parametrize('end', ['sigkill', 'segfault', 'exit'])
def test_what_the_plugin_started_ends_with_a_worker_that_crashed(end, tmp_path):
    """A worker SIGKILLed (the OOM killer), segfaulting or calling `os._exit` mid-call: its backstop kills its process
    group (the plugin's plain child) and what carries its mark (children in sessions of their own, double-forked
    daemons, a shell's `setsid cmd &`). Before, all of them ran on."""
    w = Worker('Escapees', '_r_plugins', ['--ppid', str(os.getpid())]).ready()
    try:
        pids = escapees(w.url, tmp_path, end)
        w.proc.wait(30)
        assert_escapees_end(pids)
    finally: w.stop()


def test_what_the_plugin_started_ends_with_a_worker_stopped_by_sigterm(tmp_path):
    "Idle after the call (its processes run on meanwhile), then stopped with SIGTERM: it ends them on its way out."
    w = Worker('Escapees', '_r_plugins').ready()
    try:
        pids = escapees(w.url, tmp_path, 'return')
        with w.client() as c: assert wait_for(lambda: c.get('/progress').json()['running'] is False, 30)
        assert all(not gone(p) for p in pids.values())  # the worker serves on: so do they
        with w.client() as c: assert c.get('/stats').json()['num_children'] == 2  # `plain` and `session` (not the backstop)
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(15) == -signal.SIGTERM
        assert_escapees_end(pids)
    finally: w.stop()


def test_a_plugin_written_with_async_def_runs_in_a_universal_worker(tmp_path):
    """`AsyncChatPlugin`: `async def` initialize, execute, execute_stream and cleanup. Before, `/execute` answered 500
    (a coroutine is no JSON), the stream failed, and `initialize` and `cleanup` never ran. A cancel now reaches the
    plugin's `await` (its run's task is cancelled): the call ends 409 long before its 60 s."""
    log = tmp_path / 'closed.log'
    w = Worker('AsyncChatPlugin').ready()
    try:
        with w.client() as c, w.client() as c2, ThreadPoolExecutor(1) as pool:
            assert c.post('/initialize', json={'closed_log': str(log)}).json() == {'status': 'initialized'}
            r = c.post('/execute', json={'kwargs': {'text': 'hi'}})
            assert r.status_code == 200 and r.json() == {'text': 'you said: hi', 'metadata': {'pid': w.proc.pid, 'client_loop': True}}, r.text
            lines = [json.loads(l) for l in c.post('/execute_stream', json={'kwargs': {'text': 'a b c'}}).text.splitlines()]
            assert lines == ['a ', 'b ', 'c'], lines
            fut = pool.submit(c2.post, '/execute', json={'kwargs': {'delay': 60}})
            assert wait_for(lambda: c.get('/progress').json()['running'], 10)
            assert c.post('/cancel').json()['running'] is True
            r = fut.result(20)  # (a hang guard: the plugin's sleep is 60 s)
            assert r.status_code == 409 and r.json()['cancelled'] is True, r.text
            assert c.post('/execute', json={'kwargs': {'text': 'after'}}).json()['text'] == 'you said: after'
            assert c.post('/cleanup').json() == {'status': 'cleaned_up'}
            assert log.read_text() == f"closed {w.proc.pid}\n"
    finally: w.stop()
