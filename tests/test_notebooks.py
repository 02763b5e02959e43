"""Every notebook in notebooks/ runs top to bottom on a fresh lake and draws its plots.

The lake is ``test_analysis.shared_lake``: generated traffic with the cost-spike scenario and
the anomalies the detector finds in it, so the incidents notebook has something to show. Each
notebook runs in a fresh IPython kernel of this interpreter (nbclient), with its parameter
cell reading ``AGENTSTREAM_DATA_DIR``; any error in any cell fails the test.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient
from test_analysis import shared_lake

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_three_notebooks_exist() -> None:
    assert {p.stem for p in NOTEBOOKS} >= {"overview", "quality", "incidents"}


def test_notebooks_are_committed_without_outputs() -> None:
    """Outputs are produced by running them, not stored (small diffs, no stale plots)."""
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name
        params = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and "AGENTSTREAM_DATA_DIR" in params[0].source, path.name


def _kernel_name() -> str:
    """The python3 kernel, which runs ``sys.executable`` (ipykernel's native spec)."""
    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:  # pragma: no cover - ipykernel missing
        pytest.fail("no python3 kernel: install ipykernel in this environment")
    assert (
        spec.argv[0] in ("python", sys.executable)
        or Path(spec.argv[0]).resolve() == Path(sys.executable).resolve()
    ), spec.argv
    return "python3"


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every notebook executed, all at once (one kernel process each, so they use every
    core): name -> the executed notebook, or the exception its run raised."""
    lake = shared_lake(tmp_path_factory)
    env = {
        "AGENTSTREAM_DATA_DIR": str(lake),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        # The kernel imports the project from this checkout, whatever the install mode.
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # kernels inherit the environment when they start
    books = {p.stem: nbformat.read(p, as_version=4) for p in NOTEBOOKS}
    clients = [
        NotebookClient(
            book,
            kernel_name=_kernel_name(),
            timeout=120,
            allow_errors=False,  # the first failing cell raises CellExecutionError
            resources={"metadata": {"path": str(REPO / "notebooks")}},
        )
        for book in books.values()
    ]

    async def run_all() -> list[Any]:
        return await asyncio.gather(*(c.async_execute() for c in clients), return_exceptions=True)

    try:
        results = asyncio.run(run_all())
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {
        name: (result if isinstance(result, BaseException) else book)
        for (name, book), result in zip(books.items(), results, strict=True)
    }


def _outputs(book: Any) -> list[Any]:
    return [out for cell in book.cells if cell.cell_type == "code" for out in cell.outputs]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_draws(path: Path, executed: dict[str, Any]) -> None:
    book = executed[path.stem]
    if isinstance(book, BaseException):
        raise book
    images = [
        base64.b64decode(out["data"]["image/png"])
        for out in _outputs(book)
        if "image/png" in out.get("data", {})
    ]
    assert images, f"{path.name} drew no image"
    for png in images:
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    problems = [
        out
        for out in _outputs(book)
        if out.get("output_type") == "error" or out.get("name") == "stderr"
    ]
    assert not problems, problems
    tables = [
        out["data"]["text/html"] for out in _outputs(book) if "text/html" in out.get("data", {})
    ]
    assert tables and all('<table class="agentstream"' in t for t in tables)
    assert not any('class="empty"' in t for t in tables), "a table with no rows"
    # Every code cell after the parameters and the connection shows something.
    for cell in book.cells:
        quiet = "analysis.connect" in cell.source or "parameters" in cell.metadata.get("tags", [])
        if cell.cell_type == "code" and not quiet:
            assert cell.outputs, f"{path.name}: a cell without output:\n{cell.source}"
