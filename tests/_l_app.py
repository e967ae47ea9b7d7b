"""A small real FastHTML app for the life-cycle tests (tests/test_app_lifecycle.py), served by `uvicorn _l_app:app`:
a `BaseJobManager` subclass running the reference plugins on a pool of 2 workers, a SQLite job store at
`$L_DB`, the library's job routes under `/jobs` (scheduling options allowed) and an SSE broadcaster."""
import logging, os, signal, uuid
from dataclasses import dataclass, field
from typing import Any, Dict

from fasthtml.common import FastHTML
from cjm_workers.core.config import WorkerConfig
from cjm_workers.fasthtml.routes import mount_job_routes
from cjm_workers.fasthtml.sse import SSEBroadcaster
from cjm_workers.managers.base import BaseJob, BaseJobManager
from cjm_workers.stores.sqlite import SQLiteJobStore
from _l_plugins import life_worker

logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
if os.environ.get('L_SIGHUP'):  # docs/fasthtml.md (Shutting down): a closed terminal shuts the app down as SIGTERM does
    signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))


@dataclass
class LifeJob(BaseJob):
    params: Dict[str, Any] = field(default_factory=dict)


class LifeManager(BaseJobManager):
    def create_job(self, plugin_id, **kw): return LifeJob(id=uuid.uuid4().hex, plugin_id=plugin_id, params=kw)
    def get_worker_entry_point(self): return life_worker
    def prepare_execute_request(self, job): return {**job.params, 'run_tag': job.id}
    def extract_job_result(self, job, result_data): return result_data


bc = SSEBroadcaster(heartbeat_seconds=float(os.environ.get('L_HEARTBEAT', '15')))
manager = LifeManager('life', 'reference', supports_streaming=True, event_broadcaster=bc,
                      worker_config=WorkerConfig(max_workers=2, prefetch=int(os.environ.get('L_PREFETCH', '1')),
                                                 drain_timeout_seconds=float(os.environ.get('L_DRAIN', '0'))),
                      job_store=SQLiteJobStore(os.environ['L_DB']))
app = FastHTML(lifespan=manager.lifespan)
mount_job_routes(app, manager, bc, prefix='/jobs', scheduling=['priority', 'timeout_seconds', 'max_retries',
                                                                 'retry_backoff_seconds'])


@app.get('/pids')
def pids():
    "The app's pid, its workers' and its store writer's (for the tests' leak checks)."
    return {'app': os.getpid(), 'workers': [s['pid'] for s in manager.get_worker_stats()],
            'writer': manager.job_store.writer_pid}
