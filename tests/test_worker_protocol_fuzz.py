"""Malformed and odd protocol messages (hypothesis-generated) sent to a real worker process: it must answer what it
can, ignore what it cannot read, and keep serving."""
import multiprocessing as mp
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cjm_workers.core.channel import PipeChannel
from cjm_workers.testing import reference_worker

# Message types the worker knows, except `stop` (which ends it by design), plus unknown ones.
TYPES = st.sampled_from(['execute', 'reload', 'unload', 'get_state', 'init', 'cancel', 'explode', '', None, 7])
VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
                   st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
# Plugins that cannot take the worker down ('crash' would, by design; 'slow' would only take time).
PLUGINS = st.sampled_from(['echo', 'tokens', 'noload', 'nope', None, 3, ''])
MESSAGE = st.one_of(
    st.fixed_dictionaries({'type': TYPES}, optional={
        'job_id': st.one_of(st.text(max_size=8), st.none(), st.integers()),
        'request_id': st.one_of(st.text(max_size=8), st.none(), st.integers()),
        'plugin_name': PLUGINS, 'plugin_config': st.one_of(st.none(), st.dictionaries(st.text(max_size=5), VALUES, max_size=3)),
        'config': VALUES, 'stream': VALUES, 'text': VALUES, 'fail': st.one_of(st.none(), st.text(max_size=10))}),
    VALUES)


@pytest.fixture(scope='module')
def worker():
    ctx = mp.get_context('spawn')
    req, res, resp = PipeChannel(ctx, control=True), PipeChannel(ctx), PipeChannel(ctx)
    p = ctx.Process(target=reference_worker, args=(req, res, resp))
    p.start()
    assert res.get(timeout=60)['type'] == 'ready'
    yield p, req, res, resp
    req.put({'type': 'stop'})
    p.join(10)
    if p.is_alive(): p.kill()
    for c in (req, res, resp): c.close()


def _roundtrip(req, res, resp, n):
    "A valid job and a valid command still work: drain until their answers arrive."
    req.put({'type': 'execute', 'job_id': f'probe{n}', 'plugin_name': 'echo', 'text': 'still here'})
    req.put({'type': 'get_state', 'request_id': f'state{n}'})
    while True:
        m = res.get(timeout=30)
        if m.get('type') == 'result' and m.get('job_id') == f'probe{n}': break
    assert m['status'] == 'success' and m['data']['text'] == 'still here'
    while True:
        r = resp.get(timeout=30)
        if r.get('request_id') == f'state{n}': break
    assert r['type'] == 'state'


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=st.lists(MESSAGE, min_size=1, max_size=6))
def test_worker_survives_malformed_messages(worker, msgs):
    p, req, res, resp = worker
    for m in msgs:
        req.put(m)
        if isinstance(m, dict) and m.get('type') == 'cancel': req.control.put(m)  # the control path too
    _roundtrip(req, res, resp, id(msgs))
    assert p.is_alive()
