"""A stand-in "app" process for test_store's SIGKILL test: a manager on a SQLite job store (path in argv[1]).

It completes a few jobs, then leaves two jobs running (one that opted into retries) and a few queued, makes sure
the store has all of that, prints one JSON line with the job ids, and waits to be killed."""
import asyncio, json, sys


async def main(path):
    from cjm_workers.stores.sqlite import SQLiteJobStore
    from cjm_workers.testing import wait_until
    from _d_helpers import StoreJobManager
    mgr = StoreJobManager(SQLiteJobStore(path), config=dict(max_workers=2, prefetch=1))
    await mgr.start(wait=True)
    done = []
    for i in range(5):
        j = await mgr.wait_for_job((await mgr.start_job('echo', text=f"done {i}")).id, timeout=60)
        assert j.status == 'completed'
        done.append(j.id)  # wait_for_job returned: the final state is committed
    stuck = await mgr.start_job('slow', seconds=300)
    retried = await mgr.start_job('slow', seconds=0.2, max_retries=1)
    await wait_until(lambda: stuck.status == 'running' and retried.status == 'running', 60)
    queued = [await mgr.start_job('echo', text=f"queued {i}", priority=p) for i, p in enumerate([0, 5, 0])]
    assert mgr.job_store.flush(30)  # the running and queued states are written too
    print(json.dumps({'done': done, 'stuck': stuck.id, 'retried': retried.id, 'queued': [j.id for j in queued],
                      'pids': [s['pid'] for s in mgr.get_worker_stats()]}), flush=True)
    await asyncio.sleep(600)  # until the test SIGKILLs this process


if __name__ == '__main__':  # the guard matters: 'spawn' re-imports this file in the workers
    sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))
    asyncio.run(main(sys.argv[1]))
