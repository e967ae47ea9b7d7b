"""Child-process bodies for bench/dispatch.py.

They live here, not in dispatch.py, so that a 'spawn' child imports them from a plain module instead of
re-running the benchmark's ``__main__``.
"""
import asyncio, os, pickle, struct, sys


def queue_echo(inbox, outbox):
    "Child of row 1: copy messages from `inbox` to `outbox` until `None`."
    get, put = inbox.get, outbox.put
    while (m := get()) is not None: put(m)


def pipe_echo(conn):
    "Child of row 2: send back every message received on `conn` until `None`."
    recv, send = conn.recv, conn.send
    while (m := recv()) is not None: send(m)
    conn.close()


_LENGTH = struct.Struct('<I')

def frame(obj)->list:
    "Row 3a's wire format: a 4-byte length, then the pickle (as buffers for `os.writev`)."
    data = pickle.dumps(obj)
    return [_LENGTH.pack(len(data)), data]

def take_frames(buf:bytearray)->list:
    "Cut every complete frame off the front of `buf` and return them unpickled (row 3a)."
    out = []
    while len(buf) >= 4 and len(buf) >= 4 + (n := _LENGTH.unpack_from(buf)[0]):
        out.append(pickle.loads(bytes(buf[4:4 + n]))); del buf[:4 + n]
    return out


def floor_worker(requests, results):
    """Child of row 3a: the least a worker must do per job. Read frames from `requests` (a blocking read in the main
    thread), and for each one write a `started` frame, then a `result` frame, to `results`."""
    rfd, wfd, buf = requests.fileno(), results.fileno(), bytearray()
    while chunk := os.read(rfd, 65536):
        buf += chunk
        for msg in take_frames(buf):
            if msg is None: return
            os.writev(wfd, frame({'type': 'started', 'job_id': msg['job_id'], 'pid': os.getpid()}))
            os.writev(wfd, frame({'type': 'result', 'job_id': msg['job_id'], 'status': 'success',
                                  'data': {'text': msg['text'], 'metadata': {}}, 'error': None, 'traceback': None}))


async def _app_main():
    from cjm_workers.core.config import WorkerConfig
    from cjm_workers.testing import ReferenceJobManager, wait_until
    mgr = ReferenceJobManager(WorkerConfig())
    await mgr.start(wait=True)
    job = await mgr.start_job('slow', seconds=300)
    await wait_until(lambda: job.status == 'running', 60, interval=0.001)
    print(mgr.get_worker_stats()[0]['pid'], flush=True)
    await asyncio.sleep(600)  # until the benchmark SIGKILLs this process


def app_main():
    """Body of the stand-in "app" of row 9 (run as `python -c "import _bench_helpers as h; h.app_main()"`, so the
    spawned worker never re-imports a `__main__` file): start a manager and a `slow` job, print the worker pid,
    then wait to be killed."""
    asyncio.run(_app_main())


if __name__ == '__main__':
    if sys.argv[1:] == ['app']: app_main()


# ------------------------------------------------------------------------------------ bench/durability.py helpers
import json, os, time


def _burn_plugins():
    from cjm_workers.testing import REFERENCE_PLUGINS, ReferencePlugin, ReferencePluginManager

    class BurnPlugin(ReferencePlugin):
        "Burns CPU (a busy loop) for `ms` milliseconds."
        name = 'burn'
        def execute(self, ms: float = 10.0, **kwargs):
            end = time.thread_time() + ms / 1000
            n = 0
            while time.thread_time() < end: n += 1
            return {'text': str(n), 'metadata': {'pid': os.getpid()}}

    return ReferencePluginManager({**REFERENCE_PLUGINS, 'burn': BurnPlugin})


def burn_worker(request_queue, result_queue, response_queue):
    "Worker entry point: the reference plugins plus `burn` (CPU for `ms` milliseconds)."
    from cjm_workers.core.worker import base_worker_process
    base_worker_process(request_queue, result_queue, response_queue, plugin_manager_factory=_burn_plugins)


def bench_manager(store=None, entry=None, **config):
    "A ReferenceJobManager with a job store (the reference manager's constructor predates `job_store`)."
    from cjm_workers.core.config import WorkerConfig
    from cjm_workers.testing import ReferenceJobManager, reference_worker
    m = ReferenceJobManager(WorkerConfig(**config), entry_point=entry or reference_worker)
    if store is not None: m.job_store = store
    return m


async def _memory_main(kind: str, n: int, path: str):
    import gc, psutil
    from cjm_workers.stores.sqlite import SQLiteJobStore
    me = psutil.Process()
    mgr = bench_manager(SQLiteJobStore(path) if kind == 'sqlite' else None)
    await mgr.start(wait=True)
    for _ in range(300): await mgr.wait_for_job((await mgr.start_job('echo', text='x')).id)  # warm up
    gc.collect()
    before = me.memory_info().rss
    t0 = time.perf_counter()
    for start in range(0, n, 10_000):
        jobs = [await mgr.start_job('echo', text='x') for _ in range(min(10_000, n - start))]
        await mgr.wait_for_job(jobs[-1].id, timeout=300)
        del jobs
    took = time.perf_counter() - t0
    gc.collect()
    after = me.memory_info().rss
    done = mgr.count_jobs('completed')
    await mgr.ashutdown()
    print(json.dumps({'before': before, 'after': after, 'completed': done, 'seconds': took, 'cached': len(mgr.jobs)}),
          flush=True)


def memory_main(kind: str, n: int, path: str):
    "Child of bench/durability.py: run `n` jobs through a manager with the `kind` store, print RSS before/after."
    import asyncio
    asyncio.run(_memory_main(kind, n, path))
