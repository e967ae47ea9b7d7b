"""Bursts of HTTP job starts: N concurrent `POST /jobs/start` against a real app under uvicorn on 127.0.0.1.

    python bench/http_burst.py [--sizes 1000,2000,4000] [--client raw|httpx] [--max-waiting N]
                               [--limit-concurrency N] [--nofile N] [--loop auto|asyncio] [--inproc-httpx N]
                               [--compare DIR [--rounds 3]]

Three processes: the server (`--serve`: the demo app, `create_demo_app`, with an `echo` button, 2 workers and a SQLite
job store, under uvicorn), the clients (`--clients`: N connections opened at once, each sending one JSON start and
reading the answer; `raw` = plain asyncio sockets, `httpx` = one `httpx.AsyncClient` with its limits raised above N),
and this one, which runs one burst per size, waits until the app has no job queued or running, and reads the server's
CPU time. At the end the server is stopped and its SQLite file read: every accepted start (201/202) must be in it,
in a terminal state, and no refused start may be.

Options that make a burst larger than the server takes end quickly: `--max-waiting` (WorkerConfig.max_waiting_jobs:
the start route answers 503 + Retry-After beyond it), `--limit-concurrency` (uvicorn's: 503 beyond that many open
connections), `--nofile` (the server's descriptor limit: the connections it cannot accept). `--inproc-httpx N` runs
the client in the server's own process and event loop instead (how the burst was first tried; see
docs/performance.md, "Bursts of HTTP job starts"). `--compare DIR` starts a second app process that imports
cjm_workers from DIR (`git worktree add /tmp/base main`, say) and alternates the bursts between the two, so that the
app CPU per start of two builds is measured under the same load.
"""
import argparse, asyncio, collections, json, os, resource, signal, socket, sqlite3, subprocess, sys, tempfile, time
from pathlib import Path

TERMINAL = ('completed', 'failed', 'cancelled')
HERE = Path(__file__).resolve()


# --- server process ---------------------------------------------------------------------------------------------

def _app(db, max_waiting):
    from cjm_workers.core.config import WorkerConfig
    from cjm_workers.demo import create_demo_app
    cfg = WorkerConfig(max_workers=2, prefetch=1, max_waiting_jobs=max_waiting, keep_finished_seconds=3600)
    return create_demo_app(jobs=(('Echo', 'echo', {'text': 'x'}, 'echo'),), worker_config=cfg, db=db)

def serve(a):
    import uvicorn
    if a.nofile: resource.setrlimit(resource.RLIMIT_NOFILE, (a.nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    app = _app(a.db, a.max_waiting)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(('127.0.0.1', 0))
    print('PORT', sock.getsockname()[1], flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level='warning', backlog=a.backlog, loop=a.loop,
                                  limit_concurrency=a.limit_concurrency or None)).run(sockets=[sock])


# --- client side ------------------------------------------------------------------------------------------------

def _body(i): return json.dumps({'plugin_id': 'echo', 'params': {'text': f'burst {i}'}}).encode()

async def raw_burst(port:int, n:int, timeout:float)->dict:
    "N connections at once, each one `POST /jobs/start` (Connection: close) on plain asyncio sockets."
    t0, codes, answered, connected, ids = time.perf_counter(), collections.Counter(), [], [], []
    async def one(i):
        body = _body(i)
        req = (f'POST /jobs/start HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\naccept: application/json\r\n'
               f'content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n').encode() + body
        try:
            async with asyncio.timeout(timeout):
                r, w = await asyncio.open_connection('127.0.0.1', port)
                connected.append(time.perf_counter() - t0)
                w.write(req)
                data = await r.read()
                w.close()
            head, _, payload = data.partition(b'\r\n\r\n')
            if not head: codes['closed without an answer'] += 1
            else:
                code = int(head.split(b' ', 2)[1])
                codes[code] += 1
                if code in (201, 202): ids.append(json.loads(payload)['id'])
        except TimeoutError: codes['no answer in time'] += 1
        except OSError as e: codes[type(e).__name__] += 1
        answered.append(time.perf_counter() - t0)
    await asyncio.gather(*(one(i) for i in range(n)))
    return _summary(n, codes, answered, connected, ids)

async def httpx_burst(url:str, n:int, timeout:float)->dict:
    "N concurrent starts through one `httpx.AsyncClient` whose pool allows N connections."
    import httpx
    t0, codes, answered, ids = time.perf_counter(), collections.Counter(), [], []
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as c:
        async def one(i):
            try:
                r = await c.post('/jobs/start', content=_body(i), headers={'accept': 'application/json',
                                                                             'content-type': 'application/json'})
                codes[r.status_code] += 1
                if r.status_code in (201, 202): ids.append(r.json()['id'])
            except httpx.TimeoutException: codes['no answer in time'] += 1
            except httpx.HTTPError as e: codes[type(e).__name__] += 1
            answered.append(time.perf_counter() - t0)
        await asyncio.gather(*(one(i) for i in range(n)))
    return _summary(n, codes, answered, [], ids)

def _summary(n, codes, answered, connected, ids)->dict:
    answered.sort()
    q = lambda p: round(answered[min(len(answered) - 1, int(p * len(answered)))], 2)
    return {'n': n, 'codes': {str(k): v for k, v in sorted(codes.items(), key=str)}, 'connected_s': round(max(connected), 2) if connected else None,
            'first_s': q(0), 'p50_s': q(0.5), 'last_s': round(answered[-1], 2), 'cpu_s': round(time.process_time(), 2), 'ids': ids}

def clients(a):
    port, n = a.port, a.n
    res = asyncio.run(raw_burst(port, n, a.timeout) if a.client == 'raw' else httpx_burst(f'http://127.0.0.1:{port}', n, a.timeout))
    print(json.dumps(res), flush=True)

def inproc(a):
    "The client in the server's own process and event loop (uvicorn.Server.serve and httpx as tasks of one loop)."
    import uvicorn
    with tempfile.TemporaryDirectory() as d:
        app = _app(os.path.join(d, 'jobs.db'), 0)
        async def main():
            sock = socket.create_server(('127.0.0.1', 0), backlog=a.backlog)
            server = uvicorn.Server(uvicorn.Config(app, log_level='warning', backlog=a.backlog))
            task = asyncio.create_task(server.serve(sockets=[sock]))
            while not server.started: await asyncio.sleep(0.05)
            res = await httpx_burst(f'http://127.0.0.1:{sock.getsockname()[1]}', a.inproc_httpx, a.timeout)
            server.should_exit = True
            await task
            return res
        res = asyncio.run(main())
    res.pop('ids')
    print(f"httpx client in the server's process, {a.inproc_httpx} concurrent starts: {json.dumps(res)}")


# --- coordinator ------------------------------------------------------------------------------------------------

def _get(port, path):
    import http.client
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
    try:
        c.request('GET', path, headers={'accept': 'application/json'})
        return json.loads(c.getresponse().read())
    finally: c.close()

def _settle(port, guard=600.0)->float:
    "Seconds until the app has no job queued or running (a hang guard, not a measurement limit)."
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < guard:
        h = _get(port, '/jobs/health')
        if h['queued'] == 0 and h['running'] == 0: return time.perf_counter() - t0
        time.sleep(0.2)
    raise TimeoutError('jobs still queued or running after the guard')

def _cpu(proc)->tuple:
    "CPU seconds of the app process, and of its children (the store's writer, the workers)."
    import psutil
    kids = 0.0
    for c in proc.children(recursive=True):
        try: kids += sum(c.cpu_times()[:2])
        except psutil.NoSuchProcess: pass
    return sum(proc.cpu_times()[:2]), kids

def _start_server(a, d:str, name:str, pythonpath:str=None):
    "An app process (`--serve`) on its own SQLite file in `d`: (Popen, port, psutil.Process, db, stderr path)."
    import psutil
    db, err_path = os.path.join(d, f'{name}.db'), os.path.join(d, f'{name}.err')  # (a file: a pipe nobody reads would block the server once full)
    cmd = [sys.executable, str(HERE), '--serve', '--db', db, '--backlog', str(a.backlog), '--loop', a.loop,
           '--max-waiting', str(a.max_waiting), '--limit-concurrency', str(a.limit_concurrency), '--nofile', str(a.nofile)]
    env = os.environ if pythonpath is None else {**os.environ, 'PYTHONPATH': pythonpath}
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(err_path, 'w'), text=True, env=env)
    port = int(srv.stdout.readline().split()[1])
    for _ in range(200):
        try: _get(port, '/jobs/health'); break
        except OSError: time.sleep(0.05)
    return srv, port, psutil.Process(srv.pid), db, err_path

def _stop_server(srv, err_path, errs):
    if srv.poll() is None: srv.send_signal(signal.SIGTERM)
    try: srv.wait(timeout=60)
    except subprocess.TimeoutExpired: srv.kill(); srv.wait()
    for line in Path(err_path).read_text().splitlines():
        if line and not line.startswith((' ', 'Traceback')): errs[line[:100]] += 1

def _burst(a, port, proc, n)->tuple:
    "One burst of `n` starts from a client process, then the wait until the app is idle: (client summary, settle s, [app CPU, its children's])."
    cpu0 = _cpu(proc)
    out = subprocess.run([sys.executable, str(HERE), '--clients', '--port', str(port), '--n', str(n),
                          '--client', a.client, '--timeout', str(a.timeout)], capture_output=True, text=True)
    if out.returncode: raise RuntimeError(f"the client process failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    settle = _settle(port)
    return r, settle, [b - a for a, b in zip(cpu0, _cpu(proc))]

def _check_file(db, accepted):
    with sqlite3.connect(db) as con:
        table = next((t for (t,) in con.execute("select name from sqlite_master where type='table' and name like 'jobs%'")), None)
        rows = dict(con.execute(f"select id, status from {table}")) if table else {}  # (no table: no job was ever saved)
    statuses = collections.Counter(rows.values())
    missing = [i for i in accepted if i not in rows]
    not_ended = [i for i in accepted if i in rows and rows[i] not in TERMINAL]
    return (f"in the file: {dict(statuses)}; accepted starts {len(accepted)}, of which missing {len(missing)}, "
            f"not ended {len(not_ended)}; jobs in the file that no client was told of: {len(set(rows) - set(accepted))}")

def main(a):
    sizes = [int(s) for s in a.sizes.split(',')]
    somaxconn = int(Path('/proc/sys/net/core/somaxconn').read_text()) if Path('/proc/sys/net/core/somaxconn').exists() else None
    builds = [('this', None)] + ([('compare', a.compare)] if a.compare else [])
    with tempfile.TemporaryDirectory() as d:
        servers, errs = {}, collections.Counter()
        try:
            for name, path in builds: servers[name] = _start_server(a, d, name, path)
            srv, port, proc, _, _ = servers['this']
            print(f"server: pid {srv.pid}, loop {a.loop}, listen backlog {a.backlog} (somaxconn {somaxconn}: the kernel "
                  f"keeps min of both), max_waiting_jobs {a.max_waiting or 'none'}, limit_concurrency "
                  f"{a.limit_concurrency or 'none'}, descriptor limit {a.nofile or resource.getrlimit(resource.RLIMIT_NOFILE)[0]}; "
                  f"client: {a.client} in its own process")
            if a.compare: print(f"'compare': a second app process, the same but with PYTHONPATH={a.compare}; bursts alternate "
                                f"between the two (order swapped every round), {a.rounds} round(s) per size")
            print(f"{'build':>7} {'burst':>6} {'answers':<44} {'connected':>9} {'first':>7} {'p50':>7} {'last':>7} {'jobs done':>9} "
                  f"{'app CPU':>10} {'per start':>9} {'its children':>12} {'client CPU':>10}")
            accepted, per_start = collections.defaultdict(list), collections.defaultdict(list)
            for name, _ in builds[:len(builds) if a.compare else 0]:  # (the first burst of a process costs more: imports, caches)
                srv, port, proc, _, _ = servers[name]
                accepted[name] += _burst(a, port, proc, 300)[0]['ids']
            for n in sizes:
                for rnd in range(a.rounds if a.compare else 1):
                    for name, _ in (builds if rnd % 2 == 0 else builds[::-1]):
                        srv, port, proc, _, _ = servers[name]
                        r, settle, cpu = _burst(a, port, proc, n)
                        accepted[name] += r['ids']
                        per_start[name, n].append(cpu[0] / n * 1e3)
                        fmt = lambda v: '-' if v is None else f"{v:.2f}s"
                        print(f"{name:>7} {n:>6} {json.dumps(r['codes']):<44} {fmt(r['connected_s']):>9} {fmt(r['first_s']):>7} "
                              f"{fmt(r['p50_s']):>7} {fmt(r['last_s']):>7} {fmt(r['last_s'] + settle):>9} {cpu[0]:>9.2f}s "
                              f"{cpu[0] / n * 1e3:>7.3f}ms {cpu[1]:>11.2f}s {r['cpu_s']:>9.2f}s", flush=True)
                if a.compare:
                    this, other = per_start['this', n], per_start['compare', n]
                    ratios = sorted(t / o for t, o in zip(this, other))  # (each round's two bursts ran back to back)
                    print(f"        {n:>6} app CPU per start, median: this {sorted(this)[len(this) // 2]:.3f} ms, compare "
                          f"{sorted(other)[len(other) // 2]:.3f} ms; this/compare: median {ratios[len(ratios) // 2]:.2f} "
                          f"(the rounds', sorted: {', '.join(f'{x:.2f}' for x in ratios)})", flush=True)
        finally:
            for name, (srv, _, _, _, err_path) in servers.items(): _stop_server(srv, err_path, errs)
        for name, (_, _, _, db, _) in servers.items():
            print(f"{name + ': ' if a.compare else ''}{_check_file(db, accepted[name])}")
        if errs: print("servers' stderr (lines, without tracebacks):", dict(errs.most_common(5)))


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--sizes', default='1000,2000,4000')
    ap.add_argument('--client', choices=('raw', 'httpx'), default='raw')
    ap.add_argument('--timeout', type=float, default=300.0, help="a client's hang guard per start (seconds)")
    ap.add_argument('--max-waiting', type=int, default=0)
    ap.add_argument('--limit-concurrency', type=int, default=0)
    ap.add_argument('--nofile', type=int, default=0, help="the server's descriptor limit (0: as inherited)")
    ap.add_argument('--backlog', type=int, default=2048, help="uvicorn's listen backlog (its default: 2048)")
    ap.add_argument('--loop', choices=('auto', 'asyncio', 'uvloop'), default='auto')
    ap.add_argument('--inproc-httpx', type=int, default=0, metavar='N')
    ap.add_argument('--compare', metavar='DIR', help="also run an app process with PYTHONPATH=DIR (e.g. a worktree of "
                    "another commit) and alternate bursts between the two: app CPU per start of both, and their ratio")
    ap.add_argument('--rounds', type=int, default=3, help="with --compare: bursts of each size per build")
    ap.add_argument('--serve', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--clients', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--db', help=argparse.SUPPRESS)
    ap.add_argument('--port', type=int, help=argparse.SUPPRESS)
    ap.add_argument('--n', type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve: serve(a)
    elif a.clients: clients(a)
    elif a.inproc_httpx: inproc(a)
    else: main(a)
