"""Every notebook's jupytext source runs top to bottom at the small size; a failing cell fails the test.

Each notebook runs in its own process (``notebooks/run_notebooks.py --only=NAME --check``), the cells
in order in one namespace, without a Jupyter kernel (only ``jupytext`` is needed). Writing the
committed ``.ipynb`` files with their outputs is ``python notebooks/run_notebooks.py`` (a kernel).
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("jupytext", reason="jupytext is in the test extra: pip install -e '.[test]'")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "notebooks"))

from run_notebooks import NOTEBOOKS  # noqa: E402

# Seconds on 2 CPU cores at the small size, with headroom; the whole module stays under ~5 minutes.
TIMEOUT_S = {"quickstart": 300, "clipo": 120, "openrs": 120, "models": 240, "extending": 240}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name):
    assert os.path.exists(os.path.join(REPO, "notebooks", f"{name}.py"))
    env = dict(os.environ, NOTEBOOK_SIZE="small", MPLBACKEND="Agg")
    env.pop("OPENRS_JUDGE_URL", None)  # the OpenRS notebook replays its recorded judge transcript
    env.pop("OPENRS_RECORD", None)
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "notebooks", "run_notebooks.py"), f"--only={name}", "--check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S[name],
    )
    assert r.returncode == 0, f"notebook {name} failed:\n{r.stderr[-6000:]}\n--- stdout tail:\n{r.stdout[-2000:]}"
    assert f"{name}: ran at size small" in r.stdout


def test_every_notebook_has_committed_outputs():
    """The .ipynb next to each source exists, holds the source's current cells and every code cell
    of it has been executed without an error."""
    import jupytext
    import nbformat

    for name in NOTEBOOKS:
        source = jupytext.read(os.path.join(REPO, "notebooks", f"{name}.py"), fmt="py:percent")
        path = os.path.join(REPO, "notebooks", f"{name}.ipynb")
        assert os.path.exists(path), f"{path} missing: python notebooks/run_notebooks.py --only={name}"
        nb = nbformat.read(path, as_version=4)
        stale = [c.source for c in nb.cells] != [c.source for c in source.cells]
        assert not stale, f"{name}.ipynb is older than {name}.py: python notebooks/run_notebooks.py --only={name}"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.execution_count for c in code), f"{name}.ipynb has unexecuted cells"
        errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{name}.ipynb holds an error output"
