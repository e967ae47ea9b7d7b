"""The app of tests/test_bursts.py, served by `uvicorn _burst_app:app`: the demo app (`create_demo_app`) with an
`echo` start button, 2 workers, a SQLite job store at `$B_DB` and `WorkerConfig.max_waiting_jobs` from `$B_MAX_WAITING`."""
import os
from cjm_workers.core.config import WorkerConfig
from cjm_workers.demo import create_demo_app

app = create_demo_app(jobs=(('Echo', 'echo', {'text': 'x'}, 'echo'),), db=os.environ['B_DB'],
                      worker_config=WorkerConfig(max_workers=2, prefetch=1, max_waiting_jobs=int(os.environ['B_MAX_WAITING'])))
