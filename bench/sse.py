"""SSE fan-out benchmark: 1,000 SSE clients on loopback, a 100-event burst.

    python bench/sse.py [--clients 1000] [--events 100]

Three processes: the server (a FastHTML app under uvicorn with one `SSEBroadcaster`, started as `bench/sse.py
--serve`), the clients (`--clients-proc`: raw asyncio sockets, no HTTP library, so they cost little), and this one,
which coordinates them and reads the server's CPU time with psutil. Every event carries its broadcast time
(`time.time()` in the server); a client's receive time minus that is the delivery latency.

Two burst shapes are measured:
  tight: the 100 `broadcast` calls run back to back in one step of the event loop (a backlog flushed at once);
  paced: each goes through `asyncio.wait_for(broadcaster.broadcast(...), timeout)`, the way
         `BaseJobManager.broadcast_event` calls it, so the loop runs (and streams write) between events.
Then, in this process, the same fan-out (1,000 subscribers, 100 events, 1,000 reader tasks, no HTTP) through
`SSEBroadcaster` and through cjm-fasthtml-sse's `SSEBroadcastManager` as a baseline.
"""
import argparse, asyncio, json, os, platform, re, socket, statistics, subprocess, sys, time
from pathlib import Path

TARGET_P99_MS = 250.0


# --- server process ---------------------------------------------------------------------------------------------

def serve():
    import uvicorn
    from fasthtml.common import FastHTML
    from cjm_workers.fasthtml.sse import SSEBroadcaster

    bc = SSEBroadcaster()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY (uvicorn binding itself would)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(('127.0.0.1', 0))

    async def lifespan(app):
        print('PORT', sock.getsockname()[1], flush=True)
        yield
        bc.close()

    app = FastHTML(lifespan=lifespan)
    @app.get('/events')
    def events(request): return bc.stream(request, job_id='bench')
    @app.get('/clients')
    def clients(): return str(bc.clients)
    @app.post('/burst')
    async def burst(n: int, paced: int):
        if paced:
            for i in range(n): await asyncio.wait_for(bc.broadcast('bench:chunk', {'job_id': 'bench', 'i': i, 't': time.time()}), 5)
        else:
            for i in range(n): bc.publish('bench:chunk', {'job_id': 'bench', 'i': i, 't': time.time()})
        return 'ok'
    @app.post('/flush')
    def flush(seconds: float):
        bc.flush_interval = seconds
        return 'ok'
    @app.get('/info')
    async def info():
        loop = type(asyncio.get_running_loop()).__module__.split('.')[0]
        return f"{loop}"

    uvicorn.Server(uvicorn.Config(app, log_level='warning', backlog=4096)).run(sockets=[sock])


# --- client process ---------------------------------------------------------------------------------------------

_T = re.compile(rb'"t":([0-9.]+)')

class _Client(asyncio.Protocol):
    def __init__(self, stats):
        self.stats, self.buf, self.count, self.ready = stats, b'', 0, False
    def connection_made(self, transport):
        transport.write(b'GET /events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n')
    def data_received(self, data):
        now = time.time()
        self.buf += data
        cut = self.buf.rfind(b'\n\n')
        if cut < 0: return
        done, self.buf = self.buf[:cut], self.buf[cut + 2:]
        if not self.ready and b'retry:' in done:
            self.ready = True
            self.stats['ready'] += 1
        ts = _T.findall(done)
        if ts:
            self.count += len(ts)
            self.stats['delivered'] += len(ts)
            self.stats['lat'].extend(now - float(t) for t in ts)
            self.stats['last'] = now
    def connection_lost(self, exc): self.stats['lost'] += 1


async def _clients_main(port, n):
    loop = asyncio.get_running_loop()
    stats = dict(ready=0, delivered=0, lat=[], lost=0, last=0.0)
    conns = []
    for i in range(0, n, 100):  # connect in slices so the server's accept backlog never overflows
        conns += await asyncio.gather(*(loop.create_connection(lambda: _Client(stats), '127.0.0.1', port) for _ in range(min(100, n - i))))
    while stats['ready'] < n: await asyncio.sleep(0.01)
    print('CONNECTED', flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        if line[0] != 'ARM': break
        expected = int(line[1]) * n
        stats.update(delivered=0, lat=[], last=0.0)
        print('ARMED', flush=True)
        end = time.monotonic() + 60
        while stats['delivered'] < expected and time.monotonic() < end and not stats['lost']: await asyncio.sleep(0.005)
        lat = sorted(stats['lat'])
        q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float('nan')
        print('RESULT', json.dumps(dict(delivered=stats['delivered'], expected=expected, p50=q(0.50), p99=q(0.99),
                                        max=lat[-1] * 1000 if lat else float('nan'), lost=stats['lost'],
                                        last=stats['last'])), flush=True)
    for t, _ in conns: t.close()


def clients_proc(port, n):
    try:
        import uvloop; uvloop.install()
    except ImportError: pass
    asyncio.run(_clients_main(port, n))


# --- in-process fan-out (no HTTP) -------------------------------------------------------------------------------

async def _inproc_ours(n, events):
    from cjm_workers.fasthtml.sse import SSEBroadcaster
    bc = SSEBroadcaster(max_queue_size=events + 1)
    subs = [bc.subscribe(job_id='bench') for _ in range(n)]
    lat = []
    async def read(sub):
        got = 0
        while got < events:
            batch = await sub.next_batch()
            now = time.perf_counter()
            lat.extend(now - e.data['t'] for e in batch)
            got += len(batch)
    tasks = [asyncio.create_task(read(s)) for s in subs]
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    for i in range(events): await asyncio.wait_for(bc.broadcast('bench:chunk', {'job_id': 'bench', 'i': i, 't': time.perf_counter()}), 5)
    t_bc = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    bc.close()
    return t_bc, time.perf_counter() - t0, sorted(lat)


async def _inproc_upstream(n, events):
    from cjm_fasthtml_sse.core import SSEBroadcastManager
    mgr = SSEBroadcastManager(max_queue_size=events + 1)
    queues = [await mgr.register_connection() for _ in range(n)]
    lat = []
    async def read(q):
        for _ in range(events):
            m = await q.get()
            lat.append(time.perf_counter() - m['data']['t'])
    tasks = [asyncio.create_task(read(q)) for q in queues]
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    for i in range(events): await mgr.broadcast('bench:chunk', {'job_id': 'bench', 'i': i, 't': time.perf_counter()})
    t_bc = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    return t_bc, time.perf_counter() - t0, sorted(lat)


# --- coordinator ------------------------------------------------------------------------------------------------

def _pct(lat, p): return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000


def _readline(proc, prefix, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line: raise RuntimeError(f"process ended before printing {prefix!r} (exit {proc.poll()})")
        if line.startswith(prefix): return line[len(prefix):].strip()
    raise RuntimeError(f"no {prefix!r} line in {timeout}s")


def _get(port, path, method='GET'):
    with socket.create_connection(('127.0.0.1', port)) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        data = b''
        while chunk := s.recv(65536): data += chunk
    return data.split(b'\r\n\r\n', 1)[1].decode()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--clients', type=int, default=1000)
    ap.add_argument('--events', type=int, default=100)
    ap.add_argument('--serve', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--clients-proc', type=int, nargs=2, metavar=('PORT', 'N'), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve: return serve()
    if a.clients_proc: return clients_proc(*a.clients_proc)

    import psutil
    t_start = time.monotonic()
    me = Path(__file__).resolve()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(me.parents[1]), os.environ.get('PYTHONPATH')) if p))
    print("cjm_workers SSE broadcaster benchmark")
    print(f"CPU     : {platform.processor() or platform.machine()}; cores: {os.cpu_count()} logical")
    print(f"Python  : {platform.python_implementation()} {platform.python_version()} on {platform.platform()}")
    print(f"load avg: {', '.join(f'{x:.2f}' for x in os.getloadavg())} (at start)")
    server = subprocess.Popen([sys.executable, str(me), '--serve'], stdout=subprocess.PIPE, text=True, env=env)
    client = None
    rows = []
    try:
        port = int(_readline(server, 'PORT'))
        sp = psutil.Process(server.pid)
        t0 = time.monotonic()
        client = subprocess.Popen([sys.executable, str(me), '--clients-proc', str(port), str(a.clients)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        _readline(client, 'CONNECTED', 120)
        while int(_get(port, '/clients')) < a.clients: time.sleep(0.01)
        print(f"server  : uvicorn, {_get(port, '/info')} loop; {a.clients} SSE clients connected in {time.monotonic() - t0:.2f} s",
              file=sys.stderr)
        cp = psutil.Process(client.pid)
        for mode, paced, flush in (('tight', 0, .01), ('paced', 1, .01), ('tight', 0, .01), ('paced', 1, .01),
                                   ('tight', 0, 0.0), ('paced', 1, 0.0)):
            _get(port, f"/flush?seconds={flush}", 'POST')
            client.stdin.write(f"ARM {a.events}\n"); client.stdin.flush()
            _readline(client, 'ARMED')
            c0, k0, w0 = sum(sp.cpu_times()[:2]), sum(cp.cpu_times()[:2]), time.time()
            _get(port, f"/burst?n={a.events}&paced={paced}", 'POST')
            res = json.loads(_readline(client, 'RESULT'))
            c1, k1 = sum(sp.cpu_times()[:2]), sum(cp.cpu_times()[:2])
            rows.append((mode, flush, res, c1 - c0, k1 - k0, res['last'] - w0))
        client.stdin.write("END\n"); client.stdin.flush()
        client.wait(30)
    finally:
        for p in (client, server):
            if p is not None and p.poll() is None:
                p.terminate()
                try: p.wait(15)
                except subprocess.TimeoutExpired: p.kill(); p.wait()

    print(f"\n{a.clients} SSE clients over HTTP on 127.0.0.1, one {a.events}-event burst per row "
          f"(expect {a.clients * a.events:,} events delivered)\n")
    hdr = ('burst', 'flush_interval', 'delivered', 'p50', 'p99', 'max', 'last event in', 'server CPU', 'client CPU', 'p99 <= 250 ms')
    w = (6, 14, 10, 9, 9, 9, 13, 10, 10, 13)
    print('  '.join(f"{h:<{n}}" if i == 0 else f"{h:>{n}}" for i, (h, n) in enumerate(zip(hdr, w))))
    for mode, flush, r, cpu, ccpu, span in rows:
        good = r['delivered'] == r['expected'] and r['p99'] <= TARGET_P99_MS
        cells = (mode, f"{flush * 1000:.0f} ms", f"{r['delivered']:,}", f"{r['p50']:.1f} ms", f"{r['p99']:.1f} ms",
                 f"{r['max']:.1f} ms", f"{span * 1000:.0f} ms", f"{cpu * 1000:.0f} ms", f"{ccpu * 1000:.0f} ms",
                 'PASS' if good else 'MISS')
        print('  '.join(f"{c:<{n}}" if i == 0 else f"{c:>{n}}" for i, (c, n) in enumerate(zip(cells, w))))
    print("  last event in: from the burst request to the last event received; server/client CPU: user+system time of\n"
          "  those processes over the same span (psutil). flush_interval 0 = a write per event per client (for comparison).")

    print(f"\nin-process fan-out, {a.clients} subscribers x {a.events} events, {a.clients} reader tasks, "
          "broadcasts awaited one by one (no HTTP)\n")
    print(f"{'broadcaster':<40}  {'per broadcast':>14}  {'all read in':>12}  {'p50':>10}  {'p99':>10}")
    res = {}
    for name, fn in (('cjm_workers SSEBroadcaster', _inproc_ours), ('cjm_fasthtml_sse SSEBroadcastManager', _inproc_upstream)):
        t_bc, t_all, lat = asyncio.run(fn(a.clients, a.events))
        res[name] = t_bc
        print(f"{name:<40}  {t_bc / a.events * 1e6:>11.0f} µs  {t_all * 1000:>9.1f} ms  {_pct(lat, .5):>7.2f} ms  {_pct(lat, .99):>7.2f} ms")
    ours, theirs = res.values()
    print(f"\nSSEBroadcaster broadcast is {theirs / ours:.1f}x faster than SSEBroadcastManager's at {a.clients} subscribers")
    print(f"\ntotal benchmark time {time.monotonic() - t_start:.1f} s; load avg at end: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
