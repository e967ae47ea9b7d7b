"""Helpers for the durability, scheduling and pool tests (issue 5), importable by spawned workers.

- `StoreJobManager`: the reference manager with a `job_store` keyword (the reference manager's constructor predates it);
  the `mk` fixture (conftest) builds them and shuts them down after the test; `run_job` starts a job and waits for it.
- `d_worker`: the reference plugins plus `env` (returns the worker's environment variables asked for), `flaky`
  (fails until it has been run `fail_times` times for one `key`, counting in a file, then succeeds) and `runlog`
  (appends the job's id to a file each time it runs: how many times did a job run?).
"""
import os, time
from pathlib import Path

from cjm_workers.core.config import WorkerConfig
from cjm_workers.core.worker import base_worker_process
from cjm_workers.testing import REFERENCE_PLUGINS, ReferencePlugin, ReferencePluginManager, ReferenceJobManager


class EnvPlugin(ReferencePlugin):
    "Returns the values of the environment variables named in `names`, and the worker's pid (after `sleep` seconds)."
    name = 'env'
    def execute(self, names=(), sleep=0.0, **kwargs):
        if sleep: time.sleep(sleep)
        return {'text': '', 'metadata': {'env': {n: os.environ.get(n) for n in names}, 'pid': os.getpid()}}


class FlakyPlugin(ReferencePlugin):
    "Fails (ValueError) on its first `fail_times` runs for `counter` (a file path), then returns the run number (and the job's attempt)."
    name = 'flaky'
    def execute(self, counter='', fail_times=1, **kwargs):
        from cjm_workers.core.worker import current_job
        p = Path(counter)
        n = int(p.read_text()) + 1 if p.exists() else 1
        p.write_text(str(n))
        if n <= fail_times: raise ValueError(f"flaky run {n}")
        return {'text': f"run {n}", 'metadata': {'pid': os.getpid(), 'attempt': current_job().attempt}}


class RunLogPlugin(ReferencePlugin):
    "Appends `<job id>\\n` to the file `log` (one write), sleeps `sleep` seconds, returns the job id."
    name = 'runlog'
    def execute(self, log='', sleep=0.0, **kwargs):
        from cjm_workers.core.worker import current_job
        jid = current_job().job_id
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try: os.write(fd, f"{jid}\n".encode())
        finally: os.close(fd)
        if sleep: time.sleep(sleep)
        return {'text': jid, 'metadata': {}}


def _pm(): return ReferencePluginManager({**REFERENCE_PLUGINS, 'env': EnvPlugin, 'flaky': FlakyPlugin, 'runlog': RunLogPlugin})


def d_worker(request_queue, result_queue, response_queue):
    "Worker entry point: the reference plugins plus `env` and `flaky`."
    base_worker_process(request_queue, result_queue, response_queue, plugin_manager_factory=_pm, supports_streaming=True)


class StoreJobManager(ReferenceJobManager):
    "The reference manager with a job store (and the `d_worker` entry point by default)."
    def __init__(self, job_store=None, config=None, entry_point=d_worker, **kw):
        super().__init__(worker_config=WorkerConfig(**(config or {})), entry_point=entry_point, **kw)
        if job_store is not None: self.job_store = job_store


def terminal_events(broadcaster, job_id):
    "The terminal events (completed/failed/cancelled) the broadcaster saw for a job."
    return [e for e in broadcaster.of(job_id) if e in ('completed', 'failed', 'cancelled')]


async def run_job(mgr, plugin, timeout: float = 30, **kw):
    "Start a job and wait for its end."
    return await mgr.wait_for_job((await mgr.start_job(plugin, **kw)).id, timeout=timeout)
