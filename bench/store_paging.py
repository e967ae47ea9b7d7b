"""How long one page of `SQLiteJobStore.list` takes at the top of a 100,000-job store and deep in it (issue 5: paging).

Prints the median of 5 reads of 50 jobs at offsets 0, 10,000, 50,000 and 99,950, newest first, all jobs and one
status, and the ratio of each to the first page. Run from the repository root: `python bench/store_paging.py`."""
import statistics, sys, tempfile, time
from pathlib import Path

from cjm_workers.stores.sqlite import SQLiteJobStore
from cjm_workers.testing import ReferenceJob

N = 100_000

def main():
    d = tempfile.mkdtemp()
    store = SQLiteJobStore(Path(d) / 'jobs.db'); store.bind('reference'); store.acquire('bench'); store.open()
    t0 = time.perf_counter()
    for i in range(1, N + 1):
        j = ReferenceJob(id=f"job-{i:06}", plugin_id='echo', status='completed' if i % 3 else 'failed', params={'text': str(i)})
        j._seq = i
        store.save(j)
    if not store.flush(120): sys.exit("the store did not write the jobs")
    print(f"{N:,} jobs written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"{'status':>10} {'offset':>8} {'ms per page':>12} {'x page 1':>9}")
    for status in (None, 'failed'):
        first = None
        for offset in (0, 10_000, 50_000, 99_950 if status is None else 33_283):
            times = []
            for _ in range(5):
                t = time.perf_counter()
                page = store.list(status, limit=50, offset=offset, newest_first=True)
                times.append(time.perf_counter() - t)
            assert len(page) == 50 or offset > 0, len(page)
            ms = statistics.median(times) * 1e3
            first = first or ms
            print(f"{str(status):>10} {offset:>8,} {ms:>12.2f} {ms / first:>9.1f}")
    store.release(); store.close()

if __name__ == '__main__': main()
