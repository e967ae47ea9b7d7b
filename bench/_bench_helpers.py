"""Child-process bodies for bench/dispatch.py.

They live here, not in dispatch.py, so that a 'spawn' child imports them from a plain module instead of
re-running the benchmark's ``__main__``.
"""
import asyncio, sys


def queue_echo(inbox, outbox):
    "Child of row 1: copy messages from `inbox` to `outbox` until `None`."
    get, put = inbox.get, outbox.put
    while (m := get()) is not None: put(m)


def pipe_echo(conn):
    "Child of row 2: send back every message received on `conn` until `None`."
    recv, send = conn.recv, conn.send
    while (m := recv()) is not None: send(m)
    conn.close()


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
