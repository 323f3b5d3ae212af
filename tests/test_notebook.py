from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK = Path(__file__).parents[1] / "analyses" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs_headless(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells)  # stored without outputs
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not any(out.output_type == "error" for out in outputs)
    # No progress bars or warnings among the outputs: nothing written to stderr.
    assert [out.text for out in outputs if out.get("name") == "stderr"] == []
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 4  # three figures of a run and the two models compared
    text = "".join(out.get("text", "") for out in outputs)
    assert "suggested BuPO layer" in text or "no layer suggested" in text
    # The table from a loaded model and the entropy by hand agree with the run's table.
    difference = float(text.split("largest difference from the run: ")[1].split()[0])
    assert difference < 1e-4
    by_hand, in_run = text.split("at position ")[1].split(": ")[1].split(" by hand, ")
    assert float(by_hand) == pytest.approx(float(in_run.split()[0]), abs=1e-3)
    runs = tmp_path / "runs" / "quickstart"
    for name in ("ipl-tiny-qwen2", "ipl-tiny-llama"):
        assert (runs / name / "run.json").is_file()
    assert (runs / "compare" / "convergence.csv").is_file()
    pages = [out["data"]["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    assert any('src="runs/quickstart/ipl-tiny-qwen2/report.html"' in page for page in pages)
    assert (runs / "ipl-tiny-qwen2" / "report.html").is_file()
