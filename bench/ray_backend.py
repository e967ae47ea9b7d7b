"""Local workers against Ray actors, on one machine, in one run: job round trip and throughput.

Run from the repository root:  python bench/ray_backend.py      (needs the extra: pip install -e ".[ray]")
Prints one table (progress on stderr). About 30 s on 2 cores, most of it Ray's start.
"""
from __future__ import annotations
import asyncio, os, platform, statistics, sys, tempfile, time

import psutil

from cjm_workers.backends.ray import RayBackend
from cjm_workers.core.config import WorkerConfig
from cjm_workers.testing import ReferenceJobManager

clock = time.perf_counter
RT_WARMUP, RT_N, TP_JOBS = 100, 1000, 5000


def log(*a): print(*a, file=sys.stderr, flush=True)


def pct(xs, q):
    s = sorted(xs); k = (len(s) - 1) * q / 100; lo = int(k); hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def measure(backend):
    mgr = ReferenceJobManager(worker_config=WorkerConfig(backend=backend))
    async with mgr:
        t = clock(); await mgr.start(wait=True); ready = clock() - t
        for _ in range(RT_WARMUP): await mgr.wait_for_job((await mgr.start_job('echo', text='x')).id, timeout=60)
        lat = []
        for _ in range(RT_N):
            t = clock(); await mgr.wait_for_job((await mgr.start_job('echo', text='x')).id); lat.append(clock() - t)
        t = clock()
        jobs = [await mgr.start_job('echo', text='x') for _ in range(TP_JOBS)]
        for j in jobs: await mgr.wait_for_job(j.id, timeout=300)
        tp = TP_JOBS / (clock() - t)
        assert all(mgr.get_job(j.id).status == 'completed' for j in jobs[-10:])
    return ready, lat, tp


def main():
    import ray
    os.environ.setdefault('RAY_AUTH_MODE', 'disabled')
    log(f"python {platform.python_version()}, {psutil.cpu_count()} CPUs")
    log("local workers …"); local = asyncio.run(measure(None))
    log("starting Ray …")
    t = clock()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix='cjm-ray-'),
             logging_level='warning', log_to_driver=False)
    ray_start = clock() - t
    log("Ray actors …"); actors = asyncio.run(measure(RayBackend()))
    ray.shutdown()
    print(f"\nLocal worker processes vs Ray actors on one machine ({psutil.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, Ray {ray.__version__})")
    print(f"{'backend':<22} | {'worker ready':>12} | {'round trip p50':>14} | {'p99':>9} | {'jobs/s':>8} | {'× local (rt / jobs/s)':>22}")
    print('-' * 102)
    base_rt, base_tp = statistics.median(local[1]), local[2]
    for name, (ready, lat, tp) in (('local processes', local), ('Ray actors', actors)):
        p50 = statistics.median(lat)
        print(f"{name:<22} | {ready * 1e3:>9.0f} ms | {p50 * 1e6:>11,.0f} µs | {pct(lat, 99) * 1e6:>6,.0f} µs | "
              f"{tp:>8,.0f} | {p50 / base_rt:>9.2f}× / {tp / base_tp:>6.2f}×")
    print(f"\nRay start (ray.init, local cluster): {ray_start:.2f} s; round trips: {RT_N} echo jobs one at a time; "
          f"throughput: {TP_JOBS} echo jobs submitted at once; one worker each")


if __name__ == '__main__': main()
