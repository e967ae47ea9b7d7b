"""docs/api.md must be what tools/make_api_docs.py generates from the current code."""
import difflib, importlib.util
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    "tools/ is not a package: import the generator script by its path."
    spec = importlib.util.spec_from_file_location('make_api_docs', ROOT/'tools'/'make_api_docs.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_docs_are_current(tmp_path):
    generated = load_generator().main(tmp_path/'api.md').read_text(encoding='utf-8')
    committed_path = ROOT/'docs'/'api.md'
    committed = committed_path.read_text(encoding='utf-8') if committed_path.exists() else ''
    if generated != committed:
        diff = list(difflib.unified_diff(committed.splitlines(), generated.splitlines(),
                                         'docs/api.md (committed)', 'docs/api.md (generated)', lineterm=''))
        shown = '\n'.join(diff[:60]) + ('\n...' if len(diff) > 60 else '')
        pytest.fail("docs/api.md is out of date with the code: run `python tools/make_api_docs.py` "
                    f"and commit the result.\n{shown}", pytrace=False)
