"""notebooks/quickstart.ipynb runs top to bottom, headless, on a tiny setting."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes(monkeypatch, tmp_path):
    monkeypatch.setenv("AMALGAM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("AMALGAM_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
                   ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "the notebook should show the accuracy chart, the confusion and the common space"
    assert any("student says" in o.get("text", "") and "true class" in o.get("text", "") for o in outputs)
    assert (tmp_path / "reports" / "quickstart" / "summary.json").exists()
    assert (tmp_path / "reports" / "quickstart" / "confusion_test.png").exists()
