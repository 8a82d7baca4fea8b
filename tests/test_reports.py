"""Papermill templates and the command lines: parameters cells, subprocess runs, atomic report directories."""
import json, os, re, subprocess, sys
from pathlib import Path
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = sorted((ROOT / "nbs" / "experiments").glob("*.ipynb"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def test_there_are_templates():
    assert {p.stem for p in TEMPLATES} >= {"00_data", "H1_compositional", "H3_training_time"}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_each_template_has_exactly_one_parameters_cell(template):
    cells = nbformat.read(template, as_version=4).cells
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{template.name} has {len(tagged)} cells tagged 'parameters'"
    source = tagged[0].source
    assert "preset" in source and "output_dir" in source


def test_registered_reports_point_at_templates():
    from so8lab.reports import REPORTS
    for name, path in REPORTS.items():
        assert (ROOT / path).exists(), name
        assert Path(path).stem == name


def run(*args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_main_job_runs_data_report_atomically(tmp_path):
    out = tmp_path / "reports"
    result = run("-m", "so8lab.reports", "--preset", "smoke", "--only", "00_data", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = out / "00_data"
    assert {"00_data.ipynb", "00_data.html", "_static", "results.json", "primitives.png", "heldout_compositions.png"} <= {p.name for p in report.iterdir()}
    page = (report / "00_data.html").read_text(encoding="utf-8")
    assert re.findall(r"<script\b[^>]*\bsrc\s*=\s*[\"']?([^\"' >]+)", page) == ["_static/require.js"]
    assert len(re.findall(r'<img[^>]*src="data:image/png;base64,', page)) == 3   # its three figures are inside the page
    assert (report / "_static" / "require.js").is_file()
    umask = os.umask(0); os.umask(umask)                                    # files and folder get the usual permissions
    for path in (report, report / "results.json", report / "00_data.ipynb", report / "00_data.html"):
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path
    saved = json.loads((report / "results.json").read_text())
    assert saved["report"] == "00_data" and saved["config"]["preset"] == "smoke" and len(saved["git_sha"]) >= 7
    assert (out / "summary.md").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_bad_parameter_names_are_refused_and_leave_nothing(tmp_path):
    out = tmp_path / "reports"
    result = run("-m", "so8lab.reports", "--preset", "smoke", "--only", "00_data", "--out", str(out), "-p", "sead=3")
    assert result.returncode != 0
    assert "parameters ['sead'] are not declared" in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_a_failing_report_leaves_reports_untouched(tmp_path):
    out = tmp_path / "reports"
    result = run("-m", "so8lab.reports", "--preset", "smoke", "--only", "00_data", "--out", str(out), "-p", "seed=\"x\"")
    assert result.returncode != 0
    assert "report 00_data failed; partial output kept in" in result.stderr
    assert not (out / "00_data").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_unknown_preset_is_refused():
    result = run("-m", "so8lab.reports", "--preset", "huge", "--only", "00_data")
    assert result.returncode == 2 and "invalid choice: 'huge'" in result.stderr


def test_cli_rejects_unknown_methods_and_presets(tmp_path):
    result = run("-m", "so8lab.experiments", "run", "--methods", "B9", "--preset", "smoke", "--results-dir", str(tmp_path))
    assert result.returncode == 2 and "unknown method(s) ['B9']" in result.stderr
    result = run("-m", "so8lab.experiments", "run", "--preset", "huge", "--results-dir", str(tmp_path))
    assert result.returncode == 2 and "unknown preset 'huge'" in result.stderr


def test_cli_runs_and_lists_a_smoke_run(tmp_path):
    result = run("-m", "so8lab.experiments", "run", "--methods", "B0", "--seeds", "3", "--preset", "smoke",
                 "--results-dir", str(tmp_path), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "records" / "B0-seed3.json").read_text())
    assert (record["method"], record["seed"], record["preset"]) == ("B0", 3, "smoke")
    assert set(record["metrics"]) == {"val", "heldout", "heldout_any"}
    listing = run("-m", "so8lab.experiments", "list", "--results-dir", str(tmp_path))
    assert listing.returncode == 0 and "B0" in listing.stdout and "seed 3" in listing.stdout
