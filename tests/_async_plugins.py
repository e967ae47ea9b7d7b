"""Async plugins that press on the edges of `PluginLoop`, for tests/test_async_plugins.py (importable by spawned workers).

- `apartial`: awaits `delay` seconds; a cancel's `CancelledError` is caught and a partial result returned.
- `aswallow`: swallows the `CancelledError` of a cancel and sleeps on (`linger` seconds).
- `athread`: awaits `asyncio.to_thread` of a blocking loop that ends on `check_cancelled()` (or after `seconds`),
  writing 'thread ended <job id>' to `log` as it ends.
- `aleave`: starts a task it does not await (it sleeps, and writes 'task ended' to `log` in its `finally`), returns.
- `acancel`: runs until cancelled; its `cancel()` is an `async def`.
- `arun`: a plain `def execute` that calls `asyncio.run()` itself.
- `akeeper`: its `initialize` starts a thread for the plugin's life (`asyncio.to_thread` in a task it keeps), ended
  by its `cleanup`; its `execute` sleeps `delay` seconds.
- `atimeout`: streams `n` items, one each `delay` seconds, under one `asyncio.timeout(limit)` around its `yield`s;
  when the limit is reached it yields 'timed out' and ends.

`AsyncAnswer` (for a Universal Worker): a `PluginInterface` whose `execute` is `async def`, with no `execute_stream`
of its own (the base class's yields `execute()`'s result once); `async_edge_worker` runs it as `aanswer`, with
`streams = True`. `AsyncStreamMaker`: its `execute_stream` is a plain `async def` that returns an async iterator (as
an SDK's `await client.create(stream=True)` does).

`async_edge_worker` runs them beside the reference plugins and `achat`. `async_adapted_worker` runs `achat` through
`create_simple_adapter(pm, result_adapter=...)` over a plugin manager whose `execute_plugin` and `unload_plugin` are
`async def` and which has neither `execute_plugin_stream` (its streaming jobs get the result as one item) nor
`reload_plugin` (the adapter unloads, then loads).
"""
import asyncio, os, threading, time
from types import SimpleNamespace

from cjm_workers.core.adapters import create_simple_adapter
from cjm_workers.core.worker import base_worker_process, check_cancelled, current_job, report_progress
from cjm_workers.testing import REFERENCE_PLUGINS, AsyncChatPlugin, ReferencePlugin, ReferencePluginManager


def _note(path, text):
    if path:
        with open(path, 'a') as f: f.write(text + '\n')


class PartialPlugin(ReferencePlugin):
    name = 'apartial'
    async def execute(self, delay:float=60, **kwargs):
        try: await asyncio.sleep(delay)
        except asyncio.CancelledError: return {'text': 'partial', 'metadata': {'cut': True}}
        return {'text': 'whole', 'metadata': {}}


class SwallowPlugin(ReferencePlugin):
    name = 'aswallow'
    async def execute(self, linger:float=60, **kwargs):
        report_progress(0.1, 'waiting')
        try: await asyncio.sleep(linger)
        except asyncio.CancelledError: await asyncio.sleep(linger)
        return {'text': 'done anyway', 'metadata': {}}


class ThreadPlugin(ReferencePlugin):
    name = 'athread'
    async def execute(self, seconds:float=60, log:str='', **kwargs):
        job = current_job()
        def blocking():
            seen = current_job()
            end = time.monotonic() + seconds
            try:
                while time.monotonic() < end:
                    report_progress(0.5, 'in a thread')
                    check_cancelled()
                    time.sleep(0.01)
                return {'text': f"thread saw {seen.job_id if seen else None}", 'metadata': {}}
            finally: _note(log, f"thread ended {job.job_id}")
        return await asyncio.to_thread(blocking)


class LeavePlugin(ReferencePlugin):
    name = 'aleave'
    async def execute(self, log:str='', **kwargs):
        async def background():
            try: await asyncio.sleep(3600)
            finally:
                await asyncio.sleep(0)  # (as an `await client.aclose()` would)
                _note(log, 'task ended')
        self.task = asyncio.create_task(background())
        await asyncio.sleep(0)
        return {'text': 'left a task', 'metadata': {}}


class KeeperPlugin(ReferencePlugin):
    name = 'akeeper'
    async def initialize(self, config=None):
        super().initialize(config)
        self.stop = threading.Event()
        self.keeper = asyncio.create_task(asyncio.to_thread(self.stop.wait))  # (a model server's loop, say)
        await asyncio.sleep(0)
    async def execute(self, delay:float=60, **kwargs):
        await asyncio.sleep(delay)
        return {'text': 'slept', 'metadata': {}}
    async def cleanup(self):
        self.stop.set()
        await self.keeper


class AsyncCancelPlugin(ReferencePlugin):
    name = 'acancel'
    async def execute(self, **kwargs):
        await asyncio.sleep(60)
        return {'text': 'never', 'metadata': {}}
    async def cancel(self): self.cancel_ran = True


class RunPlugin(ReferencePlugin):
    name = 'arun'
    def execute(self, **kwargs):
        async def answer():
            await asyncio.sleep(0)
            return 'ran its own loop'
        return {'text': asyncio.run(answer()), 'metadata': {}}


class TimeoutStreamPlugin(ReferencePlugin):
    name, streams = 'atimeout', True
    async def execute_stream(self, n:int=40, delay:float=0.05, limit:float=0.3, **kwargs):
        try:
            async with asyncio.timeout(limit):
                for i in range(n):
                    await asyncio.sleep(delay)
                    yield f"{i} "
        except TimeoutError: yield 'timed out'


ASYNC_EDGE_PLUGINS = {c.name: c for c in (PartialPlugin, SwallowPlugin, ThreadPlugin, LeavePlugin, AsyncCancelPlugin, RunPlugin,
                                          TimeoutStreamPlugin, KeeperPlugin)}




class _AsyncOnlyManager:
    """A plugin manager with an `async def execute_plugin` and no `execute_plugin_stream`, which says its plugin streams;
    its `unload_plugin` is `async def` too, and it has no `reload_plugin`."""
    def __init__(self): self.plugin = None
    def discover_plugins(self): return [SimpleNamespace(name='achat')]
    async def load_plugin(self, info, config):
        self.plugin = AsyncChatPlugin()
        await self.plugin.initialize(config)
        return True
    def check_streaming_support(self, name): return True
    async def execute_plugin(self, name, **params): return await self.plugin.execute(**params)
    async def unload_plugin(self, name):
        plugin, self.plugin = self.plugin, None
        if plugin is not None: await plugin.cleanup()
        return True


def async_adapted_worker(request_queue, result_queue, response_queue):
    base_worker_process(request_queue, result_queue, response_queue, supports_streaming=True,
                        plugin_manager_factory=lambda: create_simple_adapter(
                            _AsyncOnlyManager(), result_adapter=lambda r: {**r, 'adapted': True}))


from cjm_workers.remote.plugin import PluginInterface

class AsyncAnswer(PluginInterface):
    name, version = 'aanswer', '1.0'
    def initialize(self, config=None): self.config = config or {}
    async def execute(self, text:str='hi', **kwargs):
        await asyncio.sleep(0)
        return f"answered {text}"
    def get_config_schema(self): return {}
    def get_current_config(self): return self.config
    def cleanup(self): pass


class StreamingAsyncAnswer(AsyncAnswer): streams = True


class AsyncStreamMaker(AsyncAnswer):
    name = 'amaker'
    async def execute_stream(self, text:str='a b', **kwargs):
        async def words():
            for w in text.split(' '): yield w
        await asyncio.sleep(0)
        return words()


def async_edge_worker(request_queue, result_queue, response_queue):
    "Worker entry point running the plugins above, `achat` and the reference plugins (streaming on)."
    base_worker_process(request_queue, result_queue, response_queue, supports_streaming=True,
                        plugin_manager_factory=lambda: ReferencePluginManager(
                            {**REFERENCE_PLUGINS, 'achat': AsyncChatPlugin, 'aanswer': StreamingAsyncAnswer, 'amaker': AsyncStreamMaker, **ASYNC_EDGE_PLUGINS}))
