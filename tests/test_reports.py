"""Papermill templates and the so8lab command line: parameters cells, subprocess runs, atomic report directories,
one-line errors for bad arguments."""
import json, os, re, subprocess, sys, tempfile
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


def so8lab(*args, cwd=ROOT, timeout=600):
    "Run the so8lab command line (`python -m so8lab.reports` is the installed `so8lab` script)."
    return subprocess.run([sys.executable, "-m", "so8lab.reports", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_main_job_runs_data_report_atomically(tmp_path):
    out = tmp_path / "reports"
    result = so8lab("report", "--preset", "smoke", "--only", "00_data", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "00_data: rendering" in result.stdout and re.search(r"00_data: .*00_data \(\d+ s\)", result.stdout)
    report = out / "00_data"
    assert {"00_data.ipynb", "00_data.html", "_static", "results.json", "render.json", "primitives.png",
            "heldout_compositions.png"} <= {p.name for p in report.iterdir()}
    page = (report / "00_data.html").read_text(encoding="utf-8")
    assert re.findall(r"<script\b[^>]*\bsrc\s*=\s*[\"']?([^\"' >]+)", page) == ["_static/require.js"]
    assert len(re.findall(r'<img[^>]*src="data:image/png;base64,', page)) == 3   # its three figures are inside the page
    assert (report / "_static" / "require.js").is_file()
    umask = os.umask(0); os.umask(umask)                                    # files and folder get the usual permissions
    for path in (report, report / "results.json", report / "00_data.ipynb", report / "00_data.html"):
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path
    saved = json.loads((report / "results.json").read_text())
    assert saved["report"] == "00_data" and saved["config"]["preset"] == "smoke" and saved["git_sha"] != "unknown"
    summary = (out / "summary.md").read_text()
    assert f"| {saved['git_sha']} |" in summary                              # the full identity, '-dirty' included
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary directories left behind"
    # another preset into the same folder is refused (the summary would mix them), then allowed with --replace
    clash = so8lab("report", "--preset", "cpu", "--only", "00_data", "--out", str(out), "--no-html")
    assert clash.returncode == 2 and "holds reports of another preset: 00_data (smoke)" in clash.stderr
    assert json.loads((report / "render.json").read_text())["preset"] == "smoke"


def test_a_failing_report_leaves_reports_untouched_and_nothing_in_tmp(tmp_path):
    out = tmp_path / "reports"
    before = {p.name for p in Path(tempfile.gettempdir()).glob("so8lab-failed-*")}
    result = so8lab("report", "--preset", "smoke", "--only", "00_data", "--out", str(out), "-p", "seed=\"x\"")
    assert result.returncode != 0
    assert f"report 00_data failed; partial output kept in {out.resolve() / '.failed' / '00_data'}" in result.stderr
    assert not (out / "00_data").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".failed"]
    assert {p.name for p in Path(tempfile.gettempdir()).glob("so8lab-failed-*")} == before


BAD = [(["run", "--seeds", "-1"], "argument --seeds"),
       (["run", "--device", "tpu"], "argument --device: device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
       (["run", "--workers", "0"], "argument --workers: must be a positive integer, got '0'"),
       (["run", "--methods", "B9"], "argument --methods: unknown method(s) ['B9']"),
       (["run", "--preset", "huge"], "argument --preset: unknown preset 'huge'"),
       (["run", "--executor", "nowhere"], "argument --executor: executor must be"),
       (["fewshot", "--base-methods", "nope"], "argument --base-methods: unknown method(s) ['nope']"),
       (["report", "-p", "bogus=1"], "argument -p: ['bogus'] are not parameters of the chosen reports"),
       (["report", "-p", "preset=nope"], "argument -p: ['preset'] are set by --preset and --out"),
       (["report", "--only", "H9"], "argument --only: unknown report(s) ['H9']"),
       (["report", "--only", "00_data", "-p", "sead=3"], "argument -p: ['sead'] are not parameters"),
       (["list", "--results-dir", "no/such/folder"], "argument --results-dir: no/such/folder does not exist"),
       (["pilot", "--preset", "smoke"], "argument --preset: smoke is not a pilot (it has no sweep); pass --rates"),
       (["pilot", "--preset", "pilot-smoke", "--rates", "0"], "argument --rates: learning rates must be > 0, got 0.0"),
       (["pilot", "--preset", "pilot-smoke", "--methods", "B1"], "argument --methods: ['B1'] are not methods of the pilot preset")]
if not __import__("torch").cuda.is_available():
    BAD.append((["run", "--device", "cuda"], "argument --device: device 'cuda' is not available"))


@pytest.mark.parametrize("argv, message", BAD, ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_arguments_get_one_line_naming_them(argv, message, tmp_path):
    result = so8lab(*argv, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())                                      # nothing ran, nothing was written


def test_command_line_runs_and_lists_where_the_reports_look(tmp_path):
    result = so8lab("run", "--methods", "B0", "--seeds", "3", "--preset", "smoke", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "reports" / "runs" / "smoke" / "records" / "B0-seed3.json").read_text())
    assert (record["method"], record["seed"], record["preset"]) == ("B0", 3, "smoke")
    assert set(record["metrics"]) == {"val", "heldout_pairs", "heldout", "heldout_any"}
    assert "smoke training runs 1/1: B0-seed3 done" in result.stderr
    listing = so8lab("list", cwd=tmp_path)                                   # default: every reports/…/runs/<preset>
    assert listing.returncode == 0 and "B0" in listing.stdout and "seed 3" in listing.stdout
    empty = tmp_path / "empty"; empty.mkdir()
    nothing = so8lab("list", "--results-dir", str(empty), cwd=tmp_path)
    assert nothing.returncode == 0 and f"no records under {empty}" in nothing.stdout


def _plateau(steps, values, gain, fraction):
    "Brute force: the first step whose value gains < gain over the latest step at or before (1 - fraction) of it."
    for i, step in enumerate(steps):
        earlier = [j for j in range(len(steps)) if steps[j] <= (1 - fraction) * step]
        if earlier and values[i] - values[earlier[-1]] < gain: return step
    return None


def test_pilot_report_decides_from_its_records_and_renders_them_without_training(tmp_path):
    out = tmp_path / "pilot"
    trained = so8lab("report", "--preset", "pilot-smoke", "--out", str(out), "--no-html", "--device", "cpu", cwd=tmp_path, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    results = json.loads((out / "P0_pilot" / "results.json").read_text())
    records = {rate: [json.loads(p.read_text()) for p in sorted((out / "runs" / "pilot-smoke" / f"lr{rate}" / "records").glob("*.json"))]
               for rate in ("0.001", "0.003")}
    assert all(len(found) == 4 for found in records.values())                 # 2 methods x 2 seeds at each rate
    for method in ("proposed", "B0"):                                          # decision 1, recomputed from the record files
        means = {rate: sum(r["metrics"]["val"]["exact_match"] for r in found if r["method"] == method) / 2 for rate, found in records.items()}
        assert results["results"]["learning_rates"][method] == float(max(means, key=means.get))
        runs = [r for r in records[f"{results['results']['learning_rates'][method]:g}"] if r["method"] == method]
        steps = [p["step"] for p in runs[0]["curves"]]                        # decision 2, brute force on the running best
        best = [sum(max(p["exact_match"] for p in r["curves"][:i + 1]) for r in runs) / 2 for i in range(len(steps))]
        assert results["results"]["budgets"][method] == _plateau(steps, best, 0.01, 0.2)
    assert (out / "P0_pilot" / "pilot_curves.png").stat().st_size > 0
    assert "P0_pilot (pilot-smoke)" in (out / "summary.md").read_text()
    again = so8lab("report", "--preset", "pilot-smoke", "--out", str(out), "--no-html", "--no-train", "--device", "cpu", cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and " done (" not in again.stderr, again.stderr[-3000:]   # read, not retrained
    (out / "runs" / "pilot-smoke" / "lr0.003" / "records" / "B0-seed1.json").unlink()
    missing = so8lab("report", "--preset", "pilot-smoke", "--out", str(out), "--no-html", "--no-train", "--device", "cpu", cwd=tmp_path, timeout=600)
    assert missing.returncode != 0 and "no current record and compute=False: B0-seed1" in missing.stderr
    assert not (out / "runs" / "pilot-smoke" / "lr0.003" / "records" / "B0-seed1.json").exists()


def test_pilot_command_writes_where_the_pilot_report_reads(tmp_path):
    trained = so8lab("pilot", "--preset", "pilot-smoke", "--methods", "B0", "--rates", "0.003", "--device", "cpu", cwd=tmp_path, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    folder = tmp_path / "reports" / "pilot" / "runs" / "pilot-smoke" / "lr0.003" / "records"
    assert sorted(p.name for p in folder.glob("*.json")) == ["B0-seed0.json", "B0-seed1.json"]
    assert "2 records in" in trained.stdout and "lr 0.003  B0" in trained.stdout
    render = so8lab("report", "--preset", "pilot-smoke", "--out", "reports/pilot", "--no-train", "--no-html", "-p", "rates=[0.003]",
                    "--device", "cpu", cwd=tmp_path, timeout=600)
    assert render.returncode != 0 and "no current record and compute=False: proposed-seed0" in render.stderr   # B0's were found
