"""Worker side of the life-cycle tests' app (`_l_app`): the reference plugins, plus `count`, a slow job that first
appends its run tag (the job id) to the file `$L_RUNS`, so a test can count how many times each job really ran."""
import os
from cjm_workers.core.worker import base_worker_process
from cjm_workers.testing import REFERENCE_PLUGINS, ReferencePluginManager, SlowPlugin


class CountPlugin(SlowPlugin):
    "`slow`, after appending `run_tag` and a newline to `$L_RUNS` (one `write`, O_APPEND)."
    name = 'count'
    def execute(self, seconds:float=0.2, run_tag:str='', **kw):
        fd = os.open(os.environ['L_RUNS'], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try: os.write(fd, f"{run_tag}\n".encode())
        finally: os.close(fd)
        return super().execute(seconds=seconds, **kw)


def _plugins(): return ReferencePluginManager({**REFERENCE_PLUGINS, 'count': CountPlugin})


def life_worker(request_queue, result_queue, response_queue):
    base_worker_process(request_queue, result_queue, response_queue, plugin_manager_factory=_plugins, supports_streaming=True)
