"""notebooks/gradex_colab_tpu.ipynb executed end to end on configs/demo.py:tiny, as CI runs it.

The notebook runs in a kernel of *this* interpreter (``sys.executable -m ipykernel_launcher``,
from a kernel spec written to a temporary folder), so the result does not depend on which
``python3`` kernel spec happens to be installed: in a fresh venv after ``pip install -e .[test]``
this is the venv's Python with jaxgrad importable. ``JAXGRAD_NOTEBOOK_TINY=1`` forces the tiny
run and ``JAXGRAD_NOTEBOOK_WORKDIR`` sends its outputs to a temporary directory. One execution
(about two minutes on 2 cores, the tiny pipeline included) is shared by the tests.
"""

from __future__ import annotations

import base64
import json
import pathlib
import re
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from helpers import REPO

NOTEBOOK = pathlib.Path(REPO) / "notebooks" / "gradex_colab_tpu.ipynb"
KERNEL = "jaxgrad-notebook-test"
TABLE_HEADER = ("| rank | source | kind | score | 95% CI | subsets | grad-sim cosine | repr-sim cosine "
                "| selected |")


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def _cell(nb, cell_id: str):
    for cell in nb.cells:
        if cell.get("id") == cell_id:
            return cell
    raise AssertionError(f"the notebook has no cell with id {cell_id!r}; ids are "
                         f"{[c.get('id') for c in nb.cells]}")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """(executed notebook, run directory): the notebook run once in a kernel of sys.executable."""
    tmp = tmp_path_factory.mktemp("notebook")
    workdir = tmp / "run"
    spec_dir = tmp / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxgrad test kernel",
        "language": "python",
        "env": {"JAXGRAD_NOTEBOOK_TINY": "1", "JAXGRAD_NOTEBOOK_WORKDIR": str(workdir)},
    }))
    km = KernelManager(kernel_name=KERNEL,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / "kernels")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the failing cell and its traceback, if any cell fails.
    NotebookClient(nb, km=km, timeout=600,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return nb, workdir


def test_committed_notebook_is_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [c.get("id") for c in code if c.outputs or c.execution_count is not None]
    assert not dirty, f"cells {dirty} carry outputs or execution counts: clear them before committing"
    ids = [c.get("id") for c in nb.cells]
    assert None not in ids and len(set(ids)) == len(ids), f"every cell needs its own id: {ids}"
    assert re.search(r"^TINY = (True|False)\b", code[0].source, re.M), \
        f"the first code cell must hold the TINY switch; it is:\n{code[0].source}"


def test_tiny_forced_by_environment_and_install_skipped(executed):
    nb, workdir = executed
    assert "TINY = True" in _stdout(_cell(nb, "switch")), \
        "JAXGRAD_NOTEBOOK_TINY=1 did not switch the notebook to the tiny run"
    install = _stdout(_cell(nb, "install"))
    assert "install skipped" in install, f"the install cell did not skip the install:\n{install}"
    assert f"run directory: {workdir}" in _stdout(_cell(nb, "config")), \
        "JAXGRAD_NOTEBOOK_WORKDIR was not used as the run directory"


def test_tiny_says_it_is_a_smoke_run_and_downloads_nothing(executed):
    """issue 16, item 9: the tiny run's ranking is noise; the notebook says so where it shows it."""
    nb, _ = executed
    assert "smoke run" in _stdout(_cell(nb, "sel")), _stdout(_cell(nb, "sel"))
    assert "nothing to download" in _stdout(_cell(nb, "data"))


def test_stages_wrote_their_artefacts_to_the_workdir(executed):
    _, workdir = executed
    for path in ["base/model.safetensors", "meta_train/done.json", "gradients/train/manifest.json",
                 "gradients/target/manifest.json", "estimates/estimates.csv",
                 "selection/selection.json", "finetune/selection/sources.json",
                 "fidelity/fidelity.json", "report.md", "scores.png", "fidelity.png"]:
        assert (workdir / path).is_file(), f"the notebook run left no {path} in {workdir}"
    stages = [json.loads(line)["stage"] for line in open(workdir / "timings.jsonl")]
    assert stages == ["base", "meta_train", "gradients", "estimates", "selection", "finetune",
                      "fidelity", "report"], f"stages ran in this order: {stages}"


def test_printed_report_holds_the_selection_table(executed):
    nb, workdir = executed
    printed = _stdout(_cell(nb, "report"))
    on_disk = (workdir / "report.md").read_text()
    # run_pipeline's "[jaxgrad] stage report ..." progress lines come first, then the report.
    assert printed.rstrip().endswith(on_disk.rstrip()), \
        f"the notebook did not print report.md; it printed:\n{printed}"
    assert TABLE_HEADER in printed, f"no selection table in the printed report:\n{printed}"
    selection = json.loads((workdir / "selection" / "selection.json").read_text())
    assert selection["sources"] == ["add", "copy", "noisy_add"], \
        f"not the tiny demo's sources: {selection['sources']}"
    for rank, source in enumerate(selection["ranking"], 1):
        row = re.search(rf"^\| {rank} \| {source} \| \w* \| (-?[\d.]+) \|.*\| (✓?) \|$", printed, re.M)
        assert row, f"no row for rank {rank} ({source}) in the selection table:\n{printed}"
        score = selection["scores"][selection["sources"].index(source)]
        assert float(row.group(1)) == pytest.approx(score, abs=1e-4), \
            f"{source}: the table shows {row.group(1)}, selection.json holds {score}"
        assert (row.group(2) == "✓") == (source in selection["selected"]), \
            f"{source}: the table's selected mark disagrees with selection.json {selection['selected']}"


def test_scores_plot_displayed(executed):
    nb, _ = executed
    images = [o["data"]["image/png"] for o in _cell(nb, "sel").outputs
              if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 1, f"expected the ensemble-scores plot once, got {len(images)} images"
    assert base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n", "the displayed plot is not a PNG"
