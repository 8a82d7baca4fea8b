"""Fail when so8lab/ holds a module that no notebook exports (an orphan), or a notebook exports a missing module."""
import json, pathlib, re, sys

root = pathlib.Path(__file__).resolve().parent.parent
exported = set()
for notebook in (root / "nbs").rglob("*.ipynb"):
    if any(part.startswith(("_", ".")) for part in notebook.relative_to(root / "nbs").parts): continue
    for cell in json.loads(notebook.read_text())["cells"]:
        match = re.search(r"^#\|\s*default_exp\s+(\S+)", "".join(cell["source"]), re.M)
        if cell["cell_type"] == "code" and match: exported.add(match.group(1).replace(".", "/") + ".py")
present = {str(p.relative_to(root / "so8lab")) for p in (root / "so8lab").rglob("*.py")} - {"__init__.py", "_modidx.py"}
orphans, missing = sorted(present - exported), sorted(exported - present)
if orphans or missing:
    print(f"orphan modules (no notebook exports them): {orphans}; exported but missing: {missing}")
    sys.exit(1)
print(f"package matches the notebooks: {len(present)} modules")
