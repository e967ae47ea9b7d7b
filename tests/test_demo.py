"""`cjm-workers demo` as a real process: it serves the page, runs jobs on real workers, and on Ctrl-C (SIGINT) with
an SSE stream open exits promptly with code 0, leaving no worker process behind."""
import json, os, re, shutil, signal, subprocess, sys, tempfile, threading, time

import httpx, psutil, pytest
from _a_helpers import UvicornOutput

pytestmark = pytest.mark.timeout(120)


class Demo(UvicornOutput):
    "The demo server in a subprocess; `port` once it listens."
    def __init__(self, *args, module=False):
        exe = None if module else shutil.which('cjm-workers')
        cmd = [exe, 'demo'] if exe else [sys.executable, '-m', 'cjm_workers.demo']
        self.db = os.path.join(tempfile.mkdtemp(prefix='cjm-demo-'), 'demo.db')  # each run its own job history
        self.proc = subprocess.Popen([*cmd, '--port', '0', '--db', self.db, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._follow()
        if not self._ready.wait(60): raise AssertionError("the demo did not start:\n" + ''.join(self.lines))
        if self.port is None: raise AssertionError("the demo exited:\n" + ''.join(self.lines))
        self.url = f'http://127.0.0.1:{self.port}'

    def workers(self):
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def demo_cmd():
    made = []
    def make(*args, **kw):
        d = Demo(*args, **kw)
        made.append(d)
        return d
    yield make
    for d in made: d.stop()


def test_demo_serves_and_exits_cleanly_on_ctrl_c_with_a_stream_open(demo_cmd):
    demo = demo_cmd()
    with httpx.Client(base_url=demo.url, timeout=30) as c:
        page = c.get('/', follow_redirects=True)
        assert page.status_code == 200 and 'Transcribe a meeting' in page.text and 'sse-connect="/jobs/stream?after=' in page.text
        assert c.get('/_cjm_workers/htmx-2.0.7.min.js').status_code == 200
        workers = demo.workers()
        assert len(workers) >= 2, workers  # the lifespan started them
        # an open page: its stream, read in a thread
        after = re.search(r'after=(\d+)', page.text).group(1)
        def follow(url):
            lines, ended = [], threading.Event()
            def read():
                try:
                    with httpx.stream('GET', demo.url + url, timeout=None) as resp:
                        for line in resp.iter_lines(): lines.append(line)
                except httpx.HTTPError as e: lines.append(f'error: {e!r}')
                ended.set()
            threading.Thread(target=read, daemon=True).start()
            return lines, ended
        lines, ended = follow(f'/jobs/stream?after={after}')
        # a job running on a worker when Ctrl-C comes
        r = c.post('/jobs/start', data={'plugin_id': 'slow', 'params': json.dumps({'seconds': 60})})
        assert r.status_code == 303
        jid = r.headers['location'].rsplit('/', 1)[1]
        while not any('data-status="running"' in l and jid in l for l in lines):
            assert not ended.is_set() and demo.proc.poll() is None, lines
            time.sleep(0.01)
        api, api_ended = follow(f'/jobs/{jid}/stream?after={after}&format=json')  # an API client following the job
        while not any(l.startswith('data: ') and ':started"' in l for l in api):
            assert not api_ended.is_set(), '\n'.join(api)
            time.sleep(0.01)
    workers = demo.workers()
    t0 = time.monotonic()
    demo.proc.send_signal(signal.SIGINT)
    code = demo.proc.wait(30)
    took = time.monotonic() - t0
    print(f"\ndemo exit after SIGINT with a stream open and a job running: {took:.2f} s")
    assert code == 0, ''.join(demo.lines)
    assert ended.wait(10) and api_ended.wait(10), "the SSE streams were not ended"
    # each says the server ended it: the API client is not left to take the stream's end for the job's
    last = [l for l in api if l.startswith('data: ')][-1]
    assert json.loads(last[6:])['type'] == 'closed' and json.loads(last[6:])['data']['job_id'] == jid, api
    assert 'event: closed' in lines, lines[-5:]
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"worker processes left behind: {alive}"
    out = ''.join(demo.lines)
    assert 'Application shutdown complete' in out and 'Traceback' not in out, out


def test_python_m_demo_and_sigterm(demo_cmd):
    "`python -m cjm_workers.demo` works too, and SIGTERM stops it with code 0."
    demo = demo_cmd('--workers', '1', module=True)
    assert httpx.get(f'{demo.url}/jobs', timeout=30).status_code == 200
    # on loopback it answers only to its own names: a page whose DNS name was rebound to this machine is refused
    assert httpx.get(f'{demo.url}/jobs', headers={'Host': 'rebound.evil.example'}, timeout=30).status_code == 400
    workers = demo.workers()
    assert len(workers) >= 1
    demo.proc.send_signal(signal.SIGTERM)
    assert demo.proc.wait(30) == 0, ''.join(demo.lines)
    assert not psutil.wait_procs(workers, timeout=10)[1]


def cli(*args):
    exe = shutil.which('cjm-workers')
    cmd = [exe] if exe else [sys.executable, '-c', 'import sys; from cjm_workers.cli import main; sys.exit(main())']
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)


def test_cli_help():
    out = subprocess.run([sys.executable, '-m', 'cjm_workers.demo', '--help'], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and '--port' in out.stdout and '--host' in out.stdout
    out = cli('--help')  # the top command's usage names every option of the demo
    assert out.returncode == 0
    assert out.stdout.startswith('usage: cjm-workers COMMAND [options]'), out.stdout
    assert 'cjm-workers demo [-h] [--port N] [--host H] [--workers N] [--db PATH]' in out.stdout, out.stdout
    out = cli()  # no command: an error (exit code 2, as argparse), the usage on stderr
    assert out.returncode == 2 and out.stderr.startswith('usage: cjm-workers COMMAND') and not out.stdout, out


def test_a_port_out_of_range_is_an_error():
    "uvicorn would listen on another port than the one the banner names: refused, exit code 2, nothing started."
    for port in ('70000', '65536', '-1', 'http'):
        out = cli('demo', '--port', port, '--db', '')
        assert out.returncode == 2, (port, out.stdout, out.stderr)
        assert f"argument --port: must be a port from 0 to 65535, got '{port}'" in out.stderr and 'Uvicorn' not in out.stderr


def test_sighup_shuts_the_demo_down_cleanly(demo_cmd):
    """Acceptance finding: SIGHUP (its terminal closed) killed the demo without a shutdown: a running job stayed
    'running' in the file (then 'interrupted'). Now it shuts down as for SIGTERM: code 0, the job cancelled."""
    demo = demo_cmd('--workers', '1')
    r = httpx.post(f'{demo.url}/jobs/start', json={'plugin_id': 'slow', 'params': {'seconds': 60}},
                   headers={'accept': 'application/json'}, timeout=30)
    assert r.status_code == 201, r.text
    jid = r.json()['id']
    deadline = time.monotonic() + 30
    while httpx.get(f'{demo.url}/jobs/{jid}', headers={'accept': 'application/json'}, timeout=30).json()['status'] != 'running':
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.05)
    demo.proc.send_signal(signal.SIGHUP)
    assert demo.proc.wait(30) == 0, ''.join(demo.lines)
    import sqlite3
    from contextlib import closing
    with closing(sqlite3.connect(demo.db)) as db:
        (status, reason), = db.execute("SELECT status, reason FROM jobs_demo WHERE id = ?", (jid,)).fetchall()
    assert (status, reason) == ('cancelled', 'the manager shut down'), (status, reason)
