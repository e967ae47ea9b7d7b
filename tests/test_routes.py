"""`mount_job_routes` against real managers and real workers: list, detail, start, cancel and stream routes through
Starlette's TestClient and through a real uvicorn server; authorize → 403 on every route, GET on state changes → 405,
unknown ids → 404, two managers in one app."""
import asyncio, json, re, threading, time, uuid
from dataclasses import dataclass
from typing import Optional

import httpx, pytest
from fasthtml.common import FastHTML
from starlette.testclient import TestClient

from cjm_workers.core.config import RestartPolicy, WorkerConfig
from cjm_workers.fasthtml import routes as routes_mod
from cjm_workers.fasthtml.components import dom_id, ns_id
from cjm_workers.fasthtml.routes import mount_job_routes
from cjm_workers.fasthtml.sse import SSEBroadcaster
from cjm_workers.testing import ReferenceJob, ReferenceJobManager, serve_in_thread, wait_until
from _a_helpers import paused, served

pytestmark = pytest.mark.timeout(120)


def build(authorize=None, shared_broadcaster=True, routes=None, **config):
    "An app with two reference managers at /alpha and /beta (one worker each, `routes`: more `mount_job_routes` arguments)."
    bc_a = SSEBroadcaster(heartbeat_seconds=0)
    bc_b = bc_a if shared_broadcaster else SSEBroadcaster(heartbeat_seconds=0)
    cfg = lambda: WorkerConfig(**{'cancel_grace_seconds': 1.0, **config})
    alpha = ReferenceJobManager(worker_config=cfg(), event_broadcaster=bc_a, worker_type='alpha')
    beta = ReferenceJobManager(worker_config=cfg(), event_broadcaster=bc_b, worker_type='beta')
    async def lifespan(app):
        await alpha.start(); await beta.start()
        try: yield
        finally:
            bc_a.close(); bc_b.close()
            await beta.ashutdown(); await alpha.ashutdown()
    app = FastHTML(lifespan=lifespan, default_hdrs=False, secret_key='tests')
    ra = mount_job_routes(app, alpha, bc_a, prefix='/alpha', authorize=authorize, **(routes or {}))
    rb = mount_job_routes(app, beta, bc_b, prefix='/beta', authorize=authorize, **(routes or {}))
    return app, alpha, beta, ra, rb


def sqlite_app(tmp_path, worker_type, prefix=None, **routes):
    "An app with one reference manager on a SQLite store in `tmp_path`, mounted at `prefix` (default `/<worker_type>`)."
    from cjm_workers.stores.sqlite import SQLiteJobStore
    bc = SSEBroadcaster(heartbeat_seconds=0)
    mgr = ReferenceJobManager(event_broadcaster=bc, worker_type=worker_type, job_store=SQLiteJobStore(tmp_path / 'j.db'))
    async def lifespan(app):
        await mgr.start()
        try: yield
        finally: bc.close(); await mgr.ashutdown()
    app = FastHTML(lifespan=lifespan, default_hdrs=False, secret_key='tests')
    app.state.routes = mount_job_routes(app, mgr, bc, prefix=prefix or f'/{worker_type}', **routes)
    return app, mgr


def single_app(worker_type, entry_point=None, history_size=1024):
    "An app with one reference manager (worker type and prefix `worker_type`) and its own broadcaster."
    bc = SSEBroadcaster(heartbeat_seconds=0, history_size=history_size)
    mgr = ReferenceJobManager(worker_type=worker_type, event_broadcaster=bc,
                              **({'entry_point': entry_point} if entry_point is not None else {}))
    async def lifespan(app):
        await mgr.start()
        try: yield
        finally: bc.close(); await mgr.ashutdown()
    app = FastHTML(lifespan=lifespan, default_hdrs=False, secret_key='tests')
    mount_job_routes(app, mgr, bc, prefix=f'/{worker_type}')
    return app, mgr


def start(cli, prefix, plugin_id, **params):
    "Start a job with a plain form post; its id (from the 303 to its page)."
    r = cli.post(f'{prefix}/start', data={'plugin_id': plugin_id, 'params': json.dumps(params)}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return r.headers['location'].rsplit('/', 1)[1]


def sse_messages(lines, until):
    "Data of the SSE messages read from `lines` up to (and including) the first for which `until(data)` holds."
    out, buf = [], []
    for line in lines:
        if line.startswith('data: '): buf.append(line[6:])
        elif line == '' and buf:
            out.append('\n'.join(buf)); buf = []
            if until(out[-1]): return out
    return out


def page_stream_url(html):
    m = re.search(r'sse-connect="([^"]+)"', html)
    return m and m.group(1).replace('&amp;', '&')


def appended(messages, job_id):
    "The text the messages append to a job's output pane."
    pat = rf'<span hx-swap-oob="beforeend:#{dom_id(job_id, "output")}">([^<]*)</span>'
    return ''.join(t for m in messages for t in re.findall(pat, m))


def test_start_list_detail_and_json():
    app, alpha, beta, ra, rb = build()
    with TestClient(app) as cli:
        jid = start(cli, '/alpha', 'transcribe', audio='a.wav', steps=3, delay=0.01)
        job = cli.portal.call(alpha.wait_for_job, jid, 30)
        assert job.status == 'completed' and job.progress == 1.0
        listing = cli.get('/alpha').text
        assert f'id="{dom_id(jid, "row")}"' in listing and 'data-status="completed"' in listing
        assert page_stream_url(listing).startswith('/alpha/stream?after=')
        detail = cli.get(f'/alpha/{jid}').text
        assert 'a.wav: segment1 segment2 segment3' in detail
        assert page_stream_url(detail) is None  # an ended job's page has no stream
        js = cli.get(f'/alpha/{jid}', headers={'accept': 'application/json'}).json()
        assert (js['id'], js['status'], js['result']['metadata']['segments']) == (jid, 'completed', 3)
        assert [j['id'] for j in cli.get('/alpha', headers={'accept': 'application/json'}).json()] == [jid]
        # a JSON body works too, and a JSON client gets 201 with the job
        r = cli.post('/alpha/start', json={'plugin_id': 'echo', 'params': {'text': 'hi'}}, headers={'accept': 'application/json'})
        assert r.status_code == 201 and r.headers['location'] == f"/alpha/{r.json()['id']}"
        assert cli.portal.call(alpha.wait_for_job, r.json()['id'], 30).result['text'] == 'hi'
        # plain form fields are keyword arguments (strings); htmx posts get 204 and the id in a header
        r = cli.post('/alpha/start', data={'plugin_id': 'echo', 'text': 'from a text input'}, headers={'HX-Request': 'true'})
        assert r.status_code == 204
        assert cli.portal.call(alpha.wait_for_job, r.headers['x-job-id'], 30).result['text'] == 'from a text input'


def test_start_rejects_bad_input():
    app, *_ = build()
    with TestClient(app) as cli:
        for data, msg in (({'params': '{}'}, 'plugin_id is required'), ({'plugin_id': 'echo', 'params': '{bad'}, 'JSON object'),
                          ({'plugin_id': 'echo', 'params': '[1, 2]'}, 'JSON object')):
            r = cli.post('/alpha/start', data=data)
            assert (r.status_code, msg in r.text) == (400, True), r.text
        assert cli.post('/alpha/start', json=[1]).status_code == 400
    app = FastHTML(default_hdrs=False, secret_key='tests')
    mgr = ReferenceJobManager(worker_type='only')
    mount_job_routes(app, mgr, SSEBroadcaster(), prefix='/only', plugins=['echo'])
    with TestClient(app) as cli:
        r = cli.post('/only/start', data={'plugin_id': 'crash'})
        assert r.status_code == 400 and "'crash' cannot be started here" in r.text
    assert not mgr.get_all_jobs()
    with pytest.raises(ValueError, match="prefix must start with '/'"): mount_job_routes(app, mgr, SSEBroadcaster(), prefix='jobs/')


def test_cancel_running_job():
    app, alpha, *_ = build()
    with TestClient(app) as cli:
        jid = start(cli, '/alpha', 'slow', seconds=60)
        cli.portal.call(wait_until, lambda: alpha.get_job(jid).status == 'running', 30)
        r = cli.post(f'/alpha/{jid}/cancel', headers={'HX-Request': 'true'})
        assert r.status_code == 200 and alpha.get_job(jid).status == 'cancelled'
        # htmx gets the new state as out-of-band swaps: the badge says cancelled and the cancel button is gone
        assert f'id="{dom_id(jid, "status")}"' in r.text and 'data-status="cancelled"' in r.text
        assert f'<span id="{dom_id(jid, "actions")}" class="job-actions" hx-swap-oob="true"></span>' in r.text
        assert cli.post(f'/alpha/{jid}/cancel').status_code == 409  # it has ended
        jid2 = start(cli, '/alpha', 'slow', seconds=60)
        r = cli.post(f'/alpha/{jid2}/cancel', follow_redirects=False)  # a plain form post
        assert (r.status_code, r.headers['location']) == (303, f'/alpha/{jid2}')
        assert alpha.get_job(jid2).status == 'cancelled'


def test_get_on_state_changes_is_405():
    app, alpha, *_ = build()
    with TestClient(app) as cli:
        jid = start(cli, '/alpha', 'echo', text='x')
        for method, url in (('GET', '/alpha/start'), ('PUT', '/alpha/start'), ('DELETE', '/alpha/start'),
                            ('GET', f'/alpha/{jid}/cancel'), ('GET', '/alpha/nope/cancel'), ('POST', '/alpha/stream'),
                            ('POST', f'/alpha/{jid}')):
            r = cli.request(method, url)
            assert r.status_code == 405, (method, url, r.status_code)
        assert 'POST' in cli.get('/alpha/start').headers['allow']
        assert [j.id for j in alpha.get_all_jobs()] == [jid]  # nothing was started by those


def test_unknown_ids_are_404():
    app, *_ = build()
    with TestClient(app) as cli:
        for method, url in (('GET', '/alpha/nope'), ('POST', '/alpha/nope/cancel'), ('GET', '/alpha/nope/stream'),
                            ('GET', '/beta/nope')):
            assert cli.request(method, url).status_code == 404, url


def test_authorize_guards_every_route():
    calls = []
    def deny(request, job):
        calls.append((request.url.path, request.method, job and job.id))
        return False
    app, alpha, *_ = build(authorize=deny)
    with TestClient(app) as cli:
        job = cli.portal.call(lambda: alpha.start_job('slow', seconds=60))  # started behind the routes' back
        for method, url in (('GET', '/alpha'), ('POST', '/alpha/start'), ('GET', '/alpha/stream'),
                            ('GET', f'/alpha/{job.id}'), ('POST', f'/alpha/{job.id}/cancel'), ('GET', f'/alpha/{job.id}/stream'),
                            ('GET', '/alpha/unknown'), ('POST', '/alpha/unknown/cancel'), ('GET', '/beta'),
                            ('GET', '/alpha/health')):
            r = cli.request(method, url, data={'plugin_id': 'echo'} if method == 'POST' else None)
            assert r.status_code == 403, (method, url, r.status_code)  # unknown ids too: no probing without rights
        assert alpha.get_job(job.id).status != 'cancelled' and len(alpha.get_all_jobs()) == 1
    by_path = {(p, m): j for p, m, j in calls}
    assert by_path[('/alpha', 'GET')] is None and by_path[('/alpha/start', 'POST')] is None
    assert by_path[(f'/alpha/{job.id}/cancel', 'POST')] == job.id and by_path[('/alpha/unknown', 'GET')] is None


def test_health_is_200_while_jobs_can_run_and_503_with_the_reason_once_every_worker_has_failed():
    """A readiness probe: `GET {prefix}/health` is the manager's `get_health()`. Once the only worker has crashed past
    its restart budget, the manager can run nothing: 503, naming the crash; `restart_workers()` makes it healthy again."""
    app, alpha, beta, *_ = build(restart_policy=RestartPolicy.NEVER)
    with TestClient(app) as cli:
        r = cli.get('/alpha/health')
        assert r.status_code == 200 and r.json()['ok'] and r.json()['problems'] == []
        assert r.json()['store'] == {'ok': True, 'durable': False}
        crashed = cli.portal.call(alpha.wait_for_job, start(cli, '/alpha', 'crash', mode='exit'), 30)
        assert crashed.status == 'failed'
        r = cli.get('/alpha/health')
        assert r.status_code == 503 and not r.json()['ok'], r.text
        assert 'every worker has failed' in r.json()['problems'][0] and 'exited with code 3' in r.json()['problems'][0], r.json()
        assert r.json()['workers']['failed'][0]['worker'] == 0
        assert cli.get('/beta/health').status_code == 200  # the other manager is not touched
        cli.portal.call(alpha.restart_workers)
        cli.portal.call(lambda: wait_until(lambda: alpha.get_worker_stats()[0]['status'] == 'idle', 30))
        assert cli.get('/alpha/health').status_code == 200


def test_authorize_per_job_and_async():
    async def only_echo(request, job):  # an async authorize, deciding per job
        await asyncio.sleep(0)
        return job is None or job.plugin_id == 'echo'
    app, alpha, *_ = build(authorize=only_echo)
    with TestClient(app) as cli:
        echo = start(cli, '/alpha', 'echo', text='ok')
        slow = start(cli, '/alpha', 'slow', seconds=60)
        assert cli.get(f'/alpha/{echo}').status_code == 200
        assert cli.get(f'/alpha/{slow}').status_code == 403
        assert cli.post(f'/alpha/{slow}/cancel').status_code == 403
        assert cli.get(f'/alpha/{slow}/stream').status_code == 403
        assert cli.get('/alpha/unknown').status_code == 404  # admitted for "no job": a plain 404


def test_two_managers_one_app():
    for shared in (True, False):
        app, alpha, beta, ra, rb = build(shared_broadcaster=shared)
        with TestClient(app) as cli:
            after = cli.portal.call(ra.snapshot)
            b = start(cli, '/beta', 'echo', text='beta job')
            a = start(cli, '/alpha', 'echo', text='alpha job')
            assert [j.id for j in alpha.get_all_jobs()] == [a] and [j.id for j in beta.get_all_jobs()] == [b]
            assert cli.get(f'/beta/{a}').status_code == 404 and cli.get(f'/alpha/{b}').status_code == 404
            assert cli.portal.call(beta.wait_for_job, b, 30).result['text'] == 'beta job'
            cli.portal.call(alpha.wait_for_job, a, 30)
            # alpha's table stream carries alpha's jobs only, even when beta's events go through the same broadcaster
            with cli.stream('GET', f'/alpha/stream?after={after}') as resp:
                msgs = sse_messages(resp.iter_lines(), until=lambda d: f'id="{dom_id(a, "status")}"' in d and 'completed' in d)
            assert any(f'afterbegin:#jobs-alpha-body' in m for m in msgs)
            assert not any(b in m for m in msgs)


def test_page_and_stream_join_without_gaps_or_repeats():
    "A page rendered mid-job, then its stream from the page's id: the output adds up exactly."
    app, alpha, *_ = build()
    text = ' '.join(f'w{i}' for i in range(30))
    with TestClient(app) as cli:
        jid = start(cli, '/alpha', 'tokens', text=text, delay=0.02)
        cli.portal.call(wait_until, lambda: len(alpha.get_job(jid).output) > 10, 30)
        page = cli.get(f'/alpha/{jid}').text
        shown = re.search(rf'<pre id="{dom_id(jid, "output")}" class="job-output">([^<]*)</pre>', page).group(1)
        url = page_stream_url(page)
        assert url is not None and 0 < len(shown) < len(text)
        cli.portal.call(alpha.wait_for_job, jid, 30)
        with cli.stream('GET', url) as resp:
            msgs = sse_messages(resp.iter_lines(), until=lambda d: 'job-result' in d)
        assert shown + appended(msgs, jid) == text
        assert f'<div hidden id="{dom_id(jid, "live")}" hx-swap-oob="true"></div>' in msgs[-1]  # the sink goes
        # a reconnecting browser's Last-Event-ID wins over the page's id: nothing is sent twice
        ids = []
        with cli.stream('GET', url) as resp:
            for line in resp.iter_lines():
                if line.startswith('id: '): ids.append(int(line[4:]))
                if 'job-result' in line: break
        with cli.stream('GET', url, headers={'Last-Event-ID': str(ids[-2])}) as resp:
            msgs = sse_messages(resp.iter_lines(), until=lambda d: 'job-result' in d)
        assert len(msgs) == 1 and 'job-result' in msgs[0]
        assert cli.get(f'/alpha/{jid}/stream?after=x').status_code == 400


def test_the_table_comes_a_page_at_a_time_and_only_the_first_page_takes_new_rows(tmp_path):
    "Over a real SQLite store: 50 rows a page, newest first; new jobs appear at the top of page 1, not of page 2."
    app, mgr = sqlite_app(tmp_path, 'paged')
    rows = lambda html: re.findall(r'data-job-id="([^"]+)"', html)
    with TestClient(app) as cli:
        async def burst():
            jobs = [await mgr.start_job('echo', text=str(i)) for i in range(120)]
            await mgr.wait_for_job(jobs[-1].id, timeout=60)
            return [j.id for j in jobs]
        ids = cli.portal.call(burst)
        first, second = cli.get('/paged').text, cli.get('/paged?offset=50').text
        assert rows(first) == ids[:-51:-1] and rows(second) == ids[-51:-101:-1]
        assert 'Jobs 1–50 of 120' in first and 'Jobs 51–100 of 120' in second and 'rel="prev"' in second
        url1, url2 = page_stream_url(first), page_stream_url(second)
        assert 'rows=fixed' in url2 and 'rows=fixed' not in url1
        new = start(cli, '/paged', 'echo', text='new')
        cli.portal.call(mgr.wait_for_job, new, 30)
        done = lambda d: f'id="{dom_id(new, "status")}"' in d and 'completed' in d
        unnamed = re.sub(r'&page=[^&]+', '', url2)  # a stream that names no page: every job's events, but no new rows
        for url, inserted in ((url1, True), (unnamed, False)):
            with cli.stream('GET', url) as resp:
                msgs = sse_messages(resp.iter_lines(), until=done)
            assert any(f'data-job-id="{new}"' in m and 'afterbegin' in m for m in msgs) is inserted, (url, msgs)
        from urllib.parse import urlsplit
        from starlette.requests import Request
        from cjm_workers.fasthtml.sse import SSEEvent
        wants = app.state.routes.page_wants(Request({'type': 'http', 'headers': [], 'query_string': urlsplit(url2).query.encode()}),
                                            new_rows=False)
        assert not wants(SSEEvent(1, 'paged:completed', {'job_id': new}))  # page 2 (rows=fixed) is not sent the new job
        assert wants(SSEEvent(1, 'paged:progress', {'job_id': ids[-51]}))  # its own jobs' events, yes
        js = cli.get('/paged?limit=1000', headers={'accept': 'application/json'})
        assert [j['id'] for j in js.json()] == [new] + ids[::-1] and js.headers['x-total-count'] == '121'
        assert cli.get('/paged?offset=-1').status_code == 400 and cli.get('/paged?limit=1001').status_code == 400


def test_a_retried_job_shows_pending_again_with_a_fresh_output_pane():
    "Its page hears `retrying`: the badge says pending and the output pane is emptied for the next run."
    app, alpha, *_ = build(restart_policy=RestartPolicy.ALWAYS, routes={'scheduling': ['max_retries', 'retry_backoff_seconds']})
    with TestClient(app) as cli:
        jid = start(cli, '/alpha', 'crash', mode='sigkill', after=0.2, max_retries=1, retry_backoff_seconds=0.0)
        url = page_stream_url(cli.get(f'/alpha/{jid}').text)
        with cli.stream('GET', url) as resp:
            msgs = sse_messages(resp.iter_lines(), until=lambda d: 'job-result' in d or 'job-error' in d)
        empty = f'<pre id="{dom_id(jid, "output")}" class="job-output" hx-swap-oob="true"></pre>'
        assert any(empty in m and 'data-status="pending"' in m for m in msgs), msgs
        job = cli.portal.call(alpha.wait_for_job, jid, 30)
        assert job.status == 'failed' and job.attempts == 2


def test_over_real_http_and_close_ends_streams():
    """Real uvicorn on 127.0.0.1, real httpx: a job's live stream follows the job and ends after its last event;
    the table's stream stays open, and `broadcaster.close()` ends it.
    (uvicorn waits for open connections before running the lifespan's shutdown; under a signal sse-starlette ends the
    streams by itself (tests/test_demo.py), but a server run in a thread has no signal handlers, so whoever stops it
    closes the broadcaster first.)"""
    app, alpha, beta, ra, rb = build()
    server, t, base = serve_in_thread(app)
    try:
        with httpx.Client(base_url=base, timeout=30, follow_redirects=True) as c:
            r = c.post('/alpha/start', data={'plugin_id': 'transcribe', 'params': json.dumps({'steps': 4, 'delay': 0.05})})
            assert r.status_code == 200 and 'transcribe job' in r.text  # followed the 303 to the job's page
            jid = str(r.url).rsplit('/', 1)[1]
            url = page_stream_url(r.text) or f'/alpha/{jid}/stream?after=0'
            def follow(url, seen, ended):
                with c.stream('GET', url) as resp:
                    assert resp.headers['content-type'].startswith('text/event-stream')
                    for line in resp.iter_lines(): seen.append(line)
                ended.set()
            def reader(url):
                seen, ended = [], threading.Event()
                threading.Thread(target=follow, args=(url, seen, ended), daemon=True).start()
                return seen, ended
            seen, ended = reader(url)
            assert ended.wait(30), "the job's stream did not end with the job"
            assert any('job-result' in l for l in seen) and any('data-status="completed"' in l for l in seen)
            last = max(int(l[4:]) for l in seen if l.startswith('id: '))  # a reconnection after the end: nothing more
            assert c.get(f'/alpha/{jid}/stream', headers={'Last-Event-ID': str(last)}).status_code == 204
            seen, ended = reader('/alpha/stream?after=0')
            while not any(l.startswith('id: ') for l in seen): threading.Event().wait(0.01)
            assert not ended.wait(0.3)  # the table's stream stays open...
            server.should_exit = True
            ra.broadcaster.close()      # ...until the broadcaster closes (from another thread here)
            assert ended.wait(30), "the SSE stream did not end when the broadcaster closed"
    finally:
        server.should_exit = True
        t.join(30)
    assert not t.is_alive() and all(s['pid'] is None or s['status'] == 'stopped' for s in alpha.get_worker_stats())


def test_a_big_page_is_rendered_off_the_event_loop(monkeypatch):
    "A page of more than THREAD_ROWS rows is built in a thread; it holds the same rows a small page would."
    import cjm_workers.fasthtml.routes as routes_mod
    from cjm_workers.fasthtml.components import JobTable
    built_on = []
    def spy(jobs, prefix):
        built_on.append((threading.get_ident(), len(jobs)))
        return JobTable(jobs, prefix)
    monkeypatch.setattr(routes_mod, 'JobTable', spy)
    n = routes_mod.THREAD_ROWS + 5
    app, alpha, beta, ra, rb = build()
    with TestClient(app) as cli:
        async def run_many():
            jobs = [await alpha.start_job('echo', text=str(i)) for i in range(n)]
            for j in jobs: await alpha.wait_for_job(j.id, 60)
            return threading.get_ident()
        loop_thread = cli.portal.call(run_many)
        big = cli.get(f'/alpha?limit={n}').text
        small = cli.get('/alpha?limit=10').text
    (t_big, n_big), (t_small, n_small) = built_on
    assert (n_big, n_small) == (n, 10)
    assert t_big != loop_thread and t_small == loop_thread  # the big one off the loop, the small one on it
    rows = lambda html: re.findall(r'<tr [^>]*id="(job-[^"]+-row)"', html)
    assert len(rows(big)) == n and rows(big)[:10] == rows(small)  # the same rows, newest first


SCHEDULING = {'priority': 999, 'timeout_seconds': 0, 'max_retries': 1_000_000_000, 'retry_backoff_seconds': 0}


def test_clients_cannot_set_scheduling_options_by_default():
    "priority, timeout_seconds, max_retries, retry_backoff_seconds are the operator's: a 400 naming the option, no job."
    app, alpha, *_ = build()
    with TestClient(app) as cli:
        for name, value in SCHEDULING.items():
            for how in ('json', 'params', 'field'):
                if how == 'json': r = cli.post('/alpha/start', json={'plugin_id': 'echo', 'params': {'text': 'x', name: value}})
                elif how == 'params': r = cli.post('/alpha/start', data={'plugin_id': 'echo', 'params': json.dumps({name: value})})
                else: r = cli.post('/alpha/start', data={'plugin_id': 'echo', name: str(value)})
                assert r.status_code == 400, (name, how, r.status_code, r.text)
                assert r.text == (f"{name} is a scheduling option that clients may not set here (the app allows it with "
                                  f"mount_job_routes(..., scheduling={{'{name}': (lowest, highest)}}))"), r.text
                assert 'start_job keeps' not in r.text
        assert alpha.get_all_jobs() == []


def test_scheduling_options_the_mount_allows_within_its_bounds():
    bounds = {'priority': (0, 10), 'timeout_seconds': (1, 600), 'max_retries': (0, 3), 'retry_backoff_seconds': (0.5, 60)}
    app, alpha, *_ = build(routes={'scheduling': bounds})
    js = {'accept': 'application/json'}
    with TestClient(app) as cli:
        r = cli.post('/alpha/start', json={'plugin_id': 'echo', 'params': {'text': 'x', 'priority': 10, 'timeout_seconds': 30,
                                                                           'max_retries': 2, 'retry_backoff_seconds': 0.5}}, headers=js)
        assert r.status_code == 201, r.text
        job = alpha.get_job(r.json()['id'])
        assert (job.priority, job.timeout_seconds, job.max_retries, job.retry_backoff_seconds) == (10, 30, 2, 0.5)
        # a plain form's strings are numbers here; a null timeout is the manager's default
        r = cli.post('/alpha/start', data={'plugin_id': 'echo', 'text': 'y', 'priority': '4', 'max_retries': '1'}, headers=js)
        assert (r.status_code, r.json()['priority'], r.json()['max_retries']) == (201, 4, 1)
        r = cli.post('/alpha/start', json={'plugin_id': 'echo', 'params': {'text': 'z', 'timeout_seconds': None}}, headers=js)
        assert (r.status_code, r.json()['timeout_seconds']) == (201, None)
        n = len(alpha.get_all_jobs())
        for name, value in SCHEDULING.items():  # the abuses of the finding, each out of bounds
            r = cli.post('/alpha/start', json={'plugin_id': 'echo', 'params': {'text': 'x', name: value}})
            lo, hi = bounds[name]
            assert r.status_code == 400 and f"{name} must be " in r.text and f"from {lo} to {hi}" in r.text, r.text
        for bad in ({'priority': 'high'}, {'priority': 2.5}, {'priority': True}, {'max_retries': -1}):
            r = cli.post('/alpha/start', json={'plugin_id': 'echo', 'params': {'text': 'x', **bad}})
            assert r.status_code == 400 and 'must be an integer from' in r.text, (bad, r.text)
        assert len(alpha.get_all_jobs()) == n
    # names alone: any value start_job takes (its own checks, in the route's words)
    app, alpha, *_ = build(routes={'scheduling': ['priority']})
    with TestClient(app) as cli:
        r = cli.post('/alpha/start', json={'plugin_id': 'echo', 'params': {'text': 'x', 'priority': -5}}, headers=js)
        assert r.status_code == 201 and r.json()['priority'] == -5
        assert cli.post('/alpha/start', json={'plugin_id': 'echo', 'params': {'timeout_seconds': 0}}).status_code == 400
    app = FastHTML(default_hdrs=False, secret_key='tests')
    for bad in (['speed'], {'priority': (5, 1)}, {'max_retries': 3}):
        with pytest.raises(ValueError, match='scheduling'):
            mount_job_routes(app, ReferenceJobManager(worker_type='x'), SSEBroadcaster(), prefix='/x', scheduling=bad)


def test_a_too_big_body_is_a_413_before_it_is_read():
    """Over real uvicorn and httpx: a 30 MB start body is refused with 413 without being read or parsed, with or
    without a Content-Length; a body within the limit works; the limit is the mount's to set; other routes too."""
    app, alpha, beta, ra, rb = build(routes={'max_body_bytes': 4096})
    with TestClient(app) as cli:
        assert cli.post('/alpha/start', data={'plugin_id': 'echo', 'text': 'x' * 4000}, follow_redirects=False).status_code == 303
        r = cli.post('/alpha/start', data={'plugin_id': 'echo', 'text': 'x' * 5000})
        assert (r.status_code, r.text) == (413, 'the request body is larger than 4,096 bytes')
        jid = alpha.get_all_jobs()[0].id
        assert cli.post(f'/alpha/{jid}/cancel', content=b'x' * 5000).status_code == 413
        assert cli.request('GET', '/alpha', content=b'x' * 5000).status_code == 413
    app, alpha, beta, ra, rb = build()  # the default: 1 MiB
    with served(app, ra.broadcaster) as base:
        body = json.dumps({'plugin_id': 'echo', 'params': {'text': 'x' * 30_000_000}}).encode()
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.post('/alpha/start', content=body, headers={'content-type': 'application/json', 'accept': 'application/json'})
            assert (r.status_code, r.json()) == (413, {'error': 'the request body is larger than 1,048,576 bytes'})  # JSON, as it asked
            def chunks():  # no Content-Length: chunked
                for i in range(300): yield b'x' * 100_000
            r = c.post('/alpha/start', content=chunks(), headers={'content-type': 'application/json'})
            assert r.status_code == 413, r.text
            r = c.post('/alpha/start', json={'plugin_id': 'echo', 'params': {'text': 'y' * 900_000}}, headers={'accept': 'application/json'})
            assert r.status_code == 201
        assert [j.id for j in alpha.get_all_jobs()] == [r.json()['id']]


def test_tracebacks_are_shown_to_clients_only_when_the_mount_says_so():
    for show in (False, True):
        app, alpha, beta, ra, rb = build(routes={'show_traceback': show})
        with TestClient(app) as cli:
            after = cli.portal.call(ra.snapshot)
            jid = start(cli, '/alpha', 'crash', mode='no-such-mode')  # the plugin raises ValueError
            job = cli.portal.call(alpha.wait_for_job, jid, 30)
            assert job.status == 'failed' and 'ValueError' in job.traceback  # the manager keeps it either way
            js = {'accept': 'application/json'}
            for data in (cli.get(f'/alpha/{jid}', headers=js).json(), cli.get('/alpha', headers=js).json()[0]):
                assert ('traceback' in data) is show and data['error'].startswith('ValueError')
                if show: assert data['traceback'] == job.traceback
            page = cli.get(f'/alpha/{jid}').text
            assert ('class="job-traceback"' in page) is show and "unknown crash mode" in page
            with cli.stream('GET', f'/alpha/{jid}/stream?after={after}') as resp:  # the live page's end, replayed
                msgs = sse_messages(resp.iter_lines(), until=lambda d: 'job-error' in d)
            assert ('class="job-traceback"' in msgs[-1]) is show and 'job-error' in msgs[-1]


def test_a_foreign_last_event_id_is_a_reset_while_a_bad_after_is_a_400():
    """`after` comes from the page this server rendered: garbage there is a client bug (400). `Last-Event-ID` is what
    the browser got from whichever server answered before: garbage there means another server, so the stream starts
    with a `reset` (the page reloads) instead of failing, which would leave the page stale; a job page's stream starts
    with the job's state as it is now instead (`_resync`: no reload)."""
    app, alpha, *_ = build()
    with TestClient(app) as cli:
        jid = start(cli, '/alpha', 'slow', seconds=60)
        assert cli.get('/alpha/stream?after=abc').status_code == 400
        assert cli.get(f'/alpha/{jid}/stream?after=abc').status_code == 400
        for url in ('/alpha/stream', f'/alpha/{jid}/stream', '/alpha/stream?after=abc'):
            with cli.stream('GET', url, headers={'Last-Event-ID': 'xyz'}) as resp:
                assert resp.status_code == 200, url
                lines = []
                for line in resp.iter_lines():
                    lines.append(line)
                    if line == '' and any(l.startswith('data: ') for l in lines): break
            if url == f'/alpha/{jid}/stream':
                assert 'event: reset' not in lines and any(f'id="{dom_id(jid, "status")}"' in l for l in lines), lines
            else: assert 'event: reset' in lines, (url, lines)
        cli.post(f'/alpha/{jid}/cancel')


def test_assets_path_serves_the_scripts_where_the_pages_load_them():
    "For a proxy that forwards one path only: the scripts under the app's own prefix."
    app = FastHTML(default_hdrs=False, secret_key='tests')
    mount_job_routes(app, ReferenceJobManager(worker_type='p'), SSEBroadcaster(), prefix='/app/jobs', assets_path='/app/_assets')
    srcs = [str(h.attrs.get('src')) for h in app.hdrs if getattr(h, 'attrs', {}).get('src')]
    assert srcs == ['/app/_assets/htmx-2.0.7.min.js', '/app/_assets/htmx-ext-sse-2.2.4.min.js']
    with TestClient(app) as cli:
        assert all(cli.get(s).status_code == 200 for s in srcs)
        assert cli.get('/_cjm_workers/htmx-2.0.7.min.js').status_code == 404


def test_an_api_client_follows_a_job_it_started_in_json_and_gets_json_errors():
    """UAT findings from an API client: the 201 of a JSON start carried no event id, so a stream opened right after it
    lost the first tokens (and a quick job's stream answered 204); the stream sent htmx fragments only; errors were
    text/plain; a pending job's place in the queue was nowhere. Now: `stream` in the 201 resumes from before the job's
    first event, `?format=json` streams the events themselves, errors are {"error": ...}, and a pending job has `position`."""
    app, alpha, *_ = build(prefetch=1)
    J = {'Accept': 'application/json'}
    with TestClient(app) as cli:
        r = cli.post('/alpha/start', json={'plugin_id': 'tokens', 'params': {'text': 'one two three', 'delay': 0}}, headers=J)
        assert r.status_code == 201, r.text
        jid, url = r.json()['id'], r.json()['stream']
        cli.portal.call(alpha.wait_for_job, jid, 30)  # even after the job has ended, nothing is missed
        with cli.stream('GET', url + '&format=json') as resp:
            msgs = [json.loads(m) for m in sse_messages(resp.iter_lines(), until=lambda d: '"alpha:completed"' in d)]
        assert [m['type'] for m in msgs] == ['alpha:pending', 'alpha:started'] + ['alpha:chunk'] * 3 + ['alpha:completed']
        assert ''.join(m['data']['chunk'] for m in msgs if m['type'] == 'alpha:chunk') == 'one two three'
        assert msgs[-1]['data']['result']['text'] == 'one two three'
        # a pending job says where it stands
        slow = cli.post('/alpha/start', json={'plugin_id': 'slow', 'params': {'seconds': 30}}, headers=J).json()['id']
        cli.portal.call(wait_until, lambda: alpha.get_job(slow).status == 'running', 30)
        queued = cli.post('/alpha/start', json={'plugin_id': 'echo', 'params': {'text': 'x'}}, headers=J).json()
        assert queued['status'] == 'pending' and queued['position'] == 2
        assert cli.get(f"/alpha/{queued['id']}", headers=J).json()['position'] == 2
        # errors in JSON for JSON clients, plain text for the others
        assert cli.get('/alpha/nope', headers=J).json() == {'error': "unknown job 'nope'"}
        assert cli.get('/alpha/nope').headers['content-type'].startswith('text/plain')
        r = cli.post(f'/alpha/{jid}/cancel', headers=J)
        assert r.status_code == 409 and r.json() == {'error': f'job {jid} has already ended (completed)'}
        assert cli.get(f'/alpha/{jid}/stream?after=0&format=xml', headers=J).json()['error'].startswith("format must be")
        cli.portal.call(alpha.cancel_job, slow)


def test_bad_json_bodies_and_a_huge_offset_are_400s_that_say_why(tmp_path):
    """Acceptance findings: FastHTML answered a JSON body that is not an object in plain text (and one nested deeply
    with a 500, its parser's RecursionError); an offset past SQLite's integers was a 500."""
    app, mgr = sqlite_app(tmp_path, 'bodies', prefix='/b')
    js = {'content-type': 'application/json', 'accept': 'application/json'}
    with TestClient(app) as cli:
        for body, why in [(b'', 'the JSON body is empty'), (b'{not json', 'the body is not valid JSON'),
                          (b'[1,2]', 'the JSON body must be an object, got list'),
                          (b'[' * 100_000 + b']' * 100_000, 'the JSON body is nested too deeply')]:
            r = cli.post('/b/start', content=body, headers=js)
            assert r.status_code == 400 and r.json()['error'].startswith(why), (r.status_code, r.text[:200])
        r = cli.post('/b/start', content=b'[1]', headers={'content-type': 'application/json'})  # a browser-like client
        assert (r.status_code, r.headers['content-type'].split(';')[0], r.text) == (400, 'text/plain', 'the JSON body must be an object, got list')
        ok = cli.post('/b/start', json={'plugin_id': 'echo', 'text': 'hi'}, headers={'accept': 'application/json'})
        assert ok.status_code == 201, ok.text
        cli.portal.call(mgr.wait_for_job, ok.json()['id'], 30)
        for accept in ('application/json', 'text/html'):
            for offset in ('9223372036854775807', '99999999999999999999'):
                r = cli.get(f'/b?offset={offset}', headers={'accept': accept})
                assert r.status_code == 400 and 'offset must be an integer from 0 to' in r.text, (r.status_code, r.text[:200])
        assert cli.get('/b?offset=4611686018427387904', headers={'accept': 'application/json'}).json() == []  # the largest allowed


def test_text_that_utf8_cannot_encode_and_a_client_chosen_plugin_name_are_400s():
    """Acceptance findings: a lone surrogate in a parameter (valid JSON: "\\ud800") made a job whose pages, JSON and
    streams then failed for everyone (500s, streams cut), even after a restart; `params.plugin_name` ran a plugin that
    `plugins=` does not allow."""
    app = FastHTML(default_hdrs=False, secret_key='tests')
    bc = SSEBroadcaster(heartbeat_seconds=0)
    mgr = ReferenceJobManager(worker_type='odd', event_broadcaster=bc)
    mount_job_routes(app, mgr, bc, prefix='/odd', plugins=['tokens'])
    js = {'content-type': 'application/json', 'accept': 'application/json'}
    with TestClient(app) as cli:
        r = cli.post('/odd/start', content=b'{"plugin_id": "tokens", "params": {"text": "hi \\ud800 there"}}', headers=js)
        assert r.status_code == 400 and "parameter 'text' is not valid Unicode text (a lone surrogate at position 3)" in r.json()['error'], r.text
        r = cli.post('/odd/start', json={'plugin_id': 'tokens', 'params': {'plugin_name': 'echo', 'text': 'x'}}, headers=js)
        assert r.status_code == 400 and r.json()['error'].startswith("plugin_name is the app's to set"), r.text
        assert mgr.get_all_jobs() == [] and cli.get('/odd', headers={'accept': 'application/json'}).json() == []
    with pytest.raises(ValueError, match=r"parameter 'opts'\['k'\]\[1\] is not valid Unicode"):
        asyncio.run(mgr.start_job('tokens', opts={'k': ['ok', 'bad \udc80']}))
    mgr.shutdown()


def test_a_plugins_text_that_utf8_cannot_encode_shows_as_a_question_mark_everywhere():
    "A plugin that streams, returns and raises lone surrogates: pages, JSON and streams still work (with '?')."
    from _m_plugins import m_worker
    app, mgr = single_app('sur', m_worker)
    with TestClient(app) as cli:
        ok, bad = start(cli, '/sur', 'surrogate'), start(cli, '/sur', 'surrogate', fail=True)
        done = [cli.portal.call(mgr.wait_for_job, j, 30) for j in (ok, bad)]
        assert [j.status for j in done] == ['completed', 'failed'] and done[0].output == 'one ? two', done[0].output
        assert done[1].error == 'ValueError: bad ? text', done[1].error
        for j in (ok, bad):
            page = cli.get(f'/sur/{j}')
            assert page.status_code == 200 and 'one ? ' in page.text
            assert cli.get(f'/sur/{j}', headers={'accept': 'application/json'}).status_code == 200
            replay = cli.get(f'/sur/{j}/stream?after=0')
            assert replay.status_code == 200 and ('one ? two' in replay.text or 'bad ? text' in replay.text), replay.text[-500:]
        listing = cli.get('/sur', headers={'accept': 'application/json'})
        assert listing.status_code == 200 and {j['id'] for j in listing.json()} == {ok, bad}
        assert listing.json()[0]['result'] is None or '?' in json.dumps(listing.json())


def test_nan_and_infinity_in_a_result_or_a_parameter_reach_json_clients_as_null():
    """A plugin's `float('nan')` made the JSON list and detail answer 500 (Starlette's JSONResponse refuses NaN) for
    every job on the page, and the JSON stream sent `NaN`, which a browser's JSON.parse rejects."""
    from _m_plugins import m_worker
    app, mgr = single_app('nan', m_worker)
    J = {'accept': 'application/json'}
    def strict(text):  # what a browser accepts: no NaN or Infinity tokens
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    with TestClient(app) as cli:
        jid = cli.portal.call(lambda: mgr.start_job('nan', weight=float('inf'))).id
        assert cli.portal.call(mgr.wait_for_job, jid, 30).status == 'completed'
        r = cli.get(f'/nan/{jid}', headers=J)
        assert r.status_code == 200 and strict(r.text)['result']['metadata'] == {'score': None, 'range': [None, None]}
        assert strict(r.text)['params'] == {'weight': None}
        r = cli.get('/nan', headers=J)
        assert r.status_code == 200 and [j['id'] for j in strict(r.text)] == [jid]
        r = cli.get(f'/nan/{jid}/stream?after=0&format=json')
        done = [strict(m) for m in sse_messages(r.text.splitlines(), until=lambda d: '"nan:completed"' in d)][-1]
        assert done['type'] == 'nan:completed' and done['data']['result']['metadata']['score'] is None


def test_a_json_client_that_missed_events_rebuilds_the_text_from_the_chunk_offsets():
    """A stream opened after the broadcaster's history moved past its start begins with `reset`: the client reads the
    job and takes from each later chunk only what its `offset` says the text does not have yet (docs/fasthtml.md)."""
    app, mgr = single_app('off', history_size=16)
    J = {'accept': 'application/json'}
    text = ' '.join(f"t{i}" for i in range(400))
    with TestClient(app) as cli:
        jid = cli.post('/off/start', json={'plugin_id': 'tokens', 'params': {'text': text, 'delay': 0.004}}, headers=J).json()['id']
        cli.portal.call(wait_until, lambda: len(mgr.get_job(jid).output) > 300, 30)  # far more than 16 events ago
        got, n, reset, late = None, 0, False, 0
        with cli.stream('GET', f'/off/{jid}/stream?after=0&format=json') as resp:
            buf = []
            for line in resp.iter_lines():
                if line.startswith('data: '): buf.append(line[6:])
                if line or not buf: continue
                m, buf = json.loads('\n'.join(buf)), []
                if m['type'] == 'reset':
                    reset, got = True, cli.get(f'/off/{jid}', headers=J).json()['output']
                    n = len(got)
                elif m['type'] == 'off:chunk':
                    d = m['data']
                    if d['offset'] + len(d['chunk']) > n:
                        got += d['chunk'][n - d['offset']:]
                        n, late = len(got), late + 1
                elif m['type'] == 'off:completed': break
    assert reset and late > 10, (reset, late)  # it did miss the start, and did follow the rest live
    assert got == text == mgr.get_job(jid).output


def test_a_long_json_list_comes_in_parts_and_whole(monkeypatch):
    """A page of jobs with long outputs is encoded off the event loop, item by item, and sent in parts (chunked)
    once it is longer than `_JSON_PART_BYTES`; a short one in one body with its length. Both hold the same jobs."""
    import cjm_workers.fasthtml.routes as routes_mod
    app, alpha, *_ = build()
    J = {'accept': 'application/json'}
    with TestClient(app) as cli:
        for i in range(6): start(cli, '/alpha', 'tokens', text=' '.join([f'w{i}'] * 20_000), delay=0)
        cli.portal.call(wait_until, lambda: all(j.status == 'completed' for j in alpha.get_all_jobs()), 60)
        whole = cli.get('/alpha', headers=J)
        monkeypatch.setattr(routes_mod, '_JSON_PART_BYTES', 100_000)  # each job is about 200 kB of JSON
        parts = cli.get('/alpha', headers=J)
    assert 'content-length' in whole.headers and 'content-length' not in parts.headers  # (sent in parts: no length)
    assert whole.json() == parts.json() and len(parts.json()) == 6
    assert [j['output'] for j in parts.json()] == [' '.join([f'w{i}'] * 20_000) for i in reversed(range(6))]
    assert parts.headers['x-total-count'] == '6'


def test_start_and_cancel_from_a_page_of_another_origin_are_refused():
    """Acceptance finding (CSRF): a page of another origin could start and cancel a signed-in user's jobs (its form post
    carries the user's cookie). Browsers say where a request comes from (`Sec-Fetch-Site`); API clients send nothing."""
    app, alpha, *_ = build(cancel_grace_seconds=0.2)
    app2, alpha2, *_ = build(routes={'cross_site': True})
    with TestClient(app) as cli, TestClient(app2) as cli2:
        for site in ('cross-site', 'same-site'):
            r = cli.post('/alpha/start', data={'plugin_id': 'echo'}, headers={'sec-fetch-site': site})
            assert r.status_code == 403 and f'Sec-Fetch-Site: {site}' in r.text, r.text
        assert alpha.get_all_jobs() == []
        jid = start(cli, '/alpha', 'slow', seconds=30)  # no header (an API client), or one from the app's own pages:
        assert cli.post('/alpha/start', data={'plugin_id': 'echo'}, headers={'sec-fetch-site': 'same-origin'},
                        follow_redirects=False).status_code == 303
        assert cli.post(f'/alpha/{jid}/cancel', headers={'sec-fetch-site': 'cross-site'}).status_code == 403
        assert alpha.get_job(jid).status in ('pending', 'running')
        assert cli.post(f'/alpha/{jid}/cancel', headers={'sec-fetch-site': 'same-origin'}, follow_redirects=False).status_code == 303
        # a browser that sends no Sec-Fetch-Site: its Origin is compared with the Host it asked
        r = cli.post('/alpha/start', data={'plugin_id': 'echo'}, headers={'origin': 'http://evil.example'})
        assert r.status_code == 403 and 'Origin http://evil.example' in r.text, r.text
        assert cli.post('/alpha/start', data={'plugin_id': 'echo'}, headers={'origin': 'http://testserver'},
                        follow_redirects=False).status_code == 303
        r = cli2.post('/alpha/start', data={'plugin_id': 'echo'}, headers={'sec-fetch-site': 'cross-site'}, follow_redirects=False)
        assert r.status_code == 303  # the app said cross_site=True


def test_a_per_job_authorize_also_filters_the_list_and_the_table_streams():
    """Acceptance finding: with an `authorize` that decides per job, the list (HTML and JSON) and the table's streams
    showed every job — its params, its streamed text, its result — to anyone admitted to the list."""
    def own(request, job): return job is None or job.params.get('owner') == request.headers.get('x-user')
    app, alpha, beta, ra, rb = build(authorize=own)
    alice, bob = {'x-user': 'alice'}, {'x-user': 'bob'}
    with TestClient(app) as cli:
        after = ra.broadcaster.last_id
        a = cli.post('/alpha/start', data={'plugin_id': 'tokens', 'params': json.dumps({'owner': 'alice', 'text': 'secret words', 'delay': 0})},
                     headers=alice, follow_redirects=False).headers['location'].rsplit('/', 1)[1]
        b = cli.post('/alpha/start', data={'plugin_id': 'echo', 'params': json.dumps({'owner': 'bob', 'text': 'mine'})},
                     headers=bob, follow_redirects=False).headers['location'].rsplit('/', 1)[1]
        for j in (a, b): cli.portal.call(alpha.wait_for_job, j, 30)
        js = lambda who: {**who, 'accept': 'application/json'}
        assert [j['id'] for j in cli.get('/alpha', headers=js(bob)).json()] == [b]
        assert {j['id'] for j in cli.get('/alpha', headers=js(alice)).json()} == {a}
        html = cli.get('/alpha', headers=bob).text
        assert f'data-job-id="{b}"' in html and f'data-job-id="{a}"' not in html
        for fmt in ('json', 'html'):  # the table's stream, replayed from the start: bob sees his job's events only
            text = replay_until_completed(cli, f'/alpha/stream?format={fmt}&after={after}', bob, b)
            assert b in text and a not in text and 'secret' not in text, text[:2000]


def replay_until_completed(cli, url, headers, job_id):
    "The text of a table stream read from `url` up to the line of `job_id`'s completion."
    with cli.stream('GET', url, headers=headers) as resp:
        text = ''
        for line in resp.iter_lines():
            text += line + '\n'
            if job_id in line and 'completed' in line: return text
    return text



def test_the_events_of_a_purged_job_are_nobodys_on_the_table_stream():
    """Security review: once a job was purged, the table's stream asked `authorize(request, None)` about its events
    (None means "may this client see the table"), so a replay from an old event id gave anyone its params, its
    streamed text and its result."""
    app, alpha, beta, ra, rb = build(authorize=owner_of)
    alice, bob = {'x-user': 'alice'}, {'x-user': 'bob'}
    with TestClient(app) as cli:
        after = ra.broadcaster.last_id
        a = start(cli, '/alpha', 'tokens', owner='alice', text='secret words', delay=0)
        cli.portal.call(alpha.wait_for_job, a, 30)
        assert cli.portal.call(alpha.apurge_jobs) == 1 and alpha.get_job(a) is None
        b = cli.post('/alpha/start', data={'plugin_id': 'echo', 'params': json.dumps({'owner': 'bob', 'text': 'mine'})},
                     headers=bob, follow_redirects=False).headers['location'].rsplit('/', 1)[1]
        cli.portal.call(alpha.wait_for_job, b, 30)
        text = replay_until_completed(cli, f'/alpha/stream?format=json&after={after}', bob, b)
        assert b in text and a not in text and 'secret' not in text, text[:2000]


def test_a_client_cannot_set_the_worker_protocols_own_keys():
    """Security review: job parameters sit beside the worker's own keys in its execute request, so a client's
    `request_id` made the worker drop the request (the job stayed pending and the worker took no other job), and
    `max_loaded_plugins` or `_cjm_attempt` reached the worker too. The routes refuse them; `start_job` leaves them out."""
    app, alpha, *_ = build()
    J = {'accept': 'application/json'}
    with TestClient(app) as cli:
        for key, value in [('request_id', [1]), ('max_loaded_plugins', 1), ('_cjm_attempt', '1\nforged'), ('type', 'x')]:
            r = cli.post('/alpha/start', json={'plugin_id': 'echo', 'params': {'text': 'x', key: value}}, headers=J)
            assert r.status_code == 400 and key in r.json()['error'] and 'reserved' in r.json()['error'], r.text
        job = cli.portal.call(lambda: alpha.start_job('echo', text='still runs', request_id=[1], max_loaded_plugins=-5))
        job = cli.portal.call(alpha.wait_for_job, job.id, 30)
        assert (job.status, job.result['text']) == ('completed', 'still runs')
        after = cli.portal.call(lambda: alpha.start_job('echo', text='and so does the next'))
        assert cli.portal.call(alpha.wait_for_job, after.id, 30).status == 'completed'

def owner_of(request, job):
    "An `authorize` deciding per job: a job is its owner's (`params['owner']`), the user is the `x-user` header."
    return job is None or job.params.get('owner') == request.headers.get('x-user')


def test_a_per_job_authorize_pages_over_the_jobs_the_request_may_see(tmp_path, monkeypatch):
    """Acceptance finding: with a per-job `authorize` the list filtered each page after paging all the jobs, so alice's
    pages came out short or empty while older pages held her jobs, `offset` skipped jobs she may see, and the total
    and the "older" link counted bob's jobs (telling alice how many he has). Now the pages are pages of her jobs, read
    from a real SQLite store a chunk at a time (at most `SCAN_CHUNK` jobs) and only as far as the page needs."""
    import cjm_workers.fasthtml.routes as routes_mod
    monkeypatch.setattr(routes_mod, 'SCAN_CHUNK', 8, raising=False)
    app, mgr = sqlite_app(tmp_path, 'owned', authorize=owner_of)
    reads = []
    real_read = mgr.aget_all_jobs
    async def read(status=None, limit=None, offset=0, newest_first=False):
        reads.append((limit, offset))
        return await real_read(status, limit, offset, newest_first)
    mgr.aget_all_jobs = read
    mine = {0, 3, 11, 19, 27, 33, 36}  # alice's: none among the 3 newest, then a few here and there
    with TestClient(app) as cli:
        async def burst():
            jobs = [await mgr.start_job('echo', text=str(i), owner='alice' if i in mine else 'bob') for i in range(40)]
            for j in jobs: await mgr.wait_for_job(j.id, timeout=60)
            return [j.id for j in jobs]
        ids = cli.portal.call(burst)
        alices = [ids[i] for i in sorted(mine, reverse=True)]  # newest first
        rows = lambda html: re.findall(r'data-job-id="([^"]+)"', html)
        js = lambda who: {'x-user': who, 'accept': 'application/json'}
        reads.clear()
        r = cli.get('/owned?limit=3', headers=js('alice'))
        assert [j['id'] for j in r.json()] == alices[:3], r.json()
        assert 'x-total-count' not in r.headers and r.headers['link'] == '</owned?offset=3&limit=3>; rel="next"'
        assert reads and all(limit <= 8 for limit, _ in reads), reads  # a chunk at a time ...
        assert sum(limit for limit, _ in reads) < 40, reads           # ... and no further than the page needs
        r = cli.get('/owned?offset=3&limit=3', headers=js('alice'))
        assert [j['id'] for j in r.json()] == alices[3:6] and 'x-total-count' not in r.headers
        assert r.headers['link'] == '</owned?offset=6&limit=3>; rel="next", </owned?limit=3>; rel="prev"'
        r = cli.get('/owned?offset=6&limit=3', headers=js('alice'))  # the last page: the read reached the oldest job
        assert [j['id'] for j in r.json()] == alices[6:] and r.headers['x-total-count'] == '7'
        assert r.headers['link'] == '</owned?offset=3&limit=3>; rel="prev"'
        # following the links walks through her jobs, each once; bob's are all his
        url, walked = '/owned?limit=3', []
        while url:
            r = cli.get(url, headers=js('alice'))
            walked += [j['id'] for j in r.json()]
            url = (re.findall(r'<([^>]+)>; rel="next"', r.headers.get('link', '')) or [None])[0]
        assert walked == alices
        bobs = cli.get('/owned?limit=1000', headers=js('bob'))
        assert [j['id'] for j in bobs.json()] == [i for i in ids[::-1] if i not in alices] and bobs.headers['x-total-count'] == '33'
        assert (cli.get('/owned', headers=js('carol')).json(), cli.get('/owned', headers=js('carol')).headers['x-total-count']) == ([], '0')
        # the HTML pages alike: full pages of her jobs, "Jobs 1–3" (no total counted), links to her next page
        first = cli.get('/owned?limit=3', headers={'x-user': 'alice'}).text
        assert rows(first) == alices[:3] and 'Jobs 1–3</span>' in first and 'href="/owned?offset=3&amp;limit=3" rel="next"' in first
        last = cli.get('/owned?offset=6&limit=3', headers={'x-user': 'alice'}).text
        assert rows(last) == alices[6:] and 'Jobs 7–7 of 7' in last and 'rel="next"' not in last and 'rel="prev"' in last
        assert 'No jobs' in cli.get('/owned', headers={'x-user': 'carol'}).text
    # without a per-job authorize the list is paged by the store as before, with the exact total
    (tmp_path / 'all').mkdir()
    app2, mgr2 = sqlite_app(tmp_path / 'all', 'all')
    with TestClient(app2) as cli2:
        jobs = cli2.portal.call(lambda: asyncio.gather(*[mgr2.start_job('echo', text=str(i)) for i in range(5)]))
        for j in jobs: cli2.portal.call(mgr2.wait_for_job, j.id, 30)
        r = cli2.get('/all?offset=2&limit=2', headers={'accept': 'application/json'})
        assert len(r.json()) == 2 and r.headers['x-total-count'] == '5'
        assert r.headers['link'] == '</all?offset=4&limit=2>; rel="next", </all?limit=2>; rel="prev"'


def test_a_job_started_while_the_list_is_read_does_not_repeat_or_hide_a_row(monkeypatch):
    """The list reads the store in chunks by position, newest first; a job started between two reads moves every job
    down one place. A job at the end of one chunk then comes again at the top of the next: it is shown once, and the
    job started meanwhile is on the first page only if the request may see it."""
    import cjm_workers.fasthtml.routes as routes_mod
    monkeypatch.setattr(routes_mod, 'SCAN_CHUNK', 2, raising=False)
    started = []
    async def own_and_start(request, job):
        if job is not None and request.headers.get('x-start') and not started:  # a job starts mid-read, once a request
            started.append((await alpha.start_job('echo', text='meanwhile', owner='bob')).id)
        return owner_of(request, job)
    app, alpha, *_ = build(authorize=own_and_start)
    with TestClient(app) as cli:
        owners = ['alice', 'bob', 'alice', 'bob', 'bob', 'alice', 'alice', 'bob']  # oldest first
        jobs = [cli.portal.call(lambda o=o: alpha.start_job('echo', text='x', owner=o)) for o in owners]
        for j in jobs: cli.portal.call(alpha.wait_for_job, j.id, 30)
        alices = [j.id for j, o in zip(jobs[::-1], owners[::-1]) if o == 'alice']
        for accept in ('application/json', 'text/html'):
            started.clear()
            r = cli.get('/alpha?limit=3', headers={'x-user': 'alice', 'x-start': '1', 'accept': accept})
            got = [j['id'] for j in r.json()] if accept == 'application/json' else re.findall(r'data-job-id="([^"]+)"', r.text)
            assert started and got == alices[:3], (accept, got, alices)
            cli.portal.call(alpha.wait_for_job, started[0], 30)
        r = cli.get('/alpha?offset=3&limit=3', headers={'x-user': 'alice', 'accept': 'application/json'})
        assert [j['id'] for j in r.json()] == alices[3:] and r.headers['x-total-count'] == '4'


def test_a_full_queue_is_a_503_that_says_so():
    app, alpha, *_ = build(prefetch=1, max_waiting_jobs=1)
    with TestClient(app) as cli:
        start(cli, '/alpha', 'slow', seconds=30)
        cli.portal.call(wait_until, lambda: any(j.status == 'running' for j in alpha.get_all_jobs()), 30)
        start(cli, '/alpha', 'echo', text='waits')
        r = cli.post('/alpha/start', json={'plugin_id': 'echo'}, headers={'accept': 'application/json'})
        assert r.status_code == 503 and 'max_waiting_jobs' in r.json()['error'], r.text
        assert r.headers['retry-after'] == '5'


def test_a_json_start_that_no_worker_can_run_is_a_503():
    """Every worker has failed (here: a crash, under a restart policy that does not restart after one): a JSON client's
    start gets 503, not 201, with the job (already `failed`, saying why); a browser's form post still goes to its page."""
    app, mgr = single_app('down')
    with TestClient(app) as cli:
        crash = start(cli, '/down', 'crash', mode='sigkill')
        assert cli.portal.call(mgr.wait_for_job, crash, 30).status == 'failed'
        r = cli.post('/down/start', json={'plugin_id': 'echo', 'params': {'text': 'x'}}, headers={'accept': 'application/json'})
        assert r.status_code == 503 and 'Retry-After' not in r.headers, (r.status_code, r.text)  # (nothing restarts it by itself)
        assert r.json()['status'] == 'failed' and r.json()['error'].startswith('WorkerFailed: no worker can run the job'), r.json()
        assert r.headers['location'] == f"/down/{r.json()['id']}"
        assert start(cli, '/down', 'echo', text='y')  # a form post: 303 to the failed job's page, as before


@dataclass
class OwnedJob(ReferenceJob):
    owner: Optional[str] = None  # the user who started it (the routes' `scope` sets it)

class OwnedManager(ReferenceJobManager):
    def create_job(self, plugin_id, owner=None, **kw):
        return OwnedJob(id=uuid.uuid4().hex, plugin_id=plugin_id, params=kw, owner=owner)

def scoped_app(db, scope=lambda request: {'owner': request.headers.get('x-user', '')}, manager_cls=None, **routes):
    "An app whose users (the `x-user` header) each see their own jobs (`scope`), kept in a SQLite store indexed by owner."
    from cjm_workers.stores.sqlite import SQLiteJobStore
    bc = SSEBroadcaster(heartbeat_seconds=0)
    mgr = (manager_cls or OwnedManager)(event_broadcaster=bc, worker_type='owned', job_store=SQLiteJobStore(db, index_fields=['owner']))
    async def lifespan(app):
        await mgr.start()
        try: yield
        finally: bc.close(); await mgr.ashutdown()
    app = FastHTML(lifespan=lifespan, default_hdrs=False, secret_key='tests')
    r = mount_job_routes(app, mgr, bc, prefix='/jobs', scope=scope, **routes)
    return app, mgr, r


def test_scope_gives_each_user_their_own_jobs_from_the_store(tmp_path):
    """`scope` on a SQLite store: a user's jobs are listed and counted by the store (exact totals and pages, also after
    a restart), another user's job is a 404 on its routes (as an unknown one), and the table's streams leave its events out."""
    db = tmp_path / 'j.db'
    app, mgr, r = scoped_app(db, page_size=2)
    alice, bob = {'x-user': 'alice'}, {'x-user': 'bob'}
    J = lambda who: {**who, 'accept': 'application/json'}
    with TestClient(app) as cli:
        after, ids = r.broadcaster.last_id, {}
        for who, text in [(alice, 'a1'), (bob, 'secret words'), (alice, 'a2'), (alice, 'a3')]:
            ids[text] = cli.post('/jobs/start', json={'plugin_id': 'tokens', 'params': {'text': text, 'delay': 0}},
                                 headers=J(who)).json()['id']
        for j in ids.values(): cli.portal.call(mgr.wait_for_job, j, 30)
        resp = cli.get('/jobs', headers=J(alice))
        assert [j['id'] for j in resp.json()] == [ids['a3'], ids['a2']] and resp.headers['x-total-count'] == '3'
        assert 'rel="next"' in resp.headers['link']
        assert [j['id'] for j in cli.get('/jobs?offset=2', headers=J(alice)).json()] == [ids['a1']]
        assert 'Jobs 1–2 of 3' in cli.get('/jobs', headers=alice).text
        for url in (f"/jobs/{ids['secret words']}", f"/jobs/{ids['secret words']}/stream?format=json&after=0"):
            assert cli.get(url, headers=J(alice)).status_code == 404, url  # as if it did not exist
        assert cli.post(f"/jobs/{ids['secret words']}/cancel", headers=J(alice)).status_code == 404
        text = replay_until_completed(cli, f'/jobs/stream?format=json&after={after}', alice, ids['a3'])
        assert ids['a1'] in text and ids['secret words'] not in text and 'secret' not in text, text[:2000]
    app, mgr, r = scoped_app(db)  # the app restarted: the file has them
    with TestClient(app) as cli:
        resp = cli.get('/jobs', headers=J(bob))
        assert [j['id'] for j in resp.json()] == [ids['secret words']] and resp.headers['x-total-count'] == '1'
        assert resp.json()[0]['owner'] == 'bob' and resp.json()[0]['result']['text'] == 'secret words'


def test_a_job_page_whose_user_lost_the_job_is_told_so_and_nobody_else_learns_whether_a_job_exists(tmp_path):
    """SSE review (2026-12-07): with `scope`, a job page whose user may no longer see its job (signed in as another
    user) was told, on its stream's next connection, that the job had been deleted: another user's job is a 404, and a
    job page's 404 stream said "deleted" (`JobGone`). The page now carries a seal (`seen=`) only this server makes, for
    a request that could see the job: such a page is told its user may no longer see it (or, once it is purged, that it
    was deleted), and any other request one message for both, whether the job exists or not (over real HTTP)."""
    app, mgr, r = scoped_app(tmp_path / 'j.db')
    said = lambda resp: re.findall(r'job-reason">([^<]*)<', resp.text)
    with served(app, r.broadcaster) as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            ES = lambda user: {'x-user': user, 'accept': 'text/event-stream'}
            jid = c.post('/jobs/start', json={'plugin_id': 'slow', 'params': {'seconds': 60}},
                         headers={'x-user': 'alice', 'accept': 'application/json'}).json()['id']
            url = page_stream_url(c.get(f'/jobs/{jid}', headers={'x-user': 'alice'}).text)  # alice's page of her job
            assert said(c.get(url, headers=ES('bob'))) == [  # the same page, its user now bob: not "deleted"
                'Live updates stopped: you may no longer see this job. Reload the page, or sign in again.']
            unseen = [said(c.get(u, headers=ES('bob'))) for u in (  # bob's own requests: alice's job, and no job
                      f'/jobs/{jid}/stream?after=0', f'/jobs/{jid}/stream?after=0&seen=AAAAAAAAAAAAAAAAAAAAAA',
                      f'/jobs/{uuid.uuid4().hex}/stream?after=0', f'/jobs/{uuid.uuid4().hex}/stream?after=0&seen=x')]
            assert unseen == [[routes_mod.UNAVAILABLE]] * 4, unseen  # one answer, whether the job exists or not
            assert c.get(url, headers={'x-user': 'bob'}).status_code == 404  # an API client: the 404, as before
            assert c.post(f'/jobs/{jid}/cancel', headers={'x-user': 'alice', 'accept': 'application/json'}).status_code == 200
            end = time.monotonic() + 30
            while not mgr.get_job(jid).is_terminal and time.monotonic() < end: time.sleep(0.01)
            assert mgr.purge_jobs() == 1
            assert said(c.get(url, headers=ES('alice'))) == ['This job no longer exists: it was deleted from the server.']


def test_a_table_stream_left_open_does_not_remember_every_job_it_was_asked_about(tmp_path, monkeypatch):
    """SSE review (2026-12-07): with `scope` (or `authorize`), a table stream asks about each job once and remembered
    every answer for as long as it stayed open: a page left open on a busy app grew by about 140 bytes a job started
    meanwhile (measured: 20,000 jobs, 2.8 MB; 60,000, 7.8 MB; per open page; 1.3 MB now, flat). It now remembers the last `KEEPER_JOBS`
    answers, and a job it forgot is asked about again: its own jobs still reach it, other users' jobs still do not."""
    monkeypatch.setattr(routes_mod, 'KEEPER_JOBS', 50, raising=False)
    app, mgr, r = scoped_app(tmp_path / 'j.db')
    kept, real = [], type(r).keeper
    monkeypatch.setattr(r, 'keeper', lambda request: kept.append(real(r, request)) or kept[-1])
    bc = r.broadcaster
    with served(app, bc) as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            J = lambda user: {'x-user': user, 'accept': 'application/json'}
            mine = c.post('/jobs/start', json={'plugin_id': 'echo', 'params': {'text': 'a'}}, headers=J('alice')).json()['id']
            theirs = c.post('/jobs/start', json={'plugin_id': 'echo', 'params': {'text': 'b'}}, headers=J('bob')).json()['id']
            for j in (mine, theirs):
                end = time.monotonic() + 60
                while c.get(f'/jobs/{j}', headers=J('alice' if j == mine else 'bob')).json()['status'] != 'completed' \
                      and time.monotonic() < end: time.sleep(0.02)
            url = page_stream_url(c.get('/jobs', headers={'x-user': 'alice'}).text)
            lines, stop = [], threading.Event()
            def read():
                with c.stream('GET', url, headers={'x-user': 'alice'}, timeout=None) as resp:
                    for line in resp.iter_lines():
                        lines.append(line)
                        if stop.is_set(): return
            th = threading.Thread(target=read, daemon=True)
            th.start()
            end = time.monotonic() + 30
            while not bc.clients and time.monotonic() < end: time.sleep(0.01)
            sub = next(iter(bc._all))
            for round_ in range(2):  # the two jobs, asked about; then forgotten among many others; then asked again
                for j in (mine, theirs): bc.publish('owned:progress', {'job_id': j, 'progress': 0.5, 'message': f'round {round_}'})
                for i in range(500):
                    bc.publish('owned:progress', {'job_id': uuid.uuid4().hex, 'progress': 0.5})
                    if i % 100 == 99:
                        while sub.queued and time.monotonic() < end + 30: time.sleep(0.005)
            end = time.monotonic() + 30
            while sum(l.startswith('data:') and mine in l for l in lines) < 2 and time.monotonic() < end: time.sleep(0.02)
            stop.set()
            seen = next(cl.cell_contents for cl in kept[-1].__closure__ if isinstance(cl.cell_contents, dict))
            assert len(seen) <= 50, len(seen)  # (1,002 jobs asked about)
            data = '\n'.join(lines)
            assert sum(l.startswith('data:') and mine in l for l in lines) == 2 and theirs not in data, data[-2000:]
            assert not sub.dropped


def test_a_fast_streams_text_reaches_its_page_in_few_swaps_and_adds_up():
    """A plugin streaming thousands of words a second: the job page's stream joins each write's chunks into one swap
    (before, one SSE message per word: a browser fell ten seconds behind a 5,000-words-a-second stream), and the
    page's text plus what the stream appends is the job's output exactly, markup in it escaped."""
    import html
    app, mgr = single_app('fast', history_size=10_000)
    words = [f'<b>{i}&' if i % 97 == 0 else f'w{i}' for i in range(3000)]
    text = ' '.join(words)
    with TestClient(app) as cli:
        jid = start(cli, '/fast', 'tokens', text=text, delay=0.0002)
        page = cli.get(f'/fast/{jid}').text
        shown = html.unescape(re.search(rf'<pre id="{dom_id(jid, "output")}" class="job-output">([^<]*)</pre>', page).group(1))
        with cli.stream('GET', page_stream_url(page)) as resp:
            msgs = sse_messages(resp.iter_lines(), until=lambda d: 'job-result' in d)
        assert mgr.get_job(jid).status == 'completed'
        pat = rf'<span hx-swap-oob="beforeend:#{dom_id(jid, "output")}">([^<]*)</span>'
        swaps = [t for m in msgs for t in re.findall(pat, m)]
        assert shown + html.unescape(''.join(swaps)) == text
        assert len(swaps) <= len(words) // 4, f"{len(swaps)} swaps for {len(words)} words"


def test_a_job_page_whose_stream_connects_after_the_history_moved_on_gets_the_job_as_it_is_not_a_reload():
    """SSE review (2026-12-07): a job page whose stream connected after the broadcaster's history had moved past the
    page's `after` (a page 1 s from its stream, in an app sending 2,300 events a second) got a `reset`, and reloaded;
    the reloaded page was as slow, was reset again, and so on: eight reloads in 13 s, the page never live. The stream
    now starts with the job's parts as they are now, and goes on from there (over real HTTP): that state plus the
    text the stream appends is the job's output, every word once, and nothing says `reset`."""
    import html
    app, mgr = single_app('busy', history_size=16)
    bc = mgr.event_broadcaster
    text = ' '.join(f'w{i}' for i in range(300))
    with served(app, bc) as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            jid = c.post('/busy/start', json={'plugin_id': 'tokens', 'params': {'text': text, 'delay': 0.01}},
                         headers={'accept': 'application/json'}).json()['id']
            end = time.monotonic() + 60
            while not mgr.get_job(jid).output and time.monotonic() < end: time.sleep(0.01)
            url = page_stream_url(c.get(f'/busy/{jid}').text)
            after = int(re.search(r'after=(\d+)', url).group(1))
            while bc.last_id < after + 40 and time.monotonic() < end: time.sleep(0.01)  # the page is slow to connect
            assert not bc.can_replay(after)
            lines = _sse_until(c, url, {'accept': 'text/event-stream'}, lambda ls: any('job-result' in l for l in ls), 60)
            assert not any(l.startswith('event: reset') for l in lines), lines[:10]
            msgs = sse_messages(lines, until=lambda d: False)
            pane = re.search(rf'<pre[^>]*id="{dom_id(jid, "output")}"[^>]*>([^<]*)</pre>', msgs[0])
            assert pane and f'id="{dom_id(jid, "status")}"' in msgs[0] and 'badge-running' in msgs[0], msgs[0][:500]
            state = html.unescape(pane.group(1))
            assert len(state.split()) >= 40 and state + html.unescape(appended(msgs[1:], jid)) == text
            assert mgr.get_job(jid).status == 'completed'


def test_a_table_page_that_missed_only_text_chunks_is_not_reset():
    """SSE review (2026-12-07): the history holds every event, text chunks too, and a table's page whose stream
    connected after the history had moved past its `after` got a `reset` (a reload; in a browser a page 1 s from its
    stream, in an app streaming 2,400 chunks a second, reloaded eight times in 12 s), although a table takes no chunks
    and had missed nothing it shows. The broadcaster now keeps the type and job of the events its history let go (a
    ledger), and a stream that missed none it takes is not reset (over real HTTP); one that missed one still is."""
    app, mgr = single_app('chunky', history_size=16)
    bc = mgr.event_broadcaster
    text = ' '.join(f'w{i}' for i in range(200))
    with served(app, bc) as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            J = {'accept': 'application/json'}
            jid = c.post('/chunky/start', json={'plugin_id': 'tokens', 'params': {'text': text, 'delay': 0.01}}, headers=J).json()['id']
            end = time.monotonic() + 60
            while not mgr.get_job(jid).output and time.monotonic() < end: time.sleep(0.01)  # (its `started` is out)
            url = page_stream_url(c.get('/chunky').text)
            after = int(re.search(r'after=(\d+)', url).group(1))
            while bc.last_id < after + 40 and time.monotonic() < end: time.sleep(0.01)  # chunks only, meanwhile
            assert not bc.can_replay(after)  # the history no longer holds them
            lines = _sse_until(c, url, {'accept': 'text/event-stream'}, lambda ls: any('badge-completed' in l for l in ls), 60)
            assert not any(l.startswith('event: reset') for l in lines), lines[:6]
            assert any('badge-completed' in l and jid in l for l in lines), lines[-6:]
            other = c.post('/chunky/start', json={'plugin_id': 'tokens', 'params': {'text': text, 'delay': 0.002}}, headers=J).json()['id']
            last = max(int(l[4:]) for l in lines if l.startswith('id: '))  # the page saw the first job's end ...
            while mgr.get_job(other).status != 'completed' and time.monotonic() < end: time.sleep(0.01)
            lines = _sse_until(c, url, {'accept': 'text/event-stream', 'Last-Event-ID': str(last)}, lambda ls: len(ls) > 4, 10)
            assert any(l.startswith('event: reset') for l in lines), lines[:6]  # ... and missed the new row (gone): reset


def test_a_table_page_is_not_reset_by_another_managers_events_on_a_shared_broadcaster():
    """SSE review (2026-12-07): two managers may share a broadcaster, and a table's stream queued every event of the
    other manager (its renderer then showed nothing of them), so a table page that connected after the other
    manager's text stream had moved the history past it was reset (reloaded), though it had missed nothing it shows.
    A table's stream now takes no event of another manager, nor one about no job (over real HTTP)."""
    bc = SSEBroadcaster(heartbeat_seconds=0, history_size=16)
    alpha = ReferenceJobManager(event_broadcaster=bc, worker_type='alpha')
    beta = ReferenceJobManager(event_broadcaster=bc, worker_type='beta', supports_streaming=True)
    async def lifespan(app):
        await alpha.start(); await beta.start()
        try: yield
        finally: bc.close(); await beta.ashutdown(); await alpha.ashutdown()
    app = FastHTML(lifespan=lifespan, default_hdrs=False, secret_key='tests')
    mount_job_routes(app, alpha, bc, prefix='/alpha')
    mount_job_routes(app, beta, bc, prefix='/beta')
    with served(app, bc) as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            J = {'accept': 'application/json'}
            end = time.monotonic() + 60
            url = page_stream_url(c.get('/alpha').text)
            after = int(re.search(r'after=(\d+)', url).group(1))
            text = ' '.join(f'w{i}' for i in range(100))
            bid = c.post('/beta/start', json={'plugin_id': 'tokens', 'params': {'text': text, 'delay': 0.002}}, headers=J).json()['id']
            while beta.get_job(bid).status != 'completed' and time.monotonic() < end: time.sleep(0.01)
            assert bc.last_id > after + 40
            aid = c.post('/alpha/start', json={'plugin_id': 'echo', 'params': {'text': 'hi'}}, headers=J).json()['id']
            lines = _sse_until(c, url, {'accept': 'text/event-stream'}, lambda ls: any('badge-completed' in l for l in ls), 30)
            assert not any(l.startswith('event: reset') for l in lines), lines[:6]
            assert any('badge-completed' in l and aid in l for l in lines) and bid not in '\n'.join(lines), lines[-6:]


def test_an_open_stream_stops_once_its_user_may_no_longer_see_the_job():
    """SSE review (2026-12-07): `authorize` and `scope` were asked only as a stream connected, so a user signed out (or
    whose access was taken away) went on getting the job's events, its output live, for as long as the stream stayed
    open: hours, for a long job. An open stream now asks them again before a write, at most every `recheck_seconds`,
    and once they refuse, a page's stream ends with the note that replaces its sink, an API client's with a `closed`
    event that says why (over real HTTP)."""
    state = {'deny': False}
    app, alpha, beta, ra, rb = build(authorize=lambda request, job: not state['deny'], routes={'recheck_seconds': 0.2})
    with served(app, ra.broadcaster) as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            jid = c.post('/alpha/start', json={'plugin_id': 'transcribe', 'params': {'steps': 400, 'delay': 0.05}},
                         headers={'accept': 'application/json'}).json()['id']
            streams = {'job page': (c.get(f'/alpha/{jid}').text, {'accept': 'text/event-stream'}),
                       'table page': (c.get('/alpha').text, {'accept': 'text/event-stream'})}
            for what, (page, headers) in streams.items():
                state['deny'] = False
                url, got = page_stream_url(page), []
                with c.stream('GET', url, headers=headers, timeout=httpx.Timeout(30)) as resp:
                    for line in resp.iter_lines():
                        got.append(line)
                        if sum('job-progress' in l for l in got) == 3: state['deny'] = True  # signed out, say
                text = '\n'.join(got)  # (the stream ended: the job runs for 20 s more)
                assert 'Live updates stopped: you may no longer see' in got[-2], (what, got[-4:])
                assert alpha.get_job(jid).status == 'running', what
            state['deny'] = False
            got = []
            with c.stream('GET', f'/alpha/{jid}/stream?format=json&after={ra.broadcaster.last_id}', timeout=httpx.Timeout(30)) as resp:
                for line in resp.iter_lines():
                    got.append(line)
                    if sum(l.startswith('data: ') for l in got) == 3: state['deny'] = True
            assert got[-3] == 'event: closed' and 'the request may no longer see this job' in got[-2], got[-4:]
            closed = json.loads(got[-2][len('data: '):])['data']  # the data every `closed` event has (docs/fasthtml.md)
            ids = [int(l[len('id: '):]) for l in got if l.startswith('id: ')]
            assert closed['last_event_id'] == ids[-1] and closed['job_id'] == jid, (closed, ids[-3:])
            assert alpha.get_job(jid).status == 'running'
            state['deny'] = False
            c.post(f'/alpha/{jid}/cancel')


def test_no_client_can_make_the_server_forget_other_pages_and_a_made_up_page_shows_nobody_elses_jobs(tmp_path, monkeypatch):
    """SSE review (2026-12-07): the routes kept a token for each table page served, in a table bounded to 100,000 job
    ids (`MAX_PAGE_IDS`): a client asking for a hundred pages of 1,000 jobs pushed every other page out, and those
    pages' streams, on their next reconnect, got a `reset` (a reload) instead of their rows' events. A page's stream
    URL now names its jobs itself (`page_token`), so nothing is kept and nothing can be pushed out. (The old bound is
    made small here, so that the old code shows the eviction with 40 pages instead of 100,000 job ids.)"""
    import cjm_workers.fasthtml.routes as routes_mod
    monkeypatch.setattr(routes_mod, 'MAX_PAGE_IDS', 10, raising=False)
    app, mgr = sqlite_app(tmp_path, 'many')
    with served(app, app.state.routes.broadcaster) as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            J, first = {'accept': 'application/json'}, app.state.routes.broadcaster.last_id
            ids = [c.post('/many/start', json={'plugin_id': 'echo', 'params': {'text': str(i)}}, headers=J).json()['id']
                   for i in range(6)]
            for i in ids:
                end = time.monotonic() + 60
                while c.get(f'/many/{i}', headers=J).json()['status'] != 'completed' and time.monotonic() < end: time.sleep(0.02)
            victim = page_stream_url(c.get('/many').text)  # the first page: its six jobs, and new ones as they start
            later = page_stream_url(c.get('/many?offset=2&limit=2').text)  # ids[3] and ids[2]
            for i in range(40):  # another client: pages of every size and place
                assert c.get(f'/many?offset={i % 6}&limit={1 + i // 6}').status_code == 200
            new = c.post('/many/start', json={'plugin_id': 'echo', 'params': {'text': 'new'}}, headers=J).json()['id']
            after = victim.split('after=')[1].split('&')[0]
            # the victim's page comes back (a drop: its EventSource reconnects with Last-Event-ID)
            lines = _sse_until(c, victim, {'Last-Event-ID': after},
                               lambda ls: any('badge-completed' in l and new in l for l in ls), 20)
            assert not any(l.startswith('event: reset') for l in lines), lines  # not told to reload
            assert any('afterbegin' in l and new in l for l in lines) and any('badge-completed' in l and new in l for l in lines), lines
            lines = _sse_until(c, later, {'Last-Event-ID': str(first)}, lambda ls: False, 3)  # from the very first event
            assert not any(l.startswith('event: reset') for l in lines), lines
            data = '\n'.join(lines)  # its two jobs' events, and nothing of other jobs
            assert ids[3] in data and ids[2] in data and not any(i in data for i in ids[:2] + ids[4:] + [new]), data
            bad = c.get('/many/stream?after=0&page=X43HhAgc')  # not a page's URL (a page from another version)
            assert bad.text.startswith('event: reset') and 'reload it' in bad.text, bad.text


def test_a_made_up_page_token_shows_nobody_elses_jobs(tmp_path):
    """Nothing signs a page's stream URL, and nothing needs to: `page=` only narrows what the table's stream queues,
    and every event still passes the request's `scope` (and `authorize`). Bob naming the numbers of every job gets his own."""
    app, mgr, r = scoped_app(tmp_path / 'j.db')
    J = lambda user: {'x-user': user, 'accept': 'application/json'}
    with TestClient(app) as cli:
        after = r.broadcaster.last_id
        a = cli.post('/jobs/start', json={'plugin_id': 'tokens', 'params': {'text': 'secret words', 'delay': 0}}, headers=J('alice')).json()['id']
        cli.portal.call(mgr.wait_for_job, a, 30)
        b = cli.post('/jobs/start', json={'plugin_id': 'echo', 'params': {'text': 'mine'}}, headers=J('bob')).json()['id']
        cli.portal.call(mgr.wait_for_job, b, 30)
        text = replay_until_completed(cli, f'/jobs/stream?after={after}&page=0-zzzz&newest=0', {'x-user': 'bob'}, b)
        assert b in text and a not in text and 'secret' not in text, text[:2000]


def test_a_scope_whose_values_are_not_of_the_fields_type_is_a_500_that_says_so(tmp_path):
    """Newest-features review: a `scope` giving `{'owner': 5}` (a user id) for a job class whose `owner` is a `str`
    locked its users out of their jobs after a restart (the store gives the field back as '5'). Then a review of the
    fix: comparing text with numbers let users '05', '5.0' and '+5' see user 5's jobs. Filters compare text only with
    text now, and a scope value that is not of its field's type makes the start a 500 naming both (the job is cancelled
    on a trial job, so none is started): an app finds out at its first job, not after a restart."""
    db, J = tmp_path / 'j.db', lambda user: {'x-user': user, 'accept': 'application/json'}
    app, mgr, r = scoped_app(db, scope=lambda request: {'owner': int(request.headers.get('x-user', '0'))})
    with TestClient(app) as cli:
        r = cli.post('/jobs/start', json={'plugin_id': 'tokens', 'params': {'text': 'mine'}}, headers=J('5'))
        assert r.status_code == 500 and "gives owner=5 (a int), but OwnedJob.owner is a str" in r.json()['error'], r.text
        assert mgr.get_all_jobs() == []  # found on a trial job: none was started
    app, mgr, r = scoped_app(db, scope=lambda request: {'owner': request.headers.get('x-user', '')})  # text: right
    with TestClient(app) as cli:
        jid = cli.post('/jobs/start', json={'plugin_id': 'tokens', 'params': {'text': 'mine'}}, headers=J('5')).json()['id']
        cli.portal.call(mgr.wait_for_job, jid, 30)
    app, mgr, r = scoped_app(db, scope=lambda request: {'owner': request.headers.get('x-user', '')})  # restarted
    with TestClient(app) as cli:
        assert [j['id'] for j in cli.get('/jobs', headers=J('5')).json()] == [jid]
        assert cli.get(f'/jobs/{jid}', headers=J('5')).status_code == 200
        for who in ('05', '5.0', '+5'):
            assert cli.get('/jobs', headers=J(who)).json() == [] and cli.get(f'/jobs/{jid}', headers=J(who)).status_code == 404
        assert mgr.get_all_jobs(where={'owner': 5}) == []  # a number never finds text


class StrictManager(ReferenceJobManager):
    "A `create_job` that takes only what its plugins need (no `owner`)."
    def create_job(self, plugin_id, text=''): return ReferenceJob(id=uuid.uuid4().hex, plugin_id=plugin_id, params={'text': text})


def test_a_create_job_that_does_not_take_the_scopes_field_is_a_500_naming_scope(tmp_path):
    """App-builder review: with `scope={'owner': ...}` and a `create_job` without `owner`, a start was a 400 "cannot
    create the job: ... unexpected keyword argument 'owner'", which blames the client for the app's mistake."""
    bc = SSEBroadcaster(heartbeat_seconds=0)
    mgr = StrictManager(event_broadcaster=bc, worker_type='strict')
    async def lifespan(app):
        await mgr.start()
        try: yield
        finally: bc.close(); await mgr.ashutdown()
    app = FastHTML(lifespan=lifespan, default_hdrs=False, secret_key='tests')
    mount_job_routes(app, mgr, bc, prefix='/jobs', scope=lambda request: {'owner': 'alice'})
    with TestClient(app) as cli:
        r = cli.post('/jobs/start', json={'plugin_id': 'echo', 'params': {'text': 'hi'}}, headers={'accept': 'application/json'})
        assert r.status_code == 500 and 'create_job does not take owner' in r.json()['error'], r.text
        r = cli.post('/jobs/start', json={'plugin_id': 'echo', 'params': {'txt': 'hi'}}, headers={'accept': 'application/json'})
        assert r.status_code == 400 and "unexpected keyword argument 'txt'" in r.json()['error'], r.text  # the client's
        assert mgr.get_all_jobs() == []


@dataclass
class IntOwnedJob(ReferenceJob):
    owner: Optional[int] = None  # a numeric user id

class IntOwnedManager(ReferenceJobManager):
    def create_job(self, plugin_id, owner=None, **kw):
        return IntOwnedJob(id=uuid.uuid4().hex, plugin_id=plugin_id, params=kw, owner=owner)


def test_users_whose_ids_read_as_the_same_number_never_see_each_others_jobs(tmp_path):
    """Review of the day's fix: with `owner: int` and a `scope` giving the user id as text (as auth layers do), users
    '05', '5.0', '+5' and '5e0' saw user '5's jobs in the list (SQLite's integer affinity reads '05' as 5, and stored
    user '05's job as 5). Such a scope is now refused at the start (500), and a store filter never compares text with
    a number; with the ids made numbers by the app, each number is one user, before and after a restart."""
    db = tmp_path / 'j.db'
    app_ = lambda scope: scoped_app(db, scope=scope, manager_cls=IntOwnedManager)[:2]
    J = lambda user: {'x-user': user, 'accept': 'application/json'}
    app, mgr = app_(lambda request: {'owner': request.headers.get('x-user', '')})  # text for an int field
    with TestClient(app) as cli:
        r = cli.post('/jobs/start', json={'plugin_id': 'echo', 'params': {'text': 'x'}}, headers=J('05'))
        assert r.status_code == 500 and 'IntOwnedJob.owner is a int' in r.json()['error'], r.text
        assert mgr.get_all_jobs() == []  # (a job stored with owner '05' would read back as 5: user 5's)
    numeric = lambda request: {'owner': int(request.headers['x-user'])}  # the app decides what an id is
    for restarted in (False, True):
        app, mgr = app_(numeric)
        with TestClient(app) as cli:
            if not restarted:
                jid = cli.post('/jobs/start', json={'plugin_id': 'echo', 'params': {'text': 'x'}}, headers=J('5')).json()['id']
                cli.portal.call(mgr.wait_for_job, jid, 30)
            assert [j['id'] for j in cli.get('/jobs', headers=J('5')).json()] == [jid]
            assert cli.get(f'/jobs/{jid}', headers=J('6')).status_code == 404 and cli.get('/jobs', headers=J('6')).json() == []
            assert mgr.get_all_jobs(where={'owner': '5'}) == [] and len(mgr.get_all_jobs(where={'owner': 5})) == 1

class ExplicitManager(ReferenceJobManager):
    "A `create_job` naming its parameters, with the owner's type taken from `job_cls`."
    job_cls = OwnedJob
    def create_job(self, plugin_id, owner=None, text=''):
        return self.job_cls(id=uuid.uuid4().hex, plugin_id=plugin_id, params={'text': text}, owner=owner)


def test_the_scope_check_passes_scheduling_options_by_and_reads_annotations_as_the_store_does(tmp_path):
    """Final review of the trial job: it passed an allowed `priority` to `create_job` (a 400, "unexpected keyword
    argument 'priority'", where the start had worked); it skipped the type check when `typing.get_type_hints` failed
    (a name only a type checker imports), so text reached an int field and SQLite stored user '05' as 5; and it took
    an int for a bool field (stored as True: user 1's)."""
    from _h_jobs import HintedJob
    from dataclasses import make_dataclass
    J = lambda user: {'x-user': user, 'accept': 'application/json'}
    start_ = lambda cli, who, **p: cli.post('/jobs/start', json={'plugin_id': 'echo', 'params': {'text': 'x', **p}}, headers=J(who))
    class Explicit(ExplicitManager): job_cls = OwnedJob
    app, mgr, r = scoped_app(tmp_path / 'a.db', manager_cls=Explicit, scheduling={'priority': (0, 10)})
    with TestClient(app) as cli:
        r = start_(cli, 'alice', priority=3)
        assert r.status_code == 201 and mgr.get_job(r.json()['id']).priority == 3, r.text
    class Hinted(ExplicitManager): job_cls = HintedJob
    app, mgr, r = scoped_app(tmp_path / 'b.db', manager_cls=Hinted)  # text for an int field the hints hide
    with TestClient(app) as cli:
        r = start_(cli, '05')
        assert r.status_code == 500 and 'HintedJob.owner is a int' in r.json()['error'] and mgr.get_all_jobs() == [], r.text
    BoolJob = make_dataclass('BoolJob', [('owner', Optional[bool], None)], bases=(ReferenceJob,))
    class Flagged(ExplicitManager): job_cls = BoolJob
    app, mgr, r = scoped_app(tmp_path / 'c.db', manager_cls=Flagged, scope=lambda request: {'owner': int(request.headers['x-user'])})
    with TestClient(app) as cli:
        r = start_(cli, '5')
        assert r.status_code == 500 and 'BoolJob.owner is a bool' in r.json()['error'] and mgr.get_all_jobs() == [], r.text


def _sse_until(client, url, headers, done, timeout=10.0):
    "The lines of an SSE stream over real HTTP, read until `done(lines)` or `timeout` seconds without it."
    lines = []
    try:
        with client.stream('GET', url, headers=headers, timeout=httpx.Timeout(timeout)) as resp:
            for line in resp.iter_lines():
                lines.append(line)
                if done(lines): break
    except httpx.ReadTimeout: pass
    return lines


def test_a_first_pages_stream_resumed_after_a_drop_still_follows_the_rows_it_added():
    """SSE review (2026-12-07): the first table page adds a row for each job started after it was made (its `pending`
    event), and its stream follows that row. A stream that reconnected (a drop, a network blip: the browser's
    EventSource resumes with `Last-Event-ID`) forgot those rows, which then stayed `pending` or `running` for good."""
    app, alpha, beta, ra, rb = build()
    with served(app, ra.broadcaster) as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            url = page_stream_url(c.get('/alpha').text)
            got = {}
            def first():
                got['lines'] = _sse_until(c, url, {}, lambda ls: any('badge-running' in l for l in ls))
            reader = threading.Thread(target=first)
            reader.start()
            time.sleep(0.5)  # (the stream is open)
            jid = c.post('/alpha/start', json={'plugin_id': 'slow', 'params': {'seconds': 1.0}},
                         headers={'accept': 'application/json'}).json()['id']
            reader.join(30)
            lines = got['lines']
            assert any(f'job-{jid}-row' in l for l in lines) and any('badge-running' in l for l in lines), lines
            last = [l[4:] for l in lines if l.startswith('id: ')][-1]
            again = _sse_until(c, url, {'Last-Event-ID': last}, lambda ls: any('badge-completed' in l for l in ls))
            assert any('badge-completed' in l and jid in l for l in again), again


def test_head_requests_on_the_streams_leave_no_subscription_behind():
    """SSE review (2026-12-07): Starlette answers HEAD on every GET route; on a stream it subscribed, sent the headers,
    and never read the body, whose generator was what closed the subscription: each HEAD left one for good (and every
    event was then offered to it)."""
    app, alpha, beta, ra, rb = build()
    with TestClient(app) as cli:
        bc = ra.broadcaster
        jid = start(cli, '/alpha', 'slow', seconds=0.3)
        for _ in range(20):
            assert cli.head('/alpha/stream').status_code == 200
            assert cli.head(f'/alpha/{jid}/stream?after=0').status_code == 200
        assert bc.clients == 0, bc.clients
        cli.portal.call(alpha.wait_for_job, jid, 30)
        assert bc.clients == 0 and not bc._by_job and not bc._all


def test_a_json_content_type_without_a_body_is_fine_where_no_body_is_read():
    """SSE review (2026-12-07): an API client that sets `Content-Type: application/json` on every request (an axios
    instance, a shared httpx client) got `400 the JSON body is empty` from the list, a job's page, /health and cancel."""
    app, alpha, beta, ra, rb = build()
    h = {'content-type': 'application/json', 'accept': 'application/json'}
    with TestClient(app) as cli:
        jid = start(cli, '/alpha', 'slow', seconds=30)
        for url in ('/alpha', f'/alpha/{jid}', '/alpha/health'):
            assert cli.get(url, headers=h).status_code == 200, url
        assert cli.post(f'/alpha/{jid}/cancel', headers=h).status_code == 200
        assert cli.portal.call(alpha.wait_for_job, jid, 30).status == 'cancelled'
        r = cli.post('/alpha/start', headers=h)  # where a body is needed, its absence is named
        assert (r.status_code, r.json()['error']) == (400, 'the JSON body is empty')


def test_a_blank_last_event_id_does_not_hide_the_events_since_the_page_was_made():
    """SSE review (2026-12-07): a blank `Last-Event-ID` header (sent by some clients and proxies) counted as one, so
    the stream ignored its URL's `after` and the events since then were lost (here: all of a job that has ended)."""
    app, alpha, beta, ra, rb = build()
    with served(app, ra.broadcaster) as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            j = c.post('/alpha/start', json={'plugin_id': 'tokens', 'params': {'text': 'alpha beta gamma delta', 'delay': 0.2}},
                       headers={'accept': 'application/json'}).json()
            end = time.monotonic() + 30
            while alpha.get_job(j['id']).status != 'completed' and time.monotonic() < end: time.sleep(0.01)
            lines = _sse_until(c, j['stream'] + '&format=json', {'Last-Event-ID': ''},  # opened after the job's end
                               lambda ls: any(':completed' in l for l in ls), timeout=3)
            events = [json.loads(l[6:]) for l in lines if l.startswith('data: ')]
            assert ''.join(e['data']['chunk'] for e in events if e['type'].endswith(':chunk')).split() == \
                   ['alpha', 'beta', 'gamma', 'delta'], events


def test_a_job_deleted_before_its_pages_heard_its_end_says_so_and_its_page_stops_listening():
    """SSE review (2026-12-07): a job purged between its end and the rendering of its end event had nothing rendered
    for it (the renderer found no job): its page and its table row stayed 'running', the job page's stream ended, and
    the browser reconnected to a stream that answered 404, which the htmx SSE extension retries for as long as the
    page is open. Now the page is told the job is gone (`JobGone`: a `deleted` badge, and on the job's page its outcome
    and the sink replaced, which closes the stream), live and on a reconnect."""
    bc = SSEBroadcaster(heartbeat_seconds=0, flush_interval=3.0)  # a woken stream renders 3 s later: the purge is first
    mgr = ReferenceJobManager(worker_config=WorkerConfig(cancel_grace_seconds=1.0), event_broadcaster=bc, worker_type='gone')
    async def lifespan(app):
        await mgr.start()
        try: yield
        finally: bc.close(); await mgr.ashutdown()
    app = FastHTML(lifespan=lifespan, default_hdrs=False, secret_key='tests')
    mount_job_routes(app, mgr, bc, prefix='/gone')
    with served(app, bc) as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            jid = c.post('/gone/start', json={'plugin_id': 'slow', 'params': {'seconds': 60}},
                         headers={'accept': 'application/json'}).json()['id']
            detail, table = page_stream_url(c.get(f'/gone/{jid}').text), page_stream_url(c.get('/gone').text)
            got = {}
            readers = [threading.Thread(target=lambda: got.update(detail=_sse_until(c, detail, {}, lambda ls: False, 20))),
                       threading.Thread(target=lambda: got.update(table=_sse_until(
                           c, table, {}, lambda ls: any('badge-deleted' in l for l in ls), 20)))]
            for r in readers: r.start()
            end = time.monotonic() + 30
            while bc.clients < 2 and time.monotonic() < end: time.sleep(0.01)  # (both streams are open)
            assert c.post(f'/gone/{jid}/cancel', headers={'accept': 'application/json'}).status_code == 200
            while not mgr.get_job(jid).is_terminal and time.monotonic() < end: time.sleep(0.005)
            assert mgr.purge_jobs() == 1 and mgr.get_job(jid) is None  # before the streams render the job's end
            for r in readers: r.join(40)
            live = '\n'.join(got['detail'])
            assert 'badge-deleted' in live and 'no longer exists' in live and f'<div hidden id="job-{jid}-live"' in live, live
            assert any('badge-deleted' in l and jid in l for l in got['table']), got['table']
            # the job's page, back after that (a drop: its EventSource reconnects): told the same, not a 404
            r = c.get(detail, headers={'accept': 'text/event-stream', 'last-event-id': detail.split('after=')[1]})
            assert r.status_code == 200 and r.headers['content-type'].startswith('text/event-stream'), (r.status_code, r.text)
            assert 'event: jobs' in r.text and f'<div hidden id="job-{jid}-live" hx-swap-oob="true"></div>' in r.text, r.text
            assert c.get(detail).status_code == 404  # (an API client's request is still a 404)
            assert c.get(f'{detail}&format=json', headers={'accept': 'text/event-stream'}).status_code == 404


def test_a_page_whose_stream_is_refused_is_told_why_once_instead_of_reconnecting_for_ever():
    """SSE review (2026-12-07): a job page or table page whose stream was answered 403 (the app's `authorize` refuses
    its user now: signed out, permission taken away) or 400 (a bad `after=`) was asked again and again: the htmx SSE
    extension opens a new connection after every failed one (0.5 s doubling to 64 s), for as long as the page is open
    (Chromium: 5 requests in 10 s). Now a browser page's EventSource gets one message that says why and replaces the
    page's sink (which closes it); API clients still get the status codes."""
    refuse = {'on': False}
    app, alpha, beta, ra, rb = build(authorize=lambda req, job: not (refuse['on'] and req.url.path.endswith('/stream')))
    es = {'accept': 'text/event-stream'}
    with TestClient(app) as cli:
        jid = start(cli, '/alpha', 'slow', seconds=30)
        page, table = page_stream_url(cli.get(f'/alpha/{jid}').text), page_stream_url(cli.get('/alpha').text)
        refuse['on'] = True
        for url, sink, what in ((page, dom_id(jid, 'live'), 'this job'), (table, ns_id('/alpha', 'live'), 'these jobs')):
            r = cli.get(url, headers=es)
            assert (r.status_code, r.headers['content-type'].split(';')[0]) == (200, 'text/event-stream'), (url, r.status_code, r.text)
            assert r.text.startswith('event: jobs\n') and f'id="{sink}"' in r.text and 'hx-swap-oob="true"' in r.text, r.text
            assert 'sse-connect' not in r.text and f'you may no longer see {what}' in r.text and 'sign in again' in r.text, r.text
            assert cli.get(url).status_code == 403  # API clients: the status code
            assert cli.get(f'{url}&format=json', headers=es).status_code == 403
        refuse['on'] = False
        for url, sink in ((f'/alpha/{jid}/stream?after=x', dom_id(jid, 'live')), ('/alpha/stream?after=x', ns_id('/alpha', 'live'))):
            r = cli.get(url, headers=es)
            assert (r.status_code, r.headers['content-type'].split(';')[0]) == (200, 'text/event-stream'), (url, r.status_code, r.text)
            assert f'id="{sink}"' in r.text and 'after must be an integer event id' in r.text and 'Reload the page' in r.text, r.text
            assert cli.get(url).status_code == 400
            assert cli.get(f'{url}&format=json', headers=es).status_code == 400
        cli.post(f'/alpha/{jid}/cancel')
        cli.portal.call(alpha.wait_for_job, jid, 30)


def test_a_renderer_that_raises_on_a_jobs_end_does_not_lose_the_end_or_make_its_page_reconnect(monkeypatch, caplog):
    """SSE review (2026-12-07): when rendering a job's end event raised (a bug in showing the job's state), the event
    was logged and not sent; the job page's stream ended with the job all the same, so the page stayed 'running', its
    EventSource reconnected, was replayed the same end, which again rendered nothing, and so on every second for as
    long as the page was open (Chromium: 10 stream requests in 12 s). Now the end is shown as well as can be (the
    badge, a note to reload, the sink replaced, which closes the stream); an event on the way that raises is skipped
    and the stream goes on; each is logged once."""
    import logging
    import cjm_workers.fasthtml.routes as routes_mod
    real = routes_mod.render_event
    def buggy(ev, job, *args, **kwargs):
        if ev.type.rpartition(':')[2] in ('started', 'completed'): raise RuntimeError('a bug in rendering')
        return real(ev, job, *args, **kwargs)
    monkeypatch.setattr(routes_mod, 'render_event', buggy)
    app, alpha, beta, ra, rb = build()
    es = {'accept': 'text/event-stream'}
    with TestClient(app) as cli, caplog.at_level(logging.ERROR):
        jid = start(cli, '/alpha', 'tokens', text='one two three', delay=0)
        cli.portal.call(alpha.wait_for_job, jid, 30)
        for _ in range(2):  # the page's stream, and a second page's (the event's frame is rendered once)
            r = cli.get(f'/alpha/{jid}/stream?after=0', headers=es)  # (the job has ended: its events, then the end)
            assert r.status_code == 200, r.text
            assert 'job-output' in r.text or 'beforeend' in r.text, r.text  # the events on the way are sent
            assert f'id="{dom_id(jid, "status")}" class="job-badge badge-completed"' in r.text, r.text
            assert 'could not show its outcome' in r.text and f'<div hidden id="{dom_id(jid, "live")}" hx-swap-oob="true"></div>' in r.text, r.text
        raised = [rec for rec in caplog.records if rec.exc_info and 'a bug in rendering' in str(rec.exc_info[1])]
        assert len(raised) == 2, [rec.getMessage() for rec in raised]  # started and completed, once each


def test_the_start_route_answers_once_the_job_is_in_the_file(tmp_path, monkeypatch):
    """Reported by a life-cycle run under uvicorn: `POST /start` answered 201 Created while the job was only in the
    app's memory (a durable store writes behind), so a crash of the app right after the answer lost a job the client
    had been told exists. It now answers once the job is in the file; and 202 with `saved: false`, not 201, if the
    store cannot write it in time. The writer process is paused (SIGSTOP) to hold that window open."""
    import sqlite3
    from contextlib import closing
    app, mgr = sqlite_app(tmp_path, 'kept')
    def in_file(jid):  # read from the file itself, on a connection of its own
        with closing(sqlite3.connect(tmp_path / 'j.db')) as con:
            return con.execute("SELECT count(*) FROM jobs_kept WHERE id = ?", (jid,)).fetchone()[0] == 1
    server, thread, url = serve_in_thread(app)
    js = {'accept': 'application/json'}
    try:
        with httpx.Client(base_url=url, timeout=30) as cli:
            first = cli.post('/kept/start', data={'plugin_id': 'echo', 'params': '{"text": "a"}'}, headers=js)
            assert first.status_code == 201 and in_file(first.json()['id'])  # (the table exists)
            writer = mgr.job_store.writer_pid
            answers = []
            post = threading.Thread(target=lambda: answers.append(cli.post(
                '/kept/start', data={'plugin_id': 'echo', 'params': '{"text": "b"}'}, headers=js)))
            with paused(writer):
                post.start(); post.join(0.5)
                assert not answers, "answered while the job could not be in the file (its writer is paused)"
            post.join(30)
            r = answers[0]
            assert r.status_code == 201 and in_file(r.json()['id']), (r.status_code, r.text)
            monkeypatch.setattr(routes_mod, 'SAVE_WAIT_SECONDS', 0.3)
            with paused(writer): late = cli.post('/kept/start', data={'plugin_id': 'slow', 'params': '{"seconds": 1}'}, headers=js)
            body = late.json()
            assert late.status_code == 202 and body['saved'] is False and 'not saved yet' in body['warning'], late.text
            assert late.headers['location'].endswith(body['id'])
            assert cli.get(late.headers['location'], headers=js).json()['status'] in ('pending', 'running', 'completed')
    finally:
        server.should_exit = True
        thread.join(30)


class RestartingOwnedManager(OwnedManager):
    "Owned jobs, and a worker that a crash restarts (the default policy fails it)."
    def __init__(self, **kw): super().__init__(worker_config=WorkerConfig(restart_policy=RestartPolicy.ALWAYS), **kw)

def test_with_scope_a_workers_events_reach_only_who_sees_every_job(tmp_path):
    """Multi-user review (2026-12-07): with `scope`, the events of a worker (no job id: `worker_started`,
    `worker_stopped` with its pid, exit code and why, `worker_restarting`) reached every user's JSON table stream: when
    alice's job crashed its worker, bob was told at once (`was killed by SIGKILL`, the pid that ran her job). They now
    go only to a request whose `scope` answers None (an administrator's), and so does the health route's detail (the
    whole manager's counts, why workers failed): a user gets its `ok`. Job streams and the JSON list and detail name
    none of alice's jobs to bob (over real HTTP)."""
    users = lambda request: None if request.headers.get('x-user') == 'admin' else {'owner': request.headers.get('x-user', '')}
    app, mgr, r = scoped_app(tmp_path / 'j.db', scope=users, manager_cls=RestartingOwnedManager)
    J = lambda user: {'x-user': user, 'accept': 'application/json'}
    with served(app, r.broadcaster) as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            after = r.broadcaster.last_id
            a = c.post('/jobs/start', json={'plugin_id': 'crash', 'params': {'mode': 'sigkill'}}, headers=J('alice')).json()['id']
            end = time.monotonic() + 30
            while not mgr.get_job(a).is_terminal and time.monotonic() < end: time.sleep(0.01)
            assert mgr.get_job(a).status == 'failed' and 'SIGKILL' in mgr.get_job(a).error
            b = c.post('/jobs/start', json={'plugin_id': 'echo', 'params': {'text': 'b'}}, headers=J('bob')).json()['id']
            a2 = c.post('/jobs/start', json={'plugin_id': 'echo', 'params': {'text': 'a'}}, headers=J('alice')).json()['id']
            last = {'bob': b, 'alice': a2, 'admin': a2}  # (the last job each one sees: its stream is read up to its end)
            seen = {who: replay_until_completed(c, f'/jobs/stream?format=json&after={after}', {'x-user': who}, last[who])
                    for who in ('bob', 'alice', 'admin')}
            types = {who: re.findall(r'"type":"owned:(\w+)"', text) for who, text in seen.items()}
            assert types['bob'] == ['pending', 'started', 'completed'], types['bob']  # his own job's, nothing else
            assert 'SIGKILL' not in seen['bob'] and a not in seen['bob'], seen['bob']
            assert not [x for x in types['alice'] if x.startswith('worker_')], types['alice']  # a user's table: no worker's
            assert {'worker_stopped', 'worker_restarting', 'worker_started'} <= set(types['admin']), types['admin']
            assert 'was killed by SIGKILL' in seen['admin']  # the administrator still sees why a worker stopped
            assert [j['id'] for j in c.get('/jobs', headers=J('bob')).json()] == [b]
            assert c.get(f'/jobs/{a}', headers=J('bob')).status_code == 404
            assert c.get(f'/jobs/{a}/stream?format=json&after={after}', headers=J('bob')).status_code == 404
            health = c.get('/jobs/health', headers=J('bob'))  # a user: whether the jobs can run, not the manager's state
            assert health.status_code == 200 and health.json() == {'ok': True}, health.text
            health = c.get('/jobs/health', headers=J('admin')).json()  # who sees every job: all of it (no job ids)
            assert health['ok'] and health['workers']['total'] == 1 and a not in json.dumps(health), health


def test_a_workers_events_reach_every_table_stream_without_scope_or_authorize_and_none_with_authorize_alone():
    """The other side of `test_with_scope_a_workers_events_reach_only_who_sees_every_job`: an app without `scope` and
    `authorize` (one user) still gets a worker's events on its JSON table stream; with `authorize` alone, which cannot
    say who sees every job, nobody does (the jobs it admits still come)."""
    for authorize, shown in ((None, True), (lambda request, job: True, False)):
        app, alpha, *_ = build(authorize=authorize)
        with TestClient(app) as cli:
            jid = start(cli, '/alpha', 'echo', text='ok')
            text = replay_until_completed(cli, '/alpha/stream?format=json&after=0', {}, jid)
            assert f'"job_id":"{jid}"' in text, text
            assert ('"type":"alpha:worker_started"' in text) == shown, (authorize, text)
