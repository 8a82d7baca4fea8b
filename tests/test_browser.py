"""The widgets in a real browser: Debian's headless Chromium driven by Playwright (no browser download).
(a) an exported report opened from file:// with every http(s) request blocked: the plotly figure and both explorers
render, and the console reports no missing script; (b) JupyterLab on 127.0.0.1 (no token) runs nbs/16_widgets.ipynb
(a copy, so the repository's notebook is never saved over), both explorers render and answer a click through the
kernel; (c) the main job's H1 and H2 reports (smoke preset) exported to HTML, each showing its explorer offline.
Every process started here is stopped by its id at the end. Screenshots go to the test's tmp dir, and also
to $SO8LAB_SCREENSHOTS when it is set (CI keeps them as an artifact; docs/images/{attention,rotation}_explorer.png
come from test (b), docs/images/report_*.png from the cpu-preset reports opened the same way)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from playwright.sync_api import sync_playwright

from test_widgets import make_report

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextmanager
def browser_page(profile:Path):
    "A Chromium page (fresh profile) that records console errors, page errors, failed and off-machine requests."
    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: `make install` installs Debian's chromium (apt-get install -y chromium)"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), headless=True,
                                                                args=CHROMIUM_FLAGS, viewport={"width": 1600, "height": 1000})
        problems = []
        context.route(lambda url: not url.startswith(("http://127.0.0.1", "ws://127.0.0.1")) and url.startswith(("http", "ws")),
                      lambda route: (problems.append(f"network request: {route.request.url}"), route.abort()))
        try:
            page = context.new_page()
            page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}") if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url} {request.failure}"))
            yield page, problems
        finally: context.close()


def keep_screenshot(path:Path):
    "Copy a screenshot to $SO8LAB_SCREENSHOTS when set."
    if os.environ.get("SO8LAB_SCREENSHOTS"):
        target = Path(os.environ["SO8LAB_SCREENSHOTS"]); target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.name)


def test_exported_report_renders_offline(tmp_path):
    html = make_report(tmp_path / "report")
    with browser_page(tmp_path / "profile") as (page, problems):
        page.goto(html.resolve().as_uri())
        attention = page.locator(".so8lab-attention-explorer")
        rotation = page.locator(".so8lab-rotation-explorer")
        attention.locator(".js-plotly-plot .hm").first.wait_for(timeout=60_000)
        rotation.locator(".js-plotly-plot .hm").first.wait_for(timeout=60_000)
        page.wait_for_timeout(500)
        # the plain plotly figure (drawn by the inlined plotly.js), outside any widget
        assert page.locator(".jp-OutputArea-output > div > .js-plotly-plot .scatterlayer .trace").count() == 1
        assert attention.locator(".js-plotly-plot .hm").count() == 4          # attention, input, target, prediction
        assert attention.locator(".js-plotly-plot .barlayer .trace").count() == 1
        assert rotation.locator(".js-plotly-plot .hm").count() == 1 and rotation.locator(".js-plotly-plot .scatterlayer .trace").count() >= 6
        assert attention.locator(".widget-slider").count() == 1 and attention.locator(".widget-dropdown").count() == 2
        assert "sample 0" in attention.inner_text() and "block 0 of 4" in rotation.inner_text()
        attention.screenshot(path=tmp_path / "export_attention_explorer.png")
        page.screenshot(path=tmp_path / "export_page.png", full_page=True)
        assert problems == []
    for name in ("export_attention_explorer.png", "export_page.png"): keep_screenshot(tmp_path / name)


def free_port()->int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@contextmanager
def jupyter_lab(root:Path, home:Path, started:list):
    """JupyterLab on 127.0.0.1 without token or password, its state in `home`; yields the base URL and a function that records
    the server's child processes (kernels) in `started`; stops them all, by id, on exit."""
    port, config = free_port(), home / "config"
    (config / "labconfig").mkdir(parents=True)
    # no announcement/news toast over the notebook
    (config / "labconfig" / "page_config.json").write_text(json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    # every cell stays in the DOM (JupyterLab 4 leaves cells outside the viewport unrendered by default)
    tracker = home / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True); tracker.write_text(json.dumps({"windowingMode": "none"}))
    environment = {**os.environ, "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_DATA_DIR": str(home / "data"),
                   "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
                   "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "IPYTHONDIR": str(home / "ipython"),
                   "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
               "--IdentityProvider.token=", f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.expose_app_in_browser=True"] + (["--allow-root"] if os.geteuid() == 0 else [])
    log = open(home / "lab.log", "w")
    server = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url, descendants = f"http://127.0.0.1:{port}", started
    started.append(psutil.Process(server.pid))
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"JupyterLab exited: {(home / 'lab.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=2) as response:
                    if response.status == 200: break
            except OSError: pass
            assert time.monotonic() < deadline, f"JupyterLab did not start: {(home / 'lab.log').read_text()[-3000:]}"
            time.sleep(0.5)
        yield url, lambda: descendants.extend(psutil.Process(server.pid).children(recursive=True))
    finally:
        descendants.extend(psutil.Process(server.pid).children(recursive=True) if server.poll() is None else [])
        server.terminate()
        try: server.wait(timeout=30)
        except subprocess.TimeoutExpired: server.kill(); server.wait(timeout=10)
        _, alive = psutil.wait_procs(descendants, timeout=15)
        for process in alive: process.kill()       # kernels the server did not stop, by their own ids
        log.close()


def plot_point(page, plot, axis:str, x:float, y:float)->tuple:
    "Page coordinates of data point (x, y) on subplot axes `axis` ('' or '2', ...) of a plotly graph div."
    return page.evaluate("""([plot, axis, x, y]) => {
        const layout = plot._fullLayout, xa = layout['xaxis' + axis], ya = layout['yaxis' + axis];
        const box = plot.getBoundingClientRect();
        return [box.left + xa._offset + xa.l2p(x), box.top + ya._offset + ya.l2p(y)];
    }""", [plot, axis, x, y])


def test_jupyterlab_runs_the_widgets_notebook_and_explorers_answer_clicks(tmp_path):
    root = tmp_path / "lab"; root.mkdir()
    shutil.copyfile(ROOT / "nbs" / "16_widgets.ipynb", root / "16_widgets.ipynb")
    started = []
    with jupyter_lab(root, tmp_path / "jupyter", started) as (url, note_processes), browser_page(tmp_path / "profile") as (page, problems):
        page.goto(f"{url}/lab/tree/16_widgets.ipynb")
        page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=90_000)
        # JupyterLab's own command, once the notebook's kernel session is ready (the app is exposed by the server flag)
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && window.jupyterapp.shell.currentWidget.sessionContext", timeout=90_000)
        page.evaluate("""async () => {
            const panel = window.jupyterapp.shell.currentWidget;
            await panel.context.ready; await panel.sessionContext.ready;
            window.jupyterapp.commands.execute('notebook:run-all-cells');
        }""")
        finished = """() => {
            const panel = window.jupyterapp.shell.currentWidget, kernel = panel.sessionContext.session?.kernel;
            const cells = panel.content.widgets.filter(cell => cell.model.type === 'code');
            return kernel?.status === 'idle' && cells.every(cell => cell.model.executionCount !== null && cell.promptNode.innerText.trim() !== '[*]:');
        }"""
        page.wait_for_function(finished, timeout=240_000, polling=500)
        note_processes()
        attention, rotation = page.locator(".so8lab-attention-explorer").first, page.locator(".so8lab-rotation-explorer").first
        attention.locator(".js-plotly-plot .hm").first.wait_for(timeout=90_000)
        rotation.locator(".js-plotly-plot .hm").first.wait_for(timeout=90_000)
        assert page.locator(".jp-OutputArea-output", has_text="Traceback").count() == 0

        # AttentionExplorer: click cell (row 5, column 6) of the input grid (2nd subplot); the kernel answers with a redraw
        attention.scroll_into_view_if_needed()
        plot = attention.locator(".js-plotly-plot").element_handle()
        page.mouse.click(*plot_point(page, plot, "2", 6, 5))
        page.wait_for_function("element => element.innerText.includes('cell (row 5, column 6)')", arg=attention.element_handle(), timeout=30_000)
        attention.screenshot(path=tmp_path / "attention_explorer.png")

        # RotationExplorer: click the gate bar of block 2 (3rd subplot)
        rotation.scroll_into_view_if_needed()
        plot = rotation.locator(".js-plotly-plot").element_handle()
        height = page.evaluate("plot => plot._fullData.find(t => t.name === 'gate').y[2]", plot)
        page.mouse.click(*plot_point(page, plot, "3", 2, height / 2))
        page.wait_for_function("element => element.innerText.includes('block 2 of 4')", arg=rotation.element_handle(), timeout=30_000)
        rotation.screenshot(path=tmp_path / "rotation_explorer.png")
        assert problems == []
    assert len(started) >= 2   # the server and at least the notebook's kernel
    assert [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    for name in ("attention_explorer.png", "rotation_explorer.png"): keep_screenshot(tmp_path / name)


@pytest.fixture(scope="module")
def smoke_reports(tmp_path_factory)->Path:
    "The main job's H1 and H2 reports on the smoke preset (papermill, offline HTML export, slimmed notebooks)."
    out = tmp_path_factory.mktemp("main-job") / "reports"
    result = subprocess.run([sys.executable, "-m", "so8lab.reports", "report", "--preset", "smoke", "--only", "H1_compositional", "H2_few_shot",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("report, explorer, heatmaps, status", [
    ("H1_compositional", ".so8lab-attention-explorer", 4, "sample 0"),
    ("H2_few_shot", ".so8lab-rotation-explorer", 1, "max|RᵀR − I|")])
def test_main_job_reports_show_their_explorer_offline(smoke_reports, tmp_path, report, explorer, heatmaps, status):
    directory = smoke_reports / report
    assert (directory / f"{report}.ipynb").stat().st_size < 1_000_000        # the kept notebook is slimmed
    with browser_page(tmp_path / "profile") as (page, problems):
        page.goto((directory / f"{report}.html").resolve().as_uri())
        widget = page.locator(explorer)
        widget.locator(".js-plotly-plot .hm").first.wait_for(timeout=60_000)
        page.wait_for_timeout(500)
        assert widget.count() == 1
        assert widget.locator(".js-plotly-plot .hm").count() == heatmaps
        assert status in widget.inner_text()
        assert page.locator("img[src^='data:image/png']").count() >= 1          # the report's matplotlib figures
        widget.screenshot(path=tmp_path / f"smoke_report_{report}.png")
        assert problems == []
    keep_screenshot(tmp_path / f"smoke_report_{report}.png")
