"""A stand-in "app" process for test_parent_death: it runs a ReferenceJobManager with a `slow` job that started a
grandchild, prints "<worker pid> <grandchild pid>" on one line, then waits to be killed."""
import asyncio


async def main():
    from cjm_workers.core.config import WorkerConfig
    from cjm_workers.testing import ReferenceJobManager, wait_until
    mgr = ReferenceJobManager(WorkerConfig())
    await mgr.start(wait=True)
    job = await mgr.start_job('slow', seconds=300, spawn_child=True)
    await wait_until(lambda: (job.progress_message or '').startswith('child:'), 60)
    print(mgr.get_worker_stats()[0]['pid'], job.progress_message.split(':', 1)[1], flush=True)
    await asyncio.sleep(600)


if __name__ == '__main__':  # the guard matters: 'spawn' re-imports this file in the worker
    asyncio.run(main())
