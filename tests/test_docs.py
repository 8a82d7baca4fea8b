"""The documentation site and README.md: (a) README.md and its figures are exactly what nbs/index.ipynb generates;
(b) the site built from the repository (`make docs` runs the same `build_site`) opens in headless Chromium from
file:// with every http(s) request blocked: every page renders with no console error, every image loads, every
link inside the site points at a page that exists and, with a fragment, at an element of that page; the sidebar
lists every library notebook and every kept report. The home page's screenshot goes to $SO8LAB_SCREENSHOTS when set."""
import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from so8lab.docs import README_IMAGES, build_site, library_notebooks, readme_markdown, site_reports
from test_browser import browser_page, keep_screenshot

ROOT = Path(__file__).resolve().parent.parent


def test_readme_is_generated_from_the_index_notebook(monkeypatch):
    monkeypatch.chdir(ROOT)
    text, figures = readme_markdown(Path("nbs/index.ipynb"))
    assert (ROOT / "README.md").read_text(encoding="utf-8") == text, "README.md is stale: run `make docs` (it is generated from nbs/index.ipynb)"
    on_disk = {f"{README_IMAGES}/{p.name}" for p in (ROOT / README_IMAGES).glob("*.png")}
    assert on_disk == set(figures), "docs/images/readme/ does not hold exactly the README's figures: run `make docs`"
    for name, content in figures.items(): assert (ROOT / name).read_bytes() == content, f"{name} is stale: run `make docs`"
    # an independent count: every PNG output of a visible index cell is one README figure
    cells = json.loads((ROOT / "nbs/index.ipynb").read_text())["cells"]
    pngs = [o for c in cells if c["cell_type"] == "code" and "#| hide" not in "".join(c["source"])
            for o in c["outputs"] if "image/png" in o.get("data", {})]
    assert len(pngs) == len(figures) >= 2
    assert all(base64.b64decode("".join(o["data"]["image/png"]))[:8] == b"\x89PNG\r\n\x1a\n" for o in pngs)


class Anchors(HTMLParser):
    "The ids and the link targets of one HTML page."
    def __init__(self):
        super().__init__(); self.ids, self.links = set(), []
    def handle_starttag(self, tag, attributes):
        attributes = dict(attributes)
        if "id" in attributes: self.ids.add(attributes["id"])
        if tag == "a" and attributes.get("href"): self.links.append(attributes["href"])


def parse(path:Path)->Anchors:
    anchors = Anchors(); anchors.feed(path.read_text(encoding="utf-8")); return anchors


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return build_site(tmp_path_factory.mktemp("docs") / "_docs", nbs_path=ROOT / "nbs", reports_path=ROOT / "reports")


def test_site_has_a_page_per_notebook_and_report(site):
    pages = {p.relative_to(site).as_posix() for p in site.rglob("*.html") if "_static" not in p.parts}
    notebooks = library_notebooks(ROOT / "nbs")
    assert len([p for p in pages if "/" not in p]) == len(notebooks)          # one page per library notebook, index included
    assert "index.html" in pages and "primitives.html" in pages and "docs.html" in pages
    assert {f"reports/{name}.html" for name, _ in site_reports(ROOT / "reports")} | {"reports/summary.html"} <= pages
    sidebar = parse(site / "index.html").links
    assert pages <= set(sidebar) | {"index.html"}, "a page is missing from the sidebar"
    primitives = (site / "primitives.html").read_text(encoding="utf-8")
    text = re.sub(r"<[^>]+>", "", primitives)
    assert 'id="apply_primitive"' in primitives and "def apply_primitive(" in text    # show_doc's API reference
    assert "#| export" not in text and "#| hide" not in text


def test_site_links_resolve(site):
    root = site.resolve()
    anchors = {p: parse(p) for p in root.rglob("*.html") if "_static" not in p.parts}
    broken = []
    for page, parsed in anchors.items():
        for href in parsed.links:
            parts = urlsplit(href)
            if parts.scheme or href.startswith(("mailto:", "//")): continue                # off-site: not followed offline
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if not target.is_file(): broken.append(f"{page.relative_to(root)}: {href} (no such page)"); continue
            ids = anchors[target].ids if target in anchors else parse(target).ids
            if parts.fragment and target.suffix == ".html" and not {parts.fragment, unquote(parts.fragment)} & ids:   # browsers try both
                broken.append(f"{page.relative_to(root)}: {href} (no element with that id)")
    assert broken == []


def test_site_pages_render_offline(site, tmp_path):
    pages = sorted(p for p in site.rglob("*.html") if "_static" not in p.parts)
    with browser_page(tmp_path / "profile") as (page, problems):
        for html in pages:
            page.goto(html.resolve().as_uri(), wait_until="load")
            page.locator("nav.so8lab-sidebar").wait_for(timeout=30_000)
            assert page.locator("h1").count() >= 1, html
            images = page.evaluate("Array.from(document.images).map(i => [i.src.slice(0, 80), i.complete && i.naturalWidth > 0])")
            assert all(ok for _, ok in images), (html, [src for src, ok in images if not ok])
            assert problems == [], (html, problems)
        page.goto((site / "index.html").resolve().as_uri(), wait_until="load")
        assert page.locator("nav.so8lab-sidebar a.current").inner_text() == "Home"
        assert page.locator("img").count() >= 2                          # the task pictures and the attention picture
        page.screenshot(path=tmp_path / "docs_index.png")
    keep_screenshot(tmp_path / "docs_index.png")
