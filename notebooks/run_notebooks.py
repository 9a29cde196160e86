"""Runs the notebooks: jupytext source (``notebooks/NAME.py``) -> execute top to bottom -> ``NAME.ipynb``.

  python notebooks/run_notebooks.py                      # all notebooks, small size, writes NAME.ipynb
  python notebooks/run_notebooks.py --only=clipo,openrs  # some of them
  python notebooks/run_notebooks.py --size=full          # the larger settings (minutes to tens of minutes)
  python notebooks/run_notebooks.py --only=clipo --check # execute in this process, write nothing

The size reaches the notebooks as the environment variable ``NOTEBOOK_SIZE`` (``small`` or ``full``);
``--size`` overrides it. Writing ``.ipynb`` files needs a Jupyter kernel (``nbclient``, ``ipykernel``:
the ``notebooks`` extra); ``--check`` needs only ``jupytext`` (the ``test`` extra) and is what
``tests/test_notebooks.py`` runs. Cells execute with the repository root as working directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NOTEBOOKS = ("quickstart", "clipo", "openrs", "models", "extending")
SIZES = ("small", "full")


class CellError(RuntimeError):
    """A notebook cell raised; the message names the notebook, the cell and its first lines."""


def source_path(name: str) -> str:
    return os.path.join(HERE, f"{name}.py")


def read_notebook(name: str):
    import jupytext

    return jupytext.read(source_path(name), fmt="py:percent")


def check(name: str) -> float:
    """Executes the code cells of ``name`` in order in one namespace, in this process (no kernel).

    Raises CellError for the first cell that raises. Returns the wall time in seconds.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; the notebook's figures are drawn but not shown
    nb = read_notebook(name)
    namespace = {"__name__": "__main__", "__file__": source_path(name)}
    start = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cells = [c for c in nb.cells if c.cell_type == "code"]
        for i, cell in enumerate(cells):
            try:
                exec(compile(cell.source, f"<{name}.py cell {i + 1}>", "exec"), namespace)
            except Exception as e:
                head = "\n".join(cell.source.splitlines()[:6])
                raise CellError(
                    f"{name}.py: code cell {i + 1} of {len(cells)} raised {type(e).__name__}: {e}\n"
                    f"--- cell starts:\n{head}\n--- traceback:\n{traceback.format_exc()}"
                ) from e
    finally:
        os.chdir(cwd)
        import matplotlib.pyplot as plt

        plt.close("all")
    return time.perf_counter() - start


def execute(name: str, timeout_s: int) -> float:
    """Executes ``name`` in a fresh python3 kernel and writes ``NAME.ipynb`` with its outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = read_notebook(name)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.pop("jupytext", None)
    start = time.perf_counter()
    client = NotebookClient(
        nb,
        timeout=timeout_s,
        kernel_name="python3",
        resources={"metadata": {"path": ROOT}},
        record_timing=False,  # no per-cell timestamps: re-runs give small diffs
    )
    client.execute()
    nbformat.write(nb, os.path.join(HERE, f"{name}.ipynb"))
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help=f"comma-separated names among {', '.join(NOTEBOOKS)}")
    p.add_argument("--size", choices=SIZES, default=None, help="default: $NOTEBOOK_SIZE or small")
    p.add_argument("--check", action="store_true", help="execute in this process without a kernel; write nothing")
    p.add_argument("--timeout_s", type=int, default=1800, help="per-cell timeout with a kernel")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        p.error(f"unknown notebook(s) {unknown}; valid: {', '.join(NOTEBOOKS)}")
    size = args.size or os.environ.get("NOTEBOOK_SIZE", "small")
    if size not in SIZES:
        p.error(f"NOTEBOOK_SIZE={size!r}; valid: {', '.join(SIZES)}")
    os.environ["NOTEBOOK_SIZE"] = size  # the kernel and the in-process cells read it
    for name in names:
        try:
            wall = check(name) if args.check else execute(name, args.timeout_s)
        except Exception as e:  # a failing cell: report which, stop with an error
            print(f"{name}: FAILED\n{e}", file=sys.stderr)
            return 1
        action = "ran" if args.check else f"wrote notebooks/{name}.ipynb"
        print(f"{name}: {action} at size {size} in {wall:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
