"""colab/quickstart.ipynb runs top to bottom (through nbclient) on a shortened config."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "colab" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = f"MAX_STEPS = 3\nWORKDIR = {str(tmp_path / 'run')!r}"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "before" in outputs and "after" in outputs and "->" in outputs
    assert (tmp_path / "run" / "hf" / "config.json").is_file()
