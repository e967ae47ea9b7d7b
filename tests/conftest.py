"""Shared fixtures: managers that are always shut down, and process/thread/fd accounting for leak checks."""
import os, threading
import psutil, pytest
from cjm_workers.core.config import WorkerConfig
from cjm_workers.testing import ReferenceJobManager


@pytest.fixture
async def make_manager():
    "Build `ReferenceJobManager`s (keyword `config=dict(...)` → WorkerConfig); all are shut down after the test."
    made = []
    def make(config=None, **kw):
        m = ReferenceJobManager(worker_config=WorkerConfig(**(config or {})), **kw)
        made.append(m)
        return m
    yield make
    for m in made: await m.ashutdown()


@pytest.fixture
async def track():
    "Register extra managers (subclasses) so they are always shut down."
    made = []
    def add(m):
        made.append(m)
        return m
    yield add
    for m in made: await m.ashutdown()


def descendants():
    "Live (non-zombie) descendant processes of this test process."
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE: out.append(p)
        except psutil.NoSuchProcess: pass
    return out


def resource_counts():
    "(threads, open fds) of this process, for before/after leak checks."
    return threading.active_count(), len(os.listdir('/proc/self/fd'))
