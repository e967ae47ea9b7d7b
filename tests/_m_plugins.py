"""Misbehaving plugins for tests/test_misbehaving_plugins.py, importable by spawned workers.

- `badstr`: raises an exception whose `str()` raises.
- `bail`: leaves the way a plugin must not: `how` = 'exit' (`sys.exit(code)`), 'interrupt' (`KeyboardInterrupt`) or
  'genexit' (`GeneratorExit`); with config `{'exit_on_load': True}` its load calls `sys.exit(0)`.
- `bailstream`: streams one chunk, then calls `sys.exit(0)`.
- `forker`: `os.fork()`s and returns in both processes, the child first; `fail` raises in both instead. Its result says
  which pid it ran in (`metadata.pid`) and the pid of the child it forked (`metadata.child`).
- `giveup`: raises `JobCancelledError` on its own (no cancel was asked).
- `chatty`: starts a thread that reports progress through the job's captured context, every 10 ms for `linger`
  seconds: on after the job has returned.
- `gil`: reports progress 'holding', then holds the GIL in one C call of `n` steps (minutes).
- `exitcancel`: runs until its job is cancelled (it polls the job's flag), but its `cancel()` hook calls `sys.exit(0)`.
- `surrogate`: streams, returns and (with `fail=True`) raises text with a lone surrogate, which UTF-8 cannot encode.
- `nan`: returns numbers JSON cannot hold (NaN, ±infinity), as a model's metrics may be.

`m_worker` runs them beside the reference plugins; `gil_app` is an app process for the parent-death test.
"""
import asyncio, itertools, os, sys, threading, time

from cjm_workers.core.worker import JobCancelledError, base_worker_process, current_job, report_progress
from cjm_workers.testing import REFERENCE_PLUGINS, ReferencePlugin, ReferencePluginManager


class Unprintable(Exception):
    "An exception whose `str()` raises."
    def __str__(self): raise RuntimeError("str() of this exception fails")


class BadStrPlugin(ReferencePlugin):
    name = 'badstr'
    def execute(self, **kwargs): raise Unprintable()


class BailPlugin(ReferencePlugin):
    name = 'bail'
    def initialize(self, config=None):
        super().initialize(config)
        if self.config.get('exit_on_load'): sys.exit(0)
    def execute(self, how='exit', code=0, **kwargs):
        if how == 'exit': sys.exit(code)
        if how == 'interrupt': raise KeyboardInterrupt
        if how == 'genexit': raise GeneratorExit
        return {'text': 'stayed', 'metadata': {}}


class BailStreamPlugin(ReferencePlugin):
    name, streams = 'bailstream', True
    def execute_stream(self, **kwargs):
        yield 'one chunk '
        sys.exit(0)


class ForkerPlugin(ReferencePlugin):
    name = 'forker'
    def execute(self, fail=False, **kwargs):
        child = os.fork()
        if child: time.sleep(0.3)  # the forked copy comes back first: without the worker's guard, its result would win
        if fail: raise RuntimeError(f"failed in {os.getpid()}")
        return {'text': 'forked', 'metadata': {'pid': os.getpid(), 'child': child}}


class GiveUpPlugin(ReferencePlugin):
    name = 'giveup'
    def execute(self, **kwargs): raise JobCancelledError("the plugin gave up")


class ChattyPlugin(ReferencePlugin):
    name = 'chatty'
    def execute(self, linger=1.0, **kwargs):
        ctx = current_job()  # captured while the job runs, as a plugin's own threads should
        def talk():
            end, i = time.monotonic() + linger, 0
            while time.monotonic() < end:
                i += 1
                ctx.report_progress(0.5, f"late {i}")  # a new message each time: never rate-limited
                time.sleep(0.01)
        threading.Thread(target=talk, daemon=True).start()
        return {'text': 'chatty', 'metadata': {}}


class GilPlugin(ReferencePlugin):
    name = 'gil'
    def execute(self, n=10**11, **kwargs):
        report_progress(0.0, 'holding')
        return {'text': str(sum(itertools.repeat(1, n))), 'metadata': {}}  # one C call: the GIL is never released


class ExitCancelPlugin(ReferencePlugin):
    name = 'exitcancel'
    def cancel(self): sys.exit(0)  # in the worker's control thread
    def execute(self, **kwargs):
        from cjm_workers.core.worker import check_cancelled
        while True:
            check_cancelled()
            time.sleep(0.005)


class SurrogatePlugin(ReferencePlugin):
    name, streams = 'surrogate', True
    def execute_stream(self, fail:bool=False, **kwargs):
        yield 'one \ud800 '
        if fail: raise ValueError('bad \udc80 text')
        yield 'two'
    def execute(self, **kwargs): return {'text': ''.join(self.execute_stream(**kwargs)), 'metadata': {'odd': '\ud800'}}


class NanPlugin(ReferencePlugin):
    name = 'nan'
    def execute(self, **kwargs): return {'text': 'scored', 'metadata': {'score': float('nan'), 'range': [float('-inf'), float('inf')]}}


M_PLUGINS = {**REFERENCE_PLUGINS, **{c.name: c for c in (BadStrPlugin, BailPlugin, BailStreamPlugin, ForkerPlugin,
                                                         GiveUpPlugin, ChattyPlugin, GilPlugin, ExitCancelPlugin,
                                                         SurrogatePlugin, NanPlugin)}}


def _pm(): return ReferencePluginManager(M_PLUGINS)


def m_worker(request_queue, result_queue, response_queue):
    "Worker entry point: the reference plugins plus the misbehaving ones (streaming on)."
    base_worker_process(request_queue, result_queue, response_queue, plugin_manager_factory=_pm, supports_streaming=True)


async def gil_app():
    "An app: runs `gil` on an `m_worker`, prints the worker's pid once the plugin holds the GIL, then waits to be killed."
    from cjm_workers.testing import ReferenceJobManager, wait_until
    mgr = ReferenceJobManager(entry_point=m_worker)
    await mgr.start(wait=True)
    job = await mgr.start_job('gil')
    await wait_until(lambda: job.progress_message == 'holding', 60)
    print(mgr.get_worker_stats()[0]['pid'], flush=True)
    await asyncio.sleep(600)


async def busy_app(workers=3):
    """An app for the parent-death test of tests/test_worker_and_writer_edges.py: keeps `workers` `m_worker`s busy with
    short `gil` jobs (each holds the GIL for a few ms in one C call, so when the app dies a worker's main thread often
    writes its next message before its watchdog thread can end it), recycles each worker every 300 jobs (so one may be
    being spawned when the app dies), prints 'up' once serving, then runs until it is killed."""
    from cjm_workers.core.config import WorkerConfig
    from cjm_workers.testing import ReferenceJobManager
    mgr = ReferenceJobManager(WorkerConfig(max_workers=workers, max_jobs_per_worker=300, prefetch_max_job_seconds=None),
                              entry_point=m_worker)
    await mgr.start(wait=True)
    print('up', flush=True)
    while True:
        jobs = [await mgr.start_job('gil', n=10**6) for _ in range(100)]
        for j in jobs: await mgr.wait_for_job(j.id, timeout=60)
