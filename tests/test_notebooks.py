"""Run every notebook in nbs/ as a test (nbdev's `test_nb`, cell by cell, in this process)."""
from pathlib import Path
import pytest
from nbdev.test import test_nb as run_notebook  # imported under another name so pytest does not collect it

NBS = sorted(p for p in (Path(__file__).parent.parent / 'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)

@pytest.mark.parametrize('nb', NBS, ids=[str(p.relative_to(p.parents[1] if p.parent.name != 'nbs' else p.parent)) for p in NBS])
def test_notebook(nb):
    ok, _ = run_notebook(nb, skip_flags=['notest', 'slow'], do_print=False, showerr=True, cell_timeout=300)
    assert ok, f"notebook {nb.name} failed (see the error above)"
