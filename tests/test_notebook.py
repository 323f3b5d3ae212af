from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).parents[1] / "analyses" / "quickstart.ipynb"


def test_quickstart_notebook_runs_headless(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 4  # the four figures are shown inline
    text = "".join(out.get("text", "") for out in outputs)
    assert "suggested BuPO layer" in text or "no layer suggested" in text
    assert not any(out.output_type == "error" for out in outputs)
