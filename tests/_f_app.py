"""A stand-in "app" for the fault suite's app-SIGKILL scenario: a manager with 3 workers on a SQLite job store
(argv: path, seed, number of jobs). It submits a random mix of jobs, waits until some have completed and every worker
is running one, makes sure the store has that, prints one JSON line (submitted ids, completed ids with their text,
worker pids) and carries on working until the test SIGKILLs it."""
import asyncio, json, random, sys


async def main(path, seed, n):
    from cjm_workers.stores.sqlite import SQLiteJobStore
    from cjm_workers.testing import wait_until
    from _f_plugins import FJobManager
    rng = random.Random(seed)
    mgr = FJobManager(SQLiteJobStore(path), config=dict(max_workers=3, prefetch=2))
    await mgr.start(wait=True)
    jobs = []
    for i in range(n):
        kind = rng.choice(['echo', 'tokens', 'slow'])
        if kind == 'echo': jobs.append(await mgr.start_job('echo', text=f"e{i}", sleep=rng.uniform(0, 0.05)))
        elif kind == 'tokens': jobs.append(await mgr.start_job('tokens', text=f"t{i} a b c d", delay=0.01))
        else: jobs.append(await mgr.start_job('slow', seconds=rng.uniform(0.2, 1.0), max_retries=rng.choice([0, 1])))
    await wait_until(lambda: sum(j.status == 'completed' for j in jobs) >= 3
                     and sum(j.status == 'running' for j in jobs) >= 3, 60, 0.001)
    done = {j.id: j.result['text'] for j in jobs if j.status == 'completed'}
    assert mgr.job_store.flush(30)  # what this process has seen is in the file
    print(json.dumps({'submitted': [j.id for j in jobs], 'completed': done,
                      'pids': [s['pid'] for s in mgr.get_worker_stats()]}), flush=True)
    await asyncio.sleep(600)  # until the test SIGKILLs this process (it keeps running jobs meanwhile)


if __name__ == '__main__':  # the guard matters: 'spawn' re-imports this file in the workers
    sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
