"""Analysis helpers and the notebooks, on a tiny run made here (CI executes every notebook)."""

import io
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from lightning_ipa import analysis
from lightning_ipa.cli import main
from test_cli import ROOT, scalars, tiny_args

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tmp_path_factory) -> Path:
    """A tiny quickstart run: fit (2 rollouts, a validation), then predict and test into later versions."""
    save_dir = tmp_path_factory.mktemp("runs")
    main(["fit", *tiny_args(tiny_llama, save_dir)])
    run = save_dir / "quickstart" / "version_0"
    main(["predict", *tiny_args(tiny_llama, save_dir), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    main(["test", *tiny_args(tiny_llama, save_dir), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    return run


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def test_helpers_load_the_runs_scalars_samples_and_files(tiny_run):
    loaded = analysis.load_scalars([tiny_run])
    logged = scalars(tiny_run)
    for tag in ("train/reward", "val/coverage/tailored", "val/coverage/base"):
        assert loaded[loaded.tag == tag].sort_values("step").value.tolist() == pytest.approx(logged[tag])
    final = analysis.final_values(loaded)
    assert final.loc["quickstart/version_0", "val/coverage/base"] == pytest.approx(logged["val/coverage/base"][-1])
    samples = analysis.load_samples(tiny_run)
    assert {"prompt", "tailored", "base", "reward_tailored", "reward_base", "step"} <= set(samples.columns)
    assert len(samples) == 4 and samples.reward_tailored.dtype.kind == "f"  # the first validation batch of 4 prompts
    predictions = analysis.load_jsonl(tiny_run.parent / "version_1" / "predictions.jsonl")
    assert len(predictions) == 6 and {"reward_base", "reward_tailored"} <= set(predictions.columns)
    results = analysis.load_results([tiny_run.parent / "version_2"])
    assert set(results.loc[("quickstart/version_2", "coverage")].keys()) == {"base", "tailored"}


def test_plots_render_to_png_without_a_display(tiny_run):
    loaded = analysis.load_scalars([tiny_run])
    assert analysis.run_names([tiny_run, tiny_run.parent / "version_1"]) == {tiny_run: "version_0", tiny_run.parent / "version_1": "version_1"}
    curves = analysis.plot_curves(loaded, ["coverage", "reward"], train=["train/kl"])
    assert png(curves).startswith(b"\x89PNG") and len(curves.axes) == 3
    assert len(curves.axes[0].lines) == 2  # the run's curve and the base's dashed level
    histogram = analysis.plot_reward_histogram(analysis.load_jsonl(tiny_run.parent / "version_1" / "predictions.jsonl"))
    assert png(histogram).startswith(b"\x89PNG")


def execute(notebook: Path, parameters: str, cwd: Path) -> nbformat.NotebookNode:
    """Run a notebook with its ``parameters`` cell replaced; a failing cell raises."""
    nb = nbformat.read(notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = parameters
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def test_every_notebook_is_executed_here():
    assert {"compare_runs.ipynb", "generate.ipynb"} == {notebook.name for notebook in NOTEBOOKS}  # a new one needs its test below


def test_compare_runs_notebook(tiny_run, tmp_path):
    saved = tmp_path / "curves.png"
    execute(ROOT / "notebooks" / "compare_runs.ipynb",
            f'RUNS = ["{tiny_run}"]\nMETRICS = ["coverage", "reward"]\nTRAIN = ["train/reward"]\nSAVE = "{saved}"', ROOT)
    assert saved.read_bytes().startswith(b"\x89PNG")


def test_generate_notebook_sweeps_alpha(tiny_run, tiny_llama):
    overrides = json.dumps(tiny_args(tiny_llama, tiny_run.parent.parent))
    nb = execute(ROOT / "notebooks" / "generate.ipynb",
                 f'CONFIG = "conf/quickstart.yaml"\nOVERRIDES = {overrides}\nCHECKPOINT = "{tiny_run / "checkpoints" / "last.ckpt"}"\n'
                 'PROMPTS = ["Write one sentence that uses all of these words: dog, river, jump."]\nALPHAS = [0.0, 1.0]\nSEED = 0', ROOT)
    table = nb.cells[-1].outputs[-1]["data"]["text/plain"]
    assert "0.0" in table and "1.0" in table


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(notebook):
    nb = nbformat.read(notebook, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
