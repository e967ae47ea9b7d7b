"""How far a job page in a real browser falls behind a job that streams text fast.

The demo app under uvicorn on 127.0.0.1, Debian's Chromium driven by playwright. A `tokens` job streams N words with
`delay` seconds between them; a job page opened on it is sampled every 0.1 s: how many characters of the job's
`output` the page's output pane lacks. Prints, per (N, delay): how long the job ran, when the page showed
`completed` (both from the job's start), the worst lag in characters, and whether the final text is the job's.

Run from the repository root: `python bench/page_stream.py [N delay ...]` (default: 2000 0.001 20000 0.0001)."""
import json, sys, time
from datetime import datetime

import httpx
from playwright.sync_api import sync_playwright

from cjm_workers.demo import create_demo_app
from cjm_workers.testing import serve_in_thread

CHROMIUM = '/usr/bin/chromium'
JSON = {'accept': 'application/json', 'sec-fetch-site': 'same-origin'}


def serve():
    "The demo app (one worker) under uvicorn in a thread; (server, thread, base url, app)."
    app = create_demo_app(max_workers=1)
    return (*serve_in_thread(app), app)


def follow(page, base, app, n:int, delay:float)->dict:
    "Start a job streaming `n` words `delay` apart, open its page and sample the page until it shows `completed`."
    text = ' '.join(f"w{i}" for i in range(n))
    r = httpx.post(base + '/jobs/start', json={'plugin_id': 'tokens', 'params': {'text': text, 'delay': delay}}, headers=JSON)
    jid = r.json()['id']
    page.goto(f"{base}/jobs/{jid}")
    probe = (f"[document.getElementById('job-{jid}-status')?.dataset.status,"
             f" document.getElementById('job-{jid}-output')?.textContent.length]")
    lags = []
    while True:
        status, shown = page.evaluate(probe)
        now = time.time()
        if status == 'completed': break
        job = app.state.manager.get_job(jid)
        if job.status in ('running', 'completed'): lags.append(len(job.output or '') - (shown or 0))
        time.sleep(0.1)
    job = app.state.manager.get_job(jid)
    started, ended = (datetime.fromisoformat(t).timestamp() for t in (job.started_at, job.completed_at))
    final = page.evaluate(f"document.getElementById('job-{jid}-output')?.textContent")
    return dict(words=n, delay=delay, job_s=round(ended - started, 2), page_completed_s=round(now - started, 2),
                worst_lag_chars=max(lags, default=0), final_text_ok=final == text)


def main(args):
    pairs = [(int(a), float(b)) for a, b in zip(args[::2], args[1::2])] or [(2000, 0.001), (20000, 0.0001)]
    srv, t, base, app = serve()
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=['--headless', '--no-sandbox', '--disable-gpu'])
            page = b.new_page()
            page.set_default_timeout(180_000)
            httpx.post(base + '/jobs/start', json={'plugin_id': 'tokens', 'params': {'text': 'warm up', 'delay': 0}}, headers=JSON)
            time.sleep(1)
            for n, delay in pairs: print(json.dumps(follow(page, base, app, n, delay)), flush=True)
            b.close()
    finally:
        srv.should_exit = True
        app.state.broadcaster.close()
        t.join(30)


if __name__ == '__main__':  # the guard matters: 'spawn' re-imports this file in the workers
    main(sys.argv[1:])
