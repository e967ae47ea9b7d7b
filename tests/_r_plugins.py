"""Plugins for tests/test_remote_worker.py, imported by name by the worker subprocess (tests/ is on its PYTHONPATH)."""
from cjm_workers.remote.plugin import PluginInterface


class FlakyPlugin:
    "Duck-typed (no PluginInterface, no cancel/cleanup/get_config_schema): its stream fails after two items."
    name, version = 'flaky', '0.1'
    def __init__(self): self.config = {}
    def initialize(self, config=None):
        if config and 'fail' in config: raise ValueError(f"bad config: {config['fail']}")
        self.config = dict(config or {})
    def get_current_config(self): return dict(self.config)
    def execute(self, **kwargs): return {'ok': True, 'kwargs': kwargs}
    def execute_stream(self, **kwargs):
        yield 'first'
        yield {'second': 2}
        raise RuntimeError("broke after two items")


class NoExecute:
    "Has most of the contract but not `execute`: the worker must refuse it at startup."
    name, version = 'noexec', '0'
    def initialize(self, config=None): pass
    def cleanup(self): pass


class Incomplete(PluginInterface):
    "A PluginInterface subclass missing abstract methods."
    name, version = 'incomplete', '0'
    def execute(self): return 1
