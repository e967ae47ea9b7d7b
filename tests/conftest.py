"""Shared fixtures: managers that are always shut down, worker backends, and process/thread/fd accounting.

Worker backends: a test (or module, with `pytestmark`) marked `@pytest.mark.backends('local', 'ray')` runs once per
backend; its `make_manager` managers then run their workers as local processes or as Ray actors in one local Ray
cluster shared by the session (`ray_cluster`). Unmarked tests run on local processes only.
"""
import importlib.util, os, shutil, tempfile, threading
import psutil, pytest
from cjm_workers.core.config import WorkerConfig
from cjm_workers.testing import ReferenceJobManager

HAVE_RAY = importlib.util.find_spec('ray') is not None


def pytest_configure(config):
    config.addinivalue_line('markers', "backends(*names): run the test once per worker backend ('local', 'ray')")
    config.addinivalue_line('markers', "xdist_group(name): pytest-xdist runs a group's tests in one process (--dist loadgroup)")


def pytest_generate_tests(metafunc):
    m = metafunc.definition.get_closest_marker('backends')
    if m is not None and 'backend' in metafunc.fixturenames:  # (under pytest-xdist, one process runs every Ray test)
        metafunc.parametrize('backend', [pytest.param(b, marks=pytest.mark.xdist_group('ray')) if b == 'ray' else b
                                         for b in m.args], indirect=True)


@pytest.fixture(scope='session')
def ray_cluster():
    "One local Ray cluster for the whole session (started on first use)."
    ray = pytest.importorskip('ray', reason='the Ray extra is not installed (pip install -e ".[ray]")')
    os.environ.setdefault('RAY_AUTH_MODE', 'disabled')
    tests = os.path.dirname(os.path.abspath(__file__))  # entry points of some tests live here (e.g. _b_entry)
    # The actors find them on the PYTHONPATH that Ray's processes inherit from this one at `ray.init` (set for the
    # call only). Not a job `runtime_env={'env_vars': ...}`: with one, every actor's Ray worker process is set up by
    # the runtime-env agent and none of the prestarted ones can be used, which made each actor start twice as slow.
    # Ray's socket paths lie below its temp dir and must fit AF_UNIX's 107 bytes: a dir of pytest's own grows with its
    # run counter (/tmp/pytest-of-root/pytest-1007/popen-gw0/ray0/session_.../sockets/plasma_store did not fit)
    temp_dir = tempfile.mkdtemp(prefix='cjmray', dir='/tmp')
    saved = os.environ.get('PYTHONPATH')
    os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [tests, saved]))
    try:
        ray.init(num_cpus=2, resources={'cjm_test_slot': 2}, include_dashboard=False,
                 _temp_dir=temp_dir, logging_level='warning', log_to_driver=False)
    finally:
        if saved is None: os.environ.pop('PYTHONPATH', None)
        else: os.environ['PYTHONPATH'] = saved
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def backend(request):
    "The worker backend of this run: 'local' unless the test is marked with `backends(...)`."
    name = getattr(request, 'param', 'local')
    if name == 'ray': request.getfixturevalue('ray_cluster')
    return name


@pytest.fixture
async def make_manager(backend):
    "Build `ReferenceJobManager`s (keyword `config=dict(...)` → WorkerConfig); all are shut down after the test."
    made = []
    def make(config=None, **kw):
        m = ReferenceJobManager(worker_config=WorkerConfig(**{'backend': backend, **(config or {})}), **kw)
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


@pytest.fixture
async def mk(track):
    "Build `StoreJobManager`s (a job store, then the reference manager's keywords); all are shut down after the test."
    from _d_helpers import StoreJobManager
    def make(store=None, **kw): return track(StoreJobManager(store, **kw))
    return make


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
