"""Tests for so8lab.widgets: the explorers' displayed numbers against references that share no code with them
(attention indexed by hand from a separate forward pass, scipy.linalg.expm of skew matrices filled by an explicit
loop, numpy eigenvalues and determinants), and for so8lab.export: the offline HTML export of notebooks executed by
nbclient, and of the committed reports.
`make_report` is also used by tests/test_browser.py. Hypothesis settings come from conftest.py."""
import itertools
import json
import re
import textwrap
from pathlib import Path

import nbformat
import numpy as np
import plotly
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings, strategies as st
from plotly.callbacks import Points

from so8lab.adapters import SO8Rotation, attach_adapters
from so8lab.models import GridModel, ModelConfig
from so8lab.plots import PALETTE
from so8lab.primitives import GRID_SIZE
from so8lab.tasks import sample_tasks
from so8lab.training import save_checkpoint
from so8lab.export import ASSETS_DIRECTORY, export_html, export_report, javascript_assets
from so8lab.widgets import AttentionExplorer, RotationExplorer, grid_colorscale

ROOT = Path(__file__).resolve().parent.parent
PAIRS = list(itertools.combinations(range(8), 2))
PLOTLY_JS = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text(encoding="utf-8")


# ---------------------------------------------------------------- AttentionExplorer

def reference_attention(model, tasks, sample, layer, head, row, column):
    "The selected cell's attention over the grid cells (8×8) and over the context tokens, indexed by hand."
    c = model.config
    with torch.no_grad(): out = model.eval().forward_batch(tasks, return_attention=True)
    side = GRID_SIZE // c.patch_size
    context = out.attentions[0].shape[-1] - side * side                    # tokens before the cells (concat only)
    query = context + (row // c.patch_size) * side + column // c.patch_size
    heads = range(c.heads) if head is None else [head]
    weights = sum(out.attentions[layer][sample, h, query].double() for h in heads) / len(heads)
    grid = np.zeros((GRID_SIZE, GRID_SIZE))
    for r in range(GRID_SIZE):
        for k in range(GRID_SIZE):
            grid[r, k] = weights[context + (r // c.patch_size) * side + k // c.patch_size]
    if out.cross_attentions is not None:
        program = sum(out.cross_attentions[layer][sample, h, query - context].double() for h in heads) / len(heads)
    else: program = weights[:context]
    return grid, program.numpy()


configs = st.fixed_dictionaries(dict(conditioning=st.sampled_from(["program", "demo", "none"]),
                                     fusion=st.sampled_from(["concat", "cross_attention"]),
                                     patch_size=st.sampled_from([1, 2]), layers=st.integers(2, 3),
                                     heads=st.sampled_from([1, 2])))


@settings(max_examples=25)
@given(config=configs, seed=st.integers(0, 1000), data=st.data())
def test_attention_heatmap_and_program_bar_match_a_hand_indexed_forward_pass(config, seed, data):
    torch.manual_seed(seed)
    model = GridModel(ModelConfig(d_model=16, bottleneck_dim=16, sae_width=8, **config))
    tasks = sample_tasks(3, "train", seed=seed, with_demo=config["conditioning"] == "demo")
    explorer = AttentionExplorer(model, tasks)
    sample, layer = data.draw(st.integers(0, 2)), data.draw(st.integers(0, config["layers"] - 1))
    head = data.draw(st.one_of(st.none(), st.integers(0, config["heads"] - 1)))
    row, column = data.draw(st.integers(0, 7)), data.draw(st.integers(0, 7))
    explorer.select_sample(sample); explorer.select_layer(layer); explorer.select_head(head); explorer.select_cell(row, column)
    grid, program = reference_attention(model, tasks, sample, layer, head, row, column)
    traces = {t.name: t for t in explorer.figure.data}
    np.testing.assert_allclose(np.array(traces["attention"].z), grid, atol=1e-6)
    np.testing.assert_array_equal(np.array(traces["input"].z), tasks.inputs[sample].numpy())
    np.testing.assert_array_equal(np.array(traces["target"].z), tasks.outputs[sample].numpy())
    assert list(traces["selected"].x) == [column] and list(traces["selected"].y) == [row]
    if config["conditioning"] == "program":
        np.testing.assert_allclose(traces["program"].y, program, atol=1e-6)
    else: assert "program" not in traces and explorer.program_attention() is None


def test_prediction_grid_is_the_argmax_of_the_logits():
    torch.manual_seed(0)
    model = GridModel(ModelConfig(d_model=16, bottleneck_dim=16, sae_width=8, heads=2))
    tasks = sample_tasks(4, "train", seed=1)
    explorer = AttentionExplorer(model, tasks)
    explorer.select_sample(3)
    with torch.no_grad(): logits = model.eval().forward_batch(tasks).logits[3]
    expected = [[max(range(logits.shape[0]), key=lambda k: float(logits[k, r, c])) for c in range(8)] for r in range(8)]
    shown = {t.name: t for t in explorer.figure.data}["prediction"].z
    assert [list(row) for row in shown] == expected


def test_click_callbacks_move_the_selection_and_saved_state_follows():
    torch.manual_seed(0)
    explorer = AttentionExplorer(GridModel(ModelConfig(d_model=16, bottleneck_dim=16, sae_width=8, heads=2)), sample_tasks(2, "train"))
    traces = {t.name: t for t in explorer.figure.data}
    for name in ("attention", "input", "target", "prediction"):
        traces[name]._dispatch_on_click(Points(point_inds=[[2, 7]], xs=[7], ys=[2]), None)
        assert explorer.cell == (2, 7)
        explorer.select_cell(0, 0)
    traces["attention"]._dispatch_on_click(Points(), None)   # the empty share of a click on another trace
    assert explorer.cell == (0, 0)
    explorer.select_cell(4, 1)
    # what a saved notebook or an HTML export shows is the synced widget state, not only the live figure
    np.testing.assert_allclose(explorer.figure._widget_data[0]["z"], np.array(traces["attention"].z))
    assert explorer.status.value.count("cell (row 4, column 1)") == 1


def test_attention_explorer_rejects_bad_arguments():
    model = GridModel(ModelConfig(d_model=16, bottleneck_dim=16, sae_width=8, heads=2))
    tasks = sample_tasks(2, "train")
    with pytest.raises(TypeError, match="model must be a GridModel"): AttentionExplorer(torch.nn.Linear(2, 2), tasks)
    with pytest.raises(TypeError, match="batch must be a TaskBatch"): AttentionExplorer(model, tasks.inputs)
    with pytest.raises(ValueError, match="max_samples must be a positive integer"): AttentionExplorer(model, tasks, max_samples=0)
    explorer = AttentionExplorer(model, tasks, max_samples=1)
    with pytest.raises(ValueError, match="sample must be an integer in 0..0"): explorer.select_sample(1)
    with pytest.raises(ValueError, match="layer must be an integer"): explorer.select_layer(-1)
    with pytest.raises(ValueError, match="column must be an integer in 0..7"): explorer.select_cell(0, 8)


def test_grid_colorscale_bands():
    for n in range(1, 11):
        scale = grid_colorscale(n)
        for i in range(n):   # value i maps to (i + 0.5)/n; anywhere strictly inside band i, plotly interpolates between equal colours
            for fraction in ((i + 0.01) / n, (i + 0.5) / n, (i + 0.99) / n):
                segment = [(c0, c1) for (p0, c0), (p1, c1) in zip(scale, scale[1:]) if p0 < p1 and p0 <= fraction <= p1]
                assert segment == [(PALETTE[i], PALETTE[i])], (n, i, fraction, segment)
    with pytest.raises(ValueError, match="num_colors"): grid_colorscale(0)


# ---------------------------------------------------------------- RotationExplorer

def reference_rotation(vector):
    "float64 expm of the skew matrix whose upper triangle (row-major pairs) is `vector`, filled by a loop."
    A = np.zeros((8, 8))
    for k, (i, j) in enumerate(PAIRS): A[i, j], A[j, i] = vector[k], -vector[k]
    return scipy.linalg.expm(A)


@settings(max_examples=30)
@given(blocks=st.integers(1, 3), checkpoints=st.integers(1, 3), scale=st.floats(0.0, 1.0), seed=st.integers(0, 10_000), data=st.data())
def test_rotation_panels_match_scipy_and_numpy(blocks, checkpoints, scale, seed, data):
    generator = torch.Generator().manual_seed(seed)
    states = [{"coordinates": torch.randn(blocks, 28, generator=generator) * scale,
               "gate": torch.rand(blocks, generator=generator)} for _ in range(checkpoints)]
    explorer = RotationExplorer(states)
    checkpoint, block = data.draw(st.integers(0, checkpoints - 1)), data.draw(st.integers(0, blocks - 1))
    explorer.select_checkpoint(checkpoint); explorer.select_block(block)
    traces = {t.name: t for t in explorer.figure.data}
    R = reference_rotation(states[checkpoint]["coordinates"][block].double().numpy())
    np.testing.assert_allclose(np.array(traces["rotation"].z), R, atol=2e-6)
    points = np.array(traces["eigenvalues"].x) + 1j * np.array(traces["eigenvalues"].y)
    eigenvalues = np.linalg.eigvals(R)
    np.testing.assert_allclose(np.sort(np.angle(points)), np.sort(np.angle(eigenvalues)), atol=2e-5)
    np.testing.assert_allclose(np.abs(points), 1.0, atol=1e-12)
    assert abs(explorer.determinant() - np.linalg.det(R)) < 1e-5
    shown = np.array(traces["rotation"].z, dtype=np.float32).astype(np.float64)   # the error printed is that of the matrix drawn
    assert abs(explorer.orthogonality() - np.abs(shown.T @ shown - np.eye(8)).max()) < 2e-7
    assert explorer.orthogonality() < 1e-5
    np.testing.assert_allclose(traces["gate"].y, states[checkpoint]["gate"].numpy(), atol=1e-7)
    largest = [np.abs(np.angle(np.linalg.eigvals(reference_rotation(s["coordinates"][block].double().numpy())))).max() for s in states]
    np.testing.assert_allclose(traces["θ1"].y, largest, atol=2e-5)
    assert f"block {block} of {blocks}" in explorer.status.value


def test_checkpoint_paths_from_a_whole_model_and_prefix(tmp_path):
    torch.manual_seed(0)
    model = attach_adapters(GridModel(ModelConfig(d_model=16, bottleneck_dim=16, sae_width=8, heads=2)), "so8")
    paths = []
    for step in range(3):
        with torch.no_grad(): model.bottleneck_out.adapter.coordinates.add_(0.1)
        paths.append(save_checkpoint({"model": model.state_dict(), "step": step}, tmp_path / f"step{step}.pt"))
    with pytest.raises(ValueError, match="pass prefix="): RotationExplorer(paths)
    explorer = RotationExplorer(paths, labels=[f"step {s}" for s in range(3)], prefix="bottleneck_out.adapter.")
    assert explorer.checkpoint == 2 and explorer.blocks == 2 and explorer.labels == ["step 0", "step 1", "step 2"]
    np.testing.assert_allclose(np.array(explorer.figure.data[0].z), reference_rotation(np.full(28, 0.3)), atol=2e-6)
    explorer.select_checkpoint(0)
    np.testing.assert_allclose(np.array(explorer.figure.data[0].z), reference_rotation(np.full(28, 0.1)), atol=2e-6)
    # the slider a person drags and a click on the angle curves both select checkpoints; a gate bar selects a block
    explorer.controls["checkpoint"].value = 1
    assert explorer.checkpoint == 1
    traces = {t.name: t for t in explorer.figure.data}
    traces["θ3"]._dispatch_on_click(Points(point_inds=[2], xs=[2], ys=[0.1]), None)
    traces["gate"]._dispatch_on_click(Points(point_inds=[1], xs=[1], ys=[1.0]), None)
    assert (explorer.checkpoint, explorer.block) == (2, 1)
    assert explorer.controls["checkpoint"].value == 2 and explorer.controls["block"].value == 1


def test_rotation_explorer_accepts_an_adapter_and_rejects_bad_sources(tmp_path):
    adapter = SO8Rotation(24, gate_init=0.5)
    explorer = RotationExplorer(adapter)
    assert explorer.blocks == 3 and explorer.gate() == 0.5 and explorer.labels == ["checkpoint 0"]
    np.testing.assert_allclose(np.array(explorer.figure.data[0].z), np.eye(8), atol=1e-7)
    with pytest.raises(ValueError, match="at least one checkpoint"): RotationExplorer([])
    with pytest.raises(TypeError, match=r"source\[1\] must be an SO8Rotation"): RotationExplorer([adapter, 3])
    with pytest.raises(ValueError, match="checkpoints must come from one adapter"): RotationExplorer([adapter, SO8Rotation(16)])
    with pytest.raises(FileNotFoundError): RotationExplorer(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="checkpoint must be an integer in 0..0"): explorer.select_checkpoint(1)


# ---------------------------------------------------------------- offline HTML export

REPORT_CELLS = [
    "# A report with widgets\nA plotly figure, then both explorers on a small untrained model.",
    """\
    import torch, plotly.graph_objects as go
    from so8lab.models import GridModel, ModelConfig
    from so8lab.adapters import SO8Rotation
    from so8lab.tasks import sample_tasks
    from so8lab.widgets import AttentionExplorer, RotationExplorer
    torch.manual_seed(0)
    go.Figure(go.Scatter(x=[0, 1, 2], y=[3, 1, 2], name="curve"))""",
    """\
    model = GridModel(ModelConfig(d_model=16, bottleneck_dim=16, sae_width=8, heads=2))
    AttentionExplorer(model, sample_tasks(4, "val", seed=0))""",
    """\
    checkpoints = []
    for step in range(3):
        adapter = SO8Rotation(32)
        with torch.no_grad(): adapter.coordinates.normal_(0, 0.2 * step)
        checkpoints.append(adapter.state_dict())
    RotationExplorer(checkpoints, labels=["step 0", "step 10", "step 20"])""",
]


def make_report(directory:Path)->Path:
    "Write, execute (nbclient, widget state saved) and export a small report with a plotly figure and both explorers."
    from nbclient import NotebookClient
    directory.mkdir(parents=True, exist_ok=True)
    notebook = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}})
    notebook.cells = [nbformat.v4.new_markdown_cell(REPORT_CELLS[0])] + [nbformat.v4.new_code_cell(textwrap.dedent(c)) for c in REPORT_CELLS[1:]]
    NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(directory)}}).execute()
    nbformat.write(notebook, directory / "report.ipynb")
    return export_html(directory / "report.ipynb", directory / "html" / "report.html")


def script_sources(text:str)->list:
    return re.findall(r"<script\b[^>]*\bsrc\s*=\s*[\"']?([^\"' >]+)", text, flags=re.I)


def test_export_of_an_executed_notebook_renders_offline(tmp_path):
    report = make_report(tmp_path)
    text = report.read_text(encoding="utf-8")
    assert script_sources(text) == [f"{ASSETS_DIRECTORY}/require.js"]
    assert not [s for s in script_sources(text) if re.match(r"(https?:)?//", s)]
    assert text.count(PLOTLY_JS) == 1
    # the page minus the two vendored bundles (plotly.js, and the figure widget's module that embeds it) names no CDN
    rest = re.sub(r'<script[^>]*\bid="so8lab-module-\d+"[^>]*>.*?</script>', "", text.replace(PLOTLY_JS, ""), flags=re.S)
    for host in ("cdnjs.cloudflare.com", "cdn.jsdelivr.net", "unpkg.com", "cdn.plot.ly", "latest.js?config"):
        assert host not in rest, host
    assert f"'{ASSETS_DIRECTORY}/embed-amd.js'" in rest
    assert '"anywidget": "_static/anywidget"' in rest
    for name, source in javascript_assets().items():
        assert (report.parent / ASSETS_DIRECTORY / name).read_bytes() == source.read_bytes()
    # the widget state is in the page, and the two FigureWidgets share one copy of their module
    state = json.loads(re.search(r'<script type="application/vnd.jupyter.widget-state\+json">(.*?)</script>', text, re.S).group(1))
    models = state["state"]
    anywidgets = [m for m in models.values() if m["model_module"] == "anywidget"]
    assert len(anywidgets) == 2   # one FigureWidget per explorer
    assert all("so8lab-module-0" in m["state"]["_esm"] and len(m["state"]["_esm"]) < 1000 for m in anywidgets)
    assert text.count('id="so8lab-module-0"') == 1 and 'id="so8lab-module-1"' not in text
    views = re.findall(r'<script type="application/vnd.jupyter.widget-view\+json">(.*?)</script>', text, re.S)
    assert len(views) == 2 and all(json.loads(v)["model_id"] in models for v in views)
    # the saved figure state is the drawn one: the attention heatmap of the default selection, not zeros
    attention = next(m for m in anywidgets if any(t.get("name") == "attention" for t in m["state"]["_widget_data"]))
    z = np.array(next(t for t in attention["state"]["_widget_data"] if t["name"] == "attention")["z"])
    assert z.shape == (8, 8) and z.sum() > 0


def test_export_of_the_committed_reports(tmp_path):
    reports = sorted((ROOT / "reports").glob("*/*.ipynb"))
    assert reports
    for notebook in reports:
        html = export_html(notebook, tmp_path / f"{notebook.stem}.html")
        assert script_sources(html.read_text(encoding="utf-8")) == [f"{ASSETS_DIRECTORY}/require.js"]
    assert not list(tmp_path.glob("*.tmp"))


def test_export_errors_name_the_argument(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="notebook_path"): export_html(tmp_path / "none.ipynb", tmp_path / "x.html")
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "empty.ipynb")
    with pytest.raises(ValueError, match="html_path must end in .html"): export_html(tmp_path / "empty.ipynb", tmp_path / "x.htm")
    monkeypatch.setenv("SO8LAB_JS", str(tmp_path / "no-node-modules"))
    with pytest.raises(FileNotFoundError, match="make install"): export_html(tmp_path / "empty.ipynb", tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


@pytest.mark.parametrize("report, explorer", [("H1_compositional", "so8lab-attention-explorer"),
                                              ("H2_few_shot", "so8lab-rotation-explorer")])
def test_export_report_writes_a_committed_report(tmp_path, report, explorer):
    notebook = ROOT / "reports" / report / f"{report}.ipynb"
    saved = notebook.read_bytes()
    assert b"// so8lab: plotly" in saved                                   # the kept report is slimmed
    written = export_report(notebook, tmp_path / f"{report}.html")
    assert written == tmp_path / f"{report}.html"
    page = written.read_text(encoding="utf-8")
    assert script_sources(page) == [f"{ASSETS_DIRECTORY}/require.js"]
    assert page.count('id="so8lab-module-0"') == 1 and explorer in page   # the explorer's module, restored once
    assert "// so8lab: plotly" not in page
    for name, source in javascript_assets().items():
        assert (tmp_path / ASSETS_DIRECTORY / name).read_bytes() == source.read_bytes()
    assert notebook.read_bytes() == saved                                  # and stays slimmed
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_export_report_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="notebook_path"): export_report(tmp_path / "none.ipynb", tmp_path / "none.html")
    (tmp_path / "notes.ipynb").write_text("not a notebook", encoding="utf-8")
    with pytest.raises(ValueError, match="notebook_path .* is not a Jupyter notebook"): export_report(tmp_path / "notes.ipynb", tmp_path / "notes.html")
    (tmp_path / "list.ipynb").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="notebook_path .* is not a Jupyter notebook"): export_report(tmp_path / "list.ipynb", tmp_path / "list.html")
    (tmp_path / "notes.txt").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="notebook_path must be a .ipynb file"): export_report(tmp_path / "notes.txt", tmp_path / "notes.html")
    with pytest.raises(ValueError, match="html_path must end in .html"): export_report(ROOT / "reports" / "H1_compositional" / "H1_compositional.ipynb", tmp_path / "x.htm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.ipynb", "notes.ipynb", "notes.txt"]   # no page, no _static/
