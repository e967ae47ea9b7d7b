"""A worker (and what its plugin started) must not outlive the app process that owns it, even if that app is
SIGKILLed and so cannot clean up."""
import os, signal, subprocess, sys, time
from pathlib import Path
import psutil
from cjm_workers.testing import wait_until
from _a_helpers import gone

APP = Path(__file__).with_name('_a_app.py')


async def test_sigkilled_app_takes_its_worker_and_grandchild_with_it():
    app = subprocess.Popen([sys.executable, str(APP)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=str(APP.parent.parent))
    left = []  # processes to kill if the test fails half-way
    try:
        line = app.stdout.readline()  # printed once the job's grandchild runs (the app gives up after 60 s)
        assert line.strip(), f"the app printed nothing; stderr:\n{app.stderr.read() if app.poll() is not None else ''}"
        wpid, gpid = map(int, line.split())
        worker, grandchild = psutil.Process(wpid), psutil.Process(gpid)
        left += [worker, grandchild]
        assert worker.ppid() == app.pid and grandchild.ppid() == wpid
        assert not gone(worker) and not gone(grandchild)
        t0 = time.monotonic()
        os.kill(app.pid, signal.SIGKILL)
        app.wait(10)
        await wait_until(lambda: gone(worker) and gone(grandchild), 15)
        took = time.monotonic() - t0
        print(f"worker and grandchild gone {took * 1000:.1f} ms after the app was SIGKILLed")
    finally:
        if app.poll() is None:
            app.kill(); app.wait(10)
        for p in left:
            try: p.kill()  # psutil refuses if the pid was reused meanwhile
            except psutil.Error: pass
        app.stdout.close(); app.stderr.close()
