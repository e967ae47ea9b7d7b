"""A stand-in for a proxy process: starts a remote worker that watches it (--ppid), prints
`<worker pid> <worker port>` once the worker is ready, then waits to be killed."""
import json, os, subprocess, sys, time

worker = subprocess.Popen([sys.executable, '-m', 'cjm_workers.remote.worker', '--module', 'cjm_workers.testing',
                           '--class', 'SlowPlugin', '--port', '0', '--ppid', str(os.getpid())],
                          stdout=subprocess.PIPE, text=True)
line = worker.stdout.readline()
if not line.startswith('CJM_WORKER_READY '): sys.exit(f"worker did not start: {line!r}")
print(worker.pid, json.loads(line.split(' ', 1)[1])['port'], flush=True)
time.sleep(120)
