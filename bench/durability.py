"""Benchmark of durability and scheduling (issue 5).

Rows (all measured in the same run, so they compare with each other):
  1. pipelined throughput of 10,000 trivial `echo` jobs through one worker, in-memory store vs SQLite store
     (runs interleaved, the order alternating: memory, sqlite, sqlite, memory, ...; median of 3 each after a warm-up
     run) — target >= 0.8x; also the SQLite store's rows written per job and jobs per commit
  2. RSS growth of the app process after 100,000 finished jobs, SQLite store (default job_cache_size=1000)
     vs in-memory store, each in a fresh subprocess — target <= 50 MB with the SQLite store
  3. throughput of 10 ms CPU-burning jobs with 1, 2 and 4 workers (speed-up against 1 worker)

Run from the repository root:  python bench/durability.py   (progress on stderr, the table on stdout)
"""
import asyncio, gc, json, os, platform, statistics, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _bench_helpers as helpers  # noqa: E402
from cjm_workers.stores.sqlite import SQLiteJobStore  # noqa: E402

TP_JOBS, TP_REPS = 10_000, 3
MEM_JOBS = 100_000
BURN_MS, BURN_JOBS = 10, 400


def log(msg): print(msg, file=sys.stderr, flush=True)


async def _burst(mgr, n):
    gc.collect()
    t0 = time.perf_counter()
    jobs = [await mgr.start_job('echo', text='x') for _ in range(n)]
    await mgr.wait_for_job(jobs[-1].id, timeout=300)
    t1 = time.perf_counter()
    bad = [j for j in jobs if j.status != 'completed']
    if bad: raise RuntimeError(f"{len(bad)} of {n} jobs did not complete (first: {bad[0].status} {bad[0].error})")
    mgr.clear_completed_jobs()
    return n / (t1 - t0)


async def bench_store_throughput(tmp):
    mem = helpers.bench_manager()
    sql = helpers.bench_manager(SQLiteJobStore(f"{tmp}/tp.db"))
    rates, store = {'memory': [], 'sqlite': []}, sql.job_store
    try:
        for m in (mem, sql): await m.start(wait=True)
        for rep in range(TP_REPS + 1):  # rep 0 warms both up
            if rep == 1: before = dict(store.stats)
            pair = (('memory', mem), ('sqlite', sql))
            for name, m in (pair if rep % 2 == 0 else pair[::-1]):  # alternate the order: neither always goes first
                r = await _burst(m, TP_JOBS)
                if rep: rates[name].append(r)
                log(f"  {name} run {rep}: {r:,.0f} jobs/s")
        rows, batches = (store.stats[k] - before[k] for k in ('rows', 'batches'))
        rates['written'] = (rows / (TP_REPS * TP_JOBS), rows / max(batches, 1))
    finally:
        for m in (mem, sql): await m.ashutdown()
    return rates


def bench_memory(tmp):
    out = {}
    for kind in ('sqlite', 'memory'):
        log(f"  {kind}: {MEM_JOBS:,} jobs in a fresh process ...")
        p = subprocess.run([sys.executable, '-c', f"import _bench_helpers as h; h.memory_main({kind!r}, {MEM_JOBS}, "
                            f"{str(Path(tmp) / 'mem.db')!r})"], cwd=HERE, capture_output=True, text=True, timeout=900)
        if p.returncode: raise RuntimeError(f"memory child ({kind}) failed:\n{p.stderr[-3000:]}")
        out[kind] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


async def bench_workers():
    out = {}
    for n in (1, 2, 4):
        mgr = helpers.bench_manager(entry=helpers.burn_worker, max_workers=n, prefetch=2)
        try:
            await mgr.start(wait=True)
            for _ in range(2 * n): await mgr.wait_for_job((await mgr.start_job('burn', ms=1)).id)  # load the plugin
            t0 = time.perf_counter()
            jobs = [await mgr.start_job('burn', ms=BURN_MS) for _ in range(BURN_JOBS)]
            for j in jobs: await mgr.wait_for_job(j.id, timeout=300)
            t1 = time.perf_counter()
            if any(j.status != 'completed' for j in jobs): raise RuntimeError("a burn job did not complete")
            out[n] = (BURN_JOBS / (t1 - t0), len({j.worker_pid for j in jobs}))
            log(f"  {n} worker(s): {out[n][0]:,.1f} jobs/s on {out[n][1]} worker(s)")
        finally: await mgr.ashutdown()
    return out


def main():
    t_start = time.perf_counter()
    print("cjm_workers durability and scheduling benchmark")
    print(f"cores   : {os.cpu_count()} logical; Python {platform.python_version()} on {platform.platform()}")
    print(f"load avg: {', '.join(f'{x:.2f}' for x in os.getloadavg())} (at start)\n")
    with tempfile.TemporaryDirectory() as tmp:
        log("1: throughput, in-memory vs SQLite store ...")
        rates = asyncio.run(bench_store_throughput(tmp))
        log("2: memory after 100,000 finished jobs ...")
        mem = bench_memory(tmp)
    log("3: 10 ms CPU jobs on 1, 2, 4 workers ...")
    burn = asyncio.run(bench_workers())

    m, s = statistics.median(rates['memory']), statistics.median(rates['sqlite'])
    print(f"1. pipelined throughput, {TP_JOBS:,} echo jobs, 1 worker (median of {TP_REPS}, runs interleaved)")
    print(f"   in-memory store : {m:>9,.0f} jobs/s   runs: {', '.join(f'{x:,.0f}' for x in rates['memory'])}")
    print(f"   SQLite store    : {s:>9,.0f} jobs/s   runs: {', '.join(f'{x:,.0f}' for x in rates['sqlite'])}")
    print(f"   ratio           : {s / m:.2f}x   (target >= 0.8x: {'PASS' if s / m >= 0.8 else 'MISS'})   "
          f"per-run ratios: {', '.join(f'{a / b:.2f}' for a, b in zip(rates['sqlite'], rates['memory']))}")
    per_job, per_commit = rates['written']
    print(f"   SQLite writes   : {per_job:.2f} rows per job (queued + final, when not merged), {per_commit:,.0f} rows per commit")
    print(f"2. app-process RSS growth after {MEM_JOBS:,} finished echo jobs (fresh process each)")
    for kind in ('sqlite', 'memory'):
        r = mem[kind]
        grow = (r['after'] - r['before']) / 2**20
        verdict = f"(target <= 50 MB: {'PASS' if grow <= 50 else 'MISS'})" if kind == 'sqlite' else '(no target: keeps every job)'
        print(f"   {kind:<7} store : +{grow:6.1f} MB (RSS {r['before'] / 2**20:.0f} -> {r['after'] / 2**20:.0f} MB; "
              f"{r['completed']:,} completed in the store, {r['cached']} in memory; {MEM_JOBS / r['seconds']:,.0f} jobs/s) {verdict}")
    base = burn[1][0]
    print(f"3. {BURN_JOBS} jobs burning {BURN_MS} ms of CPU each (prefetch=2)")
    for n, (rate, used) in burn.items():
        print(f"   {n} worker(s)     : {rate:7.1f} jobs/s  {rate / base:.2f}x of 1 worker  ({used} worker pid(s) used)")
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s; load avg at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
