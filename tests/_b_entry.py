"""Helpers for the tests that must be importable by a spawned worker process: entry points and plugin managers.

- `entry`: a worker entry point written exactly like cjm-fasthtml-workers apps wrote theirs, over a small duck-typed
  plugin manager (`CompatPluginManager`, not the reference one).
- `slow_start_worker`: the reference plugins, but the plugin-manager factory takes a while (the worker stays
  `starting`), so jobs queue in the manager.
- `instrumented_worker`: the reference plugins, with load counts in echo results and a reload that can be made slow
  (`reload_sleep`) or fail (`reload_fail`).
"""
import os, threading, time

from cjm_workers.core.worker import base_worker_process
from cjm_workers.testing import ReferencePluginManager


# ---------------------------------------------------------------------------------------------------------------
# A plugin manager written the predecessor's way: duck-typed, load/reload/unload return None.
class _PluginData:
    def __init__(self, name): self.name = name


class _Result:
    "What the predecessor's plugins returned: an object with `.text` and `.metadata`."
    def __init__(self, text, metadata): self.text, self.metadata = text, metadata


class CompatPluginManager:
    "Plugins: `upper` (text → upper case + config suffix), `words` (streams the words), `bad` (unpicklable result)."
    def __init__(self):
        self.plugins, self.configs, self.loads = {}, {}, {}

    def discover_plugins(self):
        return [_PluginData('upper'), _PluginData('words'), _PluginData('bad')]

    def load_plugin(self, plugin_data, config):
        self.plugins[plugin_data.name] = plugin_data
        self.configs[plugin_data.name] = dict(config or {})
        self.loads[plugin_data.name] = self.loads.get(plugin_data.name, 0) + 1
        return None

    def execute_plugin(self, plugin_name, **params):
        if plugin_name not in self.plugins: raise ValueError(f"Plugin {plugin_name} not loaded")
        cfg = self.configs.get(plugin_name, {})
        text = params.get('text', '')
        if plugin_name == 'bad':
            return _Result(text, {'lock': threading.Lock()})
        return _Result(text.upper() + cfg.get('suffix', ''),
                       {'pid': os.getpid(), 'loads': dict(self.loads), 'config': dict(cfg)})

    def execute_plugin_stream(self, plugin_name, **params):
        if plugin_name not in self.plugins: raise ValueError(f"Plugin {plugin_name} not loaded")
        words = params.get('text', '').split(' ')
        for i, w in enumerate(words):
            yield w + (' ' if i < len(words) - 1 else '')

    def check_streaming_support(self, plugin_name):
        return plugin_name == 'words'

    def reload_plugin(self, plugin_name, config=None):
        if config is None:
            self.unload_plugin(plugin_name)
            return None
        self.plugins[plugin_name] = _PluginData(plugin_name)
        self.configs[plugin_name] = dict(config)
        return None

    def unload_plugin(self, plugin_name):
        self.plugins.pop(plugin_name, None)
        self.configs.pop(plugin_name, None)
        return None


def compat_plugin_manager():
    return CompatPluginManager()


def entry(request_queue, result_queue, response_queue):
    base_worker_process(request_queue, result_queue, response_queue,
                        plugin_manager_factory=compat_plugin_manager, result_adapter=None, supports_streaming=True)


# ---------------------------------------------------------------------------------------------------------------
SLOW_START_SECONDS = 1.5


def _slow_factory():
    time.sleep(SLOW_START_SECONDS)
    return ReferencePluginManager()


def slow_start_worker(request_queue, result_queue, response_queue):
    "Reference worker whose plugin-manager factory sleeps first (the worker is `starting` meanwhile)."
    base_worker_process(request_queue, result_queue, response_queue,
                        plugin_manager_factory=_slow_factory, result_adapter=None, supports_streaming=True)


# ---------------------------------------------------------------------------------------------------------------
class InstrumentedPluginManager(ReferencePluginManager):
    "Reference plugins; echo results carry the load counts; `reload_sleep` in a reload config makes the reload slow."
    def execute_plugin(self, plugin_name, **params):
        out = super().execute_plugin(plugin_name, **params)
        if isinstance(out, dict) and isinstance(out.get('metadata'), dict):
            out['metadata']['loads'] = dict(self.loads)
        return out

    def reload_plugin(self, plugin_name, config=None):
        if config and config.get('reload_sleep'): time.sleep(config['reload_sleep'])
        if config and config.get('reload_fail'): return False
        return super().reload_plugin(plugin_name, config)


def _instrumented_factory():
    return InstrumentedPluginManager()


def instrumented_worker(request_queue, result_queue, response_queue):
    base_worker_process(request_queue, result_queue, response_queue,
                        plugin_manager_factory=_instrumented_factory, result_adapter=None, supports_streaming=True)
