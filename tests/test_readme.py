"""The README's "Using it" example, run as written: its `# <path>` code blocks become files of a scratch project,
and a real FastHTML app (its lifespan, a real worker process) answers the route."""
import os, re, subprocess, sys, textwrap
from pathlib import Path

README = Path(__file__).parent.parent / 'README.md'
PLUGINS_GUIDE = Path(__file__).parent.parent / 'docs' / 'plugins.md'


def example_files(doc: Path = README) -> dict:
    "The python code blocks of `doc` whose first line is `# <path>.py`, by path (indented blocks dedented)."
    blocks = re.findall(r"^( *)```python\n(.*?)^ *```", doc.read_text(), re.S | re.M)
    blocks = [textwrap.dedent(''.join(indent + l for l in b.splitlines(True))) for indent, b in blocks]
    return {m.group(1): b for b in blocks if (m := re.match(r"# (\S+\.py)\n", b))}


def test_the_readme_example_runs_as_written(tmp_path):
    files = example_files()
    assert set(files) == {'myapp/jobs.py', 'app.py'}, list(files)
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    (tmp_path / 'myapp' / '__init__.py').write_text('')
    check = textwrap.dedent("""
        import psutil
        from starlette.testclient import TestClient
        from app import app, manager
        if __name__ == '__main__':
            with TestClient(app) as client:
                r = client.post('/transcribe', data={'audio_path': 'talk.wav'})
                assert r.status_code == 200 and r.text == 'transcript of talk.wav', (r.status_code, r.text)
                job = manager.get_all_jobs()[0]
                assert (job.status, job.progress, job.result['metadata']) == ('completed', 1.0, {'model': 'model base'})
                pid = manager.get_worker_stats()[0]['pid']
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            print('ok')
        """)
    p = subprocess.run([sys.executable, '-c', check], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == 'ok', p.stdout + p.stderr[-3000:]


def test_the_plugin_guide_script_runs_on_the_readme_module(tmp_path):
    "docs/plugins.md's `# app.py` (a script driving the README's manager) runs as written: the job completes."
    files = example_files()
    (tmp_path / 'myapp').mkdir()
    (tmp_path / 'myapp' / '__init__.py').write_text('')
    (tmp_path / 'myapp' / 'jobs.py').write_text(files['myapp/jobs.py'])
    (tmp_path / 'script.py').write_text(example_files(PLUGINS_GUIDE)['app.py'])
    p = subprocess.run([sys.executable, 'script.py'], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("completed {'text': 'transcript of talk.wav'"), p.stdout + p.stderr[-3000:]


PORTING_GUIDE = Path(__file__).parent.parent / 'docs' / 'porting.md'


def test_the_porting_guides_after_example_runs_as_written(tmp_path):
    """docs/porting.md's "after" app (the predecessor's app with the import prefix changed and the new options) runs
    as written, on stand-ins of `myapp.plugins` (the reference plugins) and `myapp.services` (cjm-fasthtml-plugins' and
    -resources' shapes from tests/test_extension_adapters.py, and the real `cjm_fasthtml_sse.SSEBroadcastManager`):
    each of its three routes answers as its comments say, and its lifespan leaves no worker behind."""
    blocks = re.findall(r"^```python\n(.*?)^```", PORTING_GUIDE.read_text(), re.S | re.M)
    after = [b for b in blocks if '# ← prefix changed' in b]
    assert len(after) == 1, len(after)
    (tmp_path / 'app.py').write_text(after[0])
    (tmp_path / 'myapp').mkdir()
    (tmp_path / 'myapp' / '__init__.py').write_text('')
    (tmp_path / 'myapp' / 'plugins.py').write_text("from cjm_workers.testing import reference_plugin_manager as make_plugin_manager\n")
    (tmp_path / 'myapp' / 'services.py').write_text(textwrap.dedent("""
        from cjm_fasthtml_sse.core import SSEBroadcastManager
        from test_extension_adapters import UpstreamRegistry, UpstreamResourceManager
        registry, resources, sse = UpstreamRegistry(category='transcription'), UpstreamResourceManager(), SSEBroadcastManager()
        """))
    check = textwrap.dedent("""
        import re, psutil
        from starlette.testclient import TestClient
        from app import app, manager
        if __name__ == '__main__':
            with TestClient(app) as client:
                r = client.post('/transcribe', data={'plugin_id': 'transcription_transcribe', 'audio_path': 'a.wav'})
                assert r.status_code == 200 and re.search(r'<p>job \\S+: (pending|running)</p>', r.text), r.text
                r = client.post('/transcribe-and-wait', data={'plugin_id': 'transcription_transcribe', 'audio_path': 'b.wav'})
                assert r.status_code == 200 and 'b.wav: segment1 ' in r.text and 'segment10' in r.text, r.text
                slow = client.post('/transcribe', data={'plugin_id': 'transcription_transcribe', 'audio_path': 'c.wav'})
                jid = re.search(r'job (\\S+):', slow.text).group(1)
                r = client.post('/cancel', data={'job_id': jid})
                assert r.status_code == 200 and '>cancelled<' in r.text, r.text
                assert manager.get_job(jid).status == 'cancelled'
                pid = manager.get_worker_stats()[0]['pid']
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            print('ok')
        """)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get('PYTHONPATH')]))}
    p = subprocess.run([sys.executable, '-c', check], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0 and p.stdout.strip() == 'ok', p.stdout + p.stderr[-3000:]


FASTHTML_GUIDE = Path(__file__).parent.parent / 'docs' / 'fasthtml.md'


def test_the_fasthtml_guides_few_lines_run_as_written_on_the_readme_module(tmp_path):
    """docs/fasthtml.md's "The few lines" (an app with live job pages) runs as written on the README's manager: the
    table page shows the start button, a start over JSON answers 201 with the job's stream, the job completes, and
    its page and the JSON table show it; the lifespan leaves no worker."""
    block = re.search(r"## The few lines\n+```python\n(.*?)^```", FASTHTML_GUIDE.read_text(), re.S | re.M).group(1)
    (tmp_path / 'app.py').write_text(block)
    (tmp_path / 'myapp').mkdir()
    (tmp_path / 'myapp' / '__init__.py').write_text('')
    (tmp_path / 'myapp' / 'jobs.py').write_text(example_files()['myapp/jobs.py'])
    check = textwrap.dedent("""
        import psutil
        from starlette.testclient import TestClient
        from app import app, manager
        J = {'accept': 'application/json'}
        if __name__ == '__main__':
            with TestClient(app) as client:
                page = client.get('/transcriptions')
                assert page.status_code == 200 and 'Transcribe talk.wav' in page.text, page.text[-2000:]
                r = client.post('/transcriptions/start', json={'plugin_id': 'whisper', 'params': {'audio_path': 'talk.wav'}}, headers=J)
                assert r.status_code == 201 and r.json()['stream'].startswith('/transcriptions/'), r.text
                job = manager.get_job(r.json()['id'])
                done = client.portal.call(manager.wait_for_job, job.id, 60)
                assert done.status == 'completed' and done.result['text'] == 'transcript of talk.wav', (done.status, done.result)
                assert 'transcript of talk.wav' in client.get(f'/transcriptions/{job.id}').text
                assert [j['status'] for j in client.get('/transcriptions', headers=J).json()] == ['completed']
                pid = manager.get_worker_stats()[0]['pid']
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            print('ok')
        """)
    p = subprocess.run([sys.executable, '-c', check], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == 'ok', p.stdout + p.stderr[-3000:]
