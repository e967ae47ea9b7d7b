"""Plugins for tests/test_remote_worker.py, imported by name by the worker subprocess (tests/ is on its PYTHONPATH)."""
import os, signal, subprocess, sys, time
from cjm_workers.core.worker import cancel_requested, check_cancelled, current_job, report_progress
from cjm_workers.remote.plugin import PluginInterface

if os.environ.get('R_IMPORT_SECONDS'): time.sleep(float(os.environ['R_IMPORT_SECONDS']))  # a plugin module slow to import


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


class Attempts:
    "Fails its job's runs before attempt `succeed_at` (`current_job().attempt`, from the manager), then returns the attempt and the job's id."
    name, version = 'attempts', '0'
    def execute(self, succeed_at=2, **kwargs):
        job = current_job()
        if job.attempt < succeed_at: raise RuntimeError(f"attempt {job.attempt} of job {job.job_id} fails")
        return {'attempt': job.attempt, 'job_id': job.job_id}


class NoExecute:
    "Has most of the contract but not `execute`: the worker must refuse it at startup."
    name, version = 'noexec', '0'
    def initialize(self, config=None): pass
    def cleanup(self): pass


class Incomplete(PluginInterface):
    "A PluginInterface subclass missing abstract methods."
    name, version = 'incomplete', '0'
    def execute(self): return 1


def _journal(what):
    "Append a line to the file named by $R_JOURNAL, if set (lets a test see what a plugin in another process did)."
    import os
    if os.environ.get('R_JOURNAL'):
        with open(os.environ['R_JOURNAL'], 'a') as f: f.write(what + '\n')


class SlowLoad(PluginInterface):
    "Its `initialize` takes `steps` × 10 ms (a model loading) and stops at `check_cancelled()`; `/config` tells how far."
    name, version = 'slowload', '0.1'
    def __init__(self): self.state = {}
    def initialize(self, config=None):
        self.state = {'loading': True}
        _journal('loading')
        try:
            for _ in range(int((config or {}).get('steps', 3000))):
                check_cancelled()
                time.sleep(0.01)
        except BaseException:
            self.state = {'loading': False, 'stopped': True}
            _journal('load stopped')
            raise
        self.state = {'loaded': True}
    def execute(self, seconds=0, **kw):
        for _ in range(int(seconds * 100)):
            check_cancelled()
            time.sleep(0.01)
        return {'ok': True}
    def get_config_schema(self): return {}
    def get_current_config(self): return dict(self.state)
    def cleanup(self): pass


class SoftStop(PluginInterface):
    "Stops early on a cancel and returns what it has, without raising (a partial result)."
    name, version = 'softstop', '0.1'
    def initialize(self, config=None): pass
    def execute(self, n=3000, **kw):
        done = []
        for i in range(n):
            if cancel_requested(): break
            report_progress((i + 1) / n, f"{i + 1}/{n}")
            time.sleep(0.01)
            done.append(i)
        return {'text': f"{len(done)} of {n}", 'metadata': {'partial': len(done) < n}}
    def get_config_schema(self): return {}
    def get_current_config(self): return {}
    def cleanup(self): pass


class Journaled(SoftStop):
    "SoftStop that writes what happens to it, one line each, to the file named by $R_JOURNAL."
    name = 'journaled'
    def _note(self, what): _journal(what)
    def execute(self, n=3000, **kw):
        self._note('execute')
        out = super().execute(n=n, **kw)
        self._note('stopped early' if out['metadata']['partial'] else 'finished')
        return out
    def cleanup(self): self._note('cleanup')


def _raised(what):
    "What `Unruly` raises, by name: BaseExceptions that are not Exceptions, and text UTF-8 cannot encode."
    return {'sysexit': SystemExit(4), 'kbint': KeyboardInterrupt(), 'genexit': GeneratorExit(),
            'surrogate': RuntimeError('bad \udcff')}[what]


class Unruly:
    "Raises what it is told to (`sys.exit()` deep in a library, ...); its stream yields `items` and returns `ret`."
    name, version = 'unruly', '0.1'
    def execute(self, raise_=None, **kw):
        if raise_: raise _raised(raise_)
        return {'pid': os.getpid()}
    def execute_stream(self, items=('a', 'b'), raise_=None, ret=None, **kw):
        for i, item in enumerate(items):
            if raise_ and i == 1: raise _raised(raise_)
            yield item
        return ret


# The text of a plugin module whose classes give up in their constructors (tests write it to a file of their own).
QUITTERS = '''
import sys
class Raises:
    def __init__(self): raise ValueError("no GPU")
    def execute(self): return {}
class Exits:
    def __init__(self): sys.exit(4)  # a library giving up deep inside the constructor
    def execute(self): return {}
class ExitsSaying:
    def __init__(self): sys.exit("no CUDA device")
    def execute(self): return {}
class ExitsQuietly:
    def __init__(self): sys.exit()
    def execute(self): return {}
class Interrupted:
    def __init__(self): raise KeyboardInterrupt
    def execute(self): return {}
'''


class BarThenCrash:
    "Draws a progress bar on stderr `n` times (each redraw after a carriage return, as tqdm does), prints one long line, then ends its worker."
    name, version = 'bar', '0'
    def execute(self, n=80_000, long_line=1_000_000, **kwargs):
        for i in range(1, n + 1): sys.stderr.write(f"\rloading: {i}/{n} |{'#' * (i * 20 // n):<20}|")
        sys.stderr.write('\n' + 'x' * long_line + '\n' + f"\rloading: done")
        sys.stderr.flush()
        os._exit(3)


class Burn:
    "Burns CPU for `seconds` (checking for a cancel)."
    name, version = 'burn', '0'
    def execute(self, seconds=2.0, **kwargs):
        end = time.monotonic() + seconds
        while time.monotonic() < end: check_cancelled()
        return {'burnt': seconds}


class Gate:
    "Runs `seconds` (or streams `n` items, each followed by a wait of `gap` seconds), checking for a cancel; notes each call in $R_JOURNAL."
    name, version = 'gate', '1'
    def execute(self, tag='', seconds=0.0, **kwargs):
        _journal(f'start {tag}')
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end: check_cancelled(); time.sleep(0.005)
        except BaseException as e: _journal(f'stopped {tag} {type(e).__name__}'); raise
        _journal(f'done {tag}')
        return {'tag': tag}
    def execute_stream(self, tag='', n=10, gap=0.1, **kwargs):
        _journal(f'start {tag}')
        try:
            for i in range(n):
                yield i
                end = time.monotonic() + gap
                while time.monotonic() < end: check_cancelled(); time.sleep(0.005)
        except BaseException as e: _journal(f'stopped {tag} {type(e).__name__}'); raise
        _journal(f'done {tag}')


class SlowCancel(PluginInterface):
    "Checks `self.cancelled` (the documented pattern); its `cancel()` takes 50 ms before it sets the flag (it first stops a helper)."
    name, version = 'slowcancel', '0'
    def initialize(self, config=None): pass
    def get_config_schema(self): return {}
    def get_current_config(self): return {}
    def cleanup(self): pass
    def cancel(self):
        time.sleep(0.05)
        super().cancel()
    def execute(self, tag='', seconds=0.0, stop_on_ctx=False, **kw):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.cancelled: return {'tag': tag, 'stopped_by': 'self.cancelled'}
            if stop_on_ctx and cancel_requested(): return {'tag': tag, 'stopped_by': 'ctx'}
            time.sleep(0.001)
        return {'tag': tag, 'stopped_by': None}


class SpawnThenDie:
    "Starts a child (`sleep 300`; its pid in $R_JOURNAL) that keeps the worker's stdout/stderr, then its worker is SIGKILLed (an OOM kill) if `die`."
    name, version = 'spawn', '0'
    def execute(self, die=True, **kw):
        child = subprocess.Popen(['sleep', '300'])  # a plain Popen: the worker's group, and its pipes
        _journal(str(child.pid))
        if die: os.kill(os.getpid(), signal.SIGKILL)
        return {'child': child.pid}


class Stubborn:
    "Reports progress '<tag> i/steps' every `delay` seconds and ignores cancels (a model call that cannot be interrupted)."
    name, version = 'stubborn', '0'
    def execute(self, tag='', steps=10, delay=0.2, **kw):
        for i in range(steps):
            time.sleep(delay)
            report_progress((i + 1) / steps, f"{tag} {i + 1}/{steps}")
        return {'tag': tag}


class SessionChildThenDie:
    """Starts a child in a session of its own that keeps the worker's stdout/stderr for `child_seconds` (a daemon the
    plugin launched; its pid in $R_JOURNAL), then its worker is SIGKILLed (an OOM kill). Created again once $R_SLOW_MARK exists, it takes
    $R_SLOW_SECONDS to construct (a slow import, on the restart)."""
    name, version = 'session-child', '0'
    def __init__(self):
        mark = os.environ.get('R_SLOW_MARK')
        if mark and os.path.exists(mark): time.sleep(float(os.environ.get('R_SLOW_SECONDS', '5')))
    def execute(self, child_seconds=3.0, **kw):
        child = subprocess.Popen(['sleep', str(child_seconds)], start_new_session=True)  # inherits the worker's pipes
        _journal(str(child.pid))
        os.kill(os.getpid(), signal.SIGKILL)


class Escapees:
    """`_f_plugins.EscapeesPlugin` in a Universal Worker (processes that left its process group, its mark removed from
    one; `end` says how the worker then ends), and `plain`: a child left in the worker's own group (its pid in
    `<pidfile>.plain`, written first)."""
    name, version = 'escapees', '0'
    def execute(self, pidfile='', end='sigkill', **kw):
        from _f_plugins import EscapeesPlugin
        quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(pidfile + '.plain', 'w') as f: f.write(str(subprocess.Popen(['sleep', '300'], **quiet).pid))
        return EscapeesPlugin().execute(pidfile=pidfile, end=end)
