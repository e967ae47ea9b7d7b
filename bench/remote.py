"""Remote-plugin benchmark: the Universal Worker over HTTP against the multiprocessing worker, in one run.

Run from the repository root:  python bench/remote.py
Prints one table (progress on stderr): job round trips and stream rates for
  * the multiprocessing worker (a `ReferenceJobManager` job, the baseline),
  * a `RemotePluginProxy` calling the Universal Worker directly (sync and async),
  * a job manager whose plugin runs in a Universal Worker (`RemotePluginManager`: both hops).
Ratios are against the multiprocessing worker measured in the same run. About 20 s on 2 cores.
"""
from __future__ import annotations
import asyncio, os, platform, statistics, sys, time

import psutil

from cjm_workers.core.config import WorkerConfig
from cjm_workers.remote.adapter import RemotePluginSpec, remote_worker_entry
from cjm_workers.remote.proxy import RemotePluginProxy
from cjm_workers.testing import ReferenceJobManager

clock = time.perf_counter
RT_WARMUP, RT_N = 200, 2000        # round trips
STREAM_N = 50_000                   # items in one stream
JOBS_RT_N = 1000                    # round trips through a job manager


def log(*a): print(*a, file=sys.stderr, flush=True)


def pct(xs, q):
    s = sorted(xs); k = (len(s) - 1) * q / 100; lo = int(k); hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def fmt_us(sec): return f"{sec * 1e6:,.0f} µs"


def words(n): return ' '.join('w' for _ in range(n))


# ------------------------------------------------------------------------------------------- multiprocessing worker
async def bench_mp():
    mgr = ReferenceJobManager(worker_config=WorkerConfig())
    async with mgr:
        await mgr.start()
        for _ in range(RT_WARMUP):
            await mgr.wait_for_job((await mgr.start_job('echo', text='x')).id)
        lat = []
        for _ in range(RT_N):
            t = clock()
            job = await mgr.start_job('echo', text='x')
            await mgr.wait_for_job(job.id)
            lat.append(clock() - t)
        t = clock()
        job = await mgr.wait_for_job((await mgr.start_job('tokens', text=words(STREAM_N), delay=0)).id, timeout=300)
        took = clock() - t
        assert job.status == 'completed' and len(job.output) == 2 * STREAM_N - 1, (job.status, len(job.output))
    return lat, STREAM_N / took


# ------------------------------------------------------------------------------------------------- proxy, sync/async
def bench_proxy_sync():
    with RemotePluginProxy('cjm_workers.testing', 'EchoPlugin') as p:
        for _ in range(RT_WARMUP): p.execute(text='x')
        lat = []
        for _ in range(RT_N):
            t = clock(); p.execute(text='x'); lat.append(clock() - t)
    with RemotePluginProxy('cjm_workers.testing', 'TokenStreamPlugin') as p:
        list(p.execute_stream(text=words(1000), delay=0))
        t = clock(); n = sum(1 for _ in p.execute_stream(text=words(STREAM_N), delay=0)); took = clock() - t
        assert n == STREAM_N, n
    return lat, STREAM_N / took


async def bench_proxy_async():
    async with RemotePluginProxy('cjm_workers.testing', 'EchoPlugin') as p:
        for _ in range(RT_WARMUP): await p.aexecute(text='x')
        lat = []
        for _ in range(RT_N):
            t = clock(); await p.aexecute(text='x'); lat.append(clock() - t)
    async with RemotePluginProxy('cjm_workers.testing', 'TokenStreamPlugin') as p:
        n, t = 0, clock()
        async for _ in p.aexecute_stream(text=words(STREAM_N), delay=0): n += 1
        took = clock() - t
        assert n == STREAM_N, n
    return lat, STREAM_N / took


# ------------------------------------------------------------------------------------- job manager on remote plugins
async def bench_remote_jobs():
    specs = [RemotePluginSpec('echo', 'cjm_workers.testing', 'EchoPlugin'),
             RemotePluginSpec('tokens', 'cjm_workers.testing', 'TokenStreamPlugin', streams=True)]
    mgr = ReferenceJobManager(worker_config=WorkerConfig(), entry_point=remote_worker_entry(specs))
    async with mgr:
        await mgr.start()
        for _ in range(RT_WARMUP // 2):
            await mgr.wait_for_job((await mgr.start_job('echo', text='x')).id, timeout=60)
        lat = []
        for _ in range(JOBS_RT_N):
            t = clock()
            job = await mgr.start_job('echo', text='x')
            job = await mgr.wait_for_job(job.id)
            lat.append(clock() - t)
        assert job.status == 'completed', job.error
        await mgr.wait_for_job((await mgr.start_job('tokens', text=words(100), delay=0)).id, timeout=60)
        t = clock()
        job = await mgr.wait_for_job((await mgr.start_job('tokens', text=words(STREAM_N), delay=0)).id, timeout=300)
        took = clock() - t
        assert job.status == 'completed' and len(job.output) == 2 * STREAM_N - 1, (job.status, job.error)
    return lat, STREAM_N / took


def main():
    log(f"python {platform.python_version()}, {psutil.cpu_count()} CPUs, {platform.platform()}")
    log("multiprocessing worker …"); mp_lat, mp_rate = asyncio.run(bench_mp())
    log("proxy (sync) …"); ps_lat, ps_rate = bench_proxy_sync()
    log("proxy (async) …"); pa_lat, pa_rate = asyncio.run(bench_proxy_async())
    log("job manager on a Universal Worker …"); rj_lat, rj_rate = asyncio.run(bench_remote_jobs())
    base_rt, base_rate = statistics.median(mp_lat), mp_rate
    rows = [('multiprocessing worker: job (baseline)', mp_lat, mp_rate),
            ('RemotePluginProxy.execute / execute_stream (sync)', ps_lat, ps_rate),
            ('RemotePluginProxy.aexecute / aexecute_stream (async)', pa_lat, pa_rate),
            ('job manager → worker → Universal Worker (job)', rj_lat, rj_rate)]
    w = max(len(r[0]) for r in rows)
    print(f"\nRemote plugins vs the multiprocessing worker ({psutil.cpu_count()} CPUs, Python {platform.python_version()})")
    print(f"{'path':<{w}} | {'round trip p50':>14} | {'p99':>9} | {'× baseline':>10} | {'stream items/s':>14} | {'× baseline':>10}")
    print('-' * (w + 72))
    for name, lat, rate in rows:
        p50 = statistics.median(lat)
        print(f"{name:<{w}} | {fmt_us(p50):>14} | {fmt_us(pct(lat, 99)):>9} | {p50 / base_rt:>9.2f}× | "
              f"{rate:>14,.0f} | {rate / base_rate:>9.2f}×")
    print(f"\nround trips: {RT_N} (jobs through the remote job manager: {JOBS_RT_N}); stream: {STREAM_N:,} items, "
          "delay 0; echo plugin with a one-character text")


if __name__ == '__main__': main()
