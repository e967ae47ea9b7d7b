"""What an operator sees: a worker survives a SIGTERM that is not the manager's (systemd's default `KillMode`
signals every process of a service), and crashes, restarts and a plugin's own log lines reach the app's log."""
import asyncio, logging, os, signal

import psutil, pytest
from cjm_workers.core.config import WorkerConfig
from cjm_workers.testing import ReferenceJobManager, wait_until

pytestmark = pytest.mark.timeout(120)
T = 30


def gone(pid):
    try: return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return True


async def test_a_sigterm_from_outside_does_not_end_a_worker(track):
    mgr = track(ReferenceJobManager(worker_config=WorkerConfig(drain_timeout_seconds=30)))
    await mgr.start(wait=True)
    job = await mgr.start_job('slow', seconds=1.0)
    await wait_until(lambda: job.status == 'running', T)
    pid = job.worker_pid
    os.kill(pid, signal.SIGTERM)  # what `systemctl stop` sends to every process of the service
    done = await mgr.wait_for_job(job.id, timeout=T)
    assert done.status == 'completed' and mgr.get_worker_stats()[0]['pid'] == pid  # the job finished, same worker
    assert (await mgr.wait_for_job((await mgr.start_job('echo', text='after')).id, timeout=T)).status == 'completed'
    await mgr.ashutdown()  # the manager's own stop still ends it
    assert gone(pid)


async def test_the_manager_stops_a_busy_worker_that_ignores_cancel(track):
    "The manager's stop sequence (stop message, SIGTERM, SIGKILL) still ends a worker whose plugin ignores the cancel."
    mgr = track(ReferenceJobManager(worker_config=WorkerConfig(shutdown_timeout_seconds=0.5)))
    await mgr.start(wait=True)
    job = await mgr.start_job('slow', seconds=60, ignore_cancel=True)
    await wait_until(lambda: job.status == 'running', T)
    pid = job.worker_pid
    await mgr.ashutdown()
    assert gone(pid) and job.status == 'cancelled'


async def test_crashes_and_restarts_are_logged(track, caplog):
    caplog.set_level(logging.INFO, logger='cjm_workers')
    mgr = track(ReferenceJobManager(worker_config=WorkerConfig(restart_policy='always')))
    await mgr.start(wait=True)
    job = await mgr.wait_for_job((await mgr.start_job('crash', mode='segfault')).id, timeout=T)
    assert job.status == 'failed'
    failed = await mgr.wait_for_job((await mgr.start_job('echo', fail='bad input')).id, timeout=T)
    slow = await mgr.start_job('slow', seconds=30)
    await wait_until(lambda: slow.status == 'running', T)
    await mgr.cancel_job(slow.id)
    text = '\n'.join(f"{r.levelname} {r.getMessage()}" for r in caplog.records)
    # the crash names the job that was running; the restart says how many more the worker gets
    assert (f"WARNING reference worker 0 (pid {job.worker_pid}) was killed by SIGSEGV (exit code -11) while running "
            f"job {job.id}") in text, text
    assert 'WARNING reference worker 0: restarting (restart 1 of at most 3 in a row)' in text, text
    # each job that did not complete has a line: which job, which plugin, why
    assert f"WARNING reference job {job.id} (crash) failed: WorkerDied: the worker process was killed by SIGSEGV" in text, text
    assert f"WARNING reference job {failed.id} (echo) failed: ValueError: bad input" in text, text
    assert f"INFO reference job {slow.id} (slow) cancelled: cancelled on request" in text, text
    await mgr.ashutdown()


async def test_a_plugins_log_lines_reach_the_apps_stderr_at_the_apps_level(track, capfd):
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.INFO)  # the app's level when the worker starts
    try:
        mgr = track(ReferenceJobManager())
        await mgr.start(wait=True)
    finally: root.setLevel(old)
    job = await mgr.wait_for_job((await mgr.start_job('echo', text='x', log='hello from the plugin')).id, timeout=T)
    await mgr.ashutdown()
    err = capfd.readouterr().err
    assert f"INFO cjm_workers.testing [worker {job.worker_pid}]: hello from the plugin" in err, err[-2000:]


# ------------------------------------------------------------------ the Universal Worker (a plugin in another environment)

def test_a_sigterm_from_outside_does_not_end_a_proxys_universal_worker_but_its_stop_does():
    """The proxy starts its Universal Worker with `--managed`: a SIGTERM from anyone else (systemd signalling every
    process of the service) is ignored while the app lives, so the running call finishes; the proxy's own stop
    (`/shutdown`, then SIGTERM to the group) still ends it by that SIGTERM, not by the SIGKILL fallback."""
    from concurrent.futures import ThreadPoolExecutor
    from cjm_workers.remote.proxy import RemotePluginProxy
    p = RemotePluginProxy('cjm_workers.testing', 'SlowPlugin', stop_timeout=20.0).start()
    proc, pid = p.process, p.pid
    try:
        with ThreadPoolExecutor(1) as pool:
            prog = p.get_progress()
            fut = pool.submit(p.execute, seconds=1.0)
            while not prog['running']: prog = p.get_progress(since=prog['seq'], wait=5)
            os.kill(pid, signal.SIGTERM)
            assert fut.result(T)['text'] == 'slept 1.0s'  # the call finished in the same worker
        assert p.alive and p.pid == pid and p.execute(seconds=0)['text'] == 'slept 0s'
    finally:
        p.stop()
    assert proc.returncode == -signal.SIGTERM, proc.returncode  # ended by the proxy's SIGTERM, not its SIGKILL
    assert gone(pid)


def test_a_universal_worker_not_managed_stops_on_sigterm_and_on_post_shutdown(tmp_path):
    "Run by hand or by another launcher (no `--managed`), the worker stops on SIGTERM, as before; `POST /shutdown` stops it too."
    import json, subprocess, sys, httpx
    cmd = [sys.executable, '-m', 'cjm_workers.remote.worker', '--module', 'cjm_workers.testing', '--class', 'EchoPlugin',
           '--port', '0', '--ppid', str(os.getpid())]
    for how in ('sigterm', 'shutdown'):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            port = json.loads(proc.stdout.readline().split(' ', 1)[1])['port']
            if how == 'sigterm': os.kill(proc.pid, signal.SIGTERM)
            else: assert httpx.post(f'http://127.0.0.1:{port}/shutdown').json() == {'status': 'stopping'}
            assert proc.wait(T) == (-signal.SIGTERM if how == 'sigterm' else 0)
        finally:
            if proc.poll() is None: proc.kill(); proc.wait()
            proc.stdout.close(); proc.stderr.close()
    bad = subprocess.run(cmd[:-2] + ['--managed'], capture_output=True, text=True, timeout=T)  # --managed without --ppid
    assert bad.returncode == 2 and '--managed needs --ppid' in bad.stderr, bad.stderr
