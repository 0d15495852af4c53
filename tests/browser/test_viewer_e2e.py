"""End to end in headless Chromium: open a slide, zoom (tiles load), toggle overlays, ask the chat.

Runs against a real uvicorn on 127.0.0.1. Skips with the reason when Chromium or
OpenSeadragon (``npm ci``) is missing; CI installs both. The final screenshot is kept in
``test-artifacts/serve_viewer.png`` at the repository root.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from serve_fixtures import SLIDES, shared_job

from slidevl.serve.app import create_app
from slidevl.serve.assets import OSD_MISSING, find_openseadragon
from slidevl.serve.job import ServeJob
from slidevl.serve.server import background_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TOY = SLIDES[0]

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
pytestmark = [
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} missing: apt-get install -y chromium"),
    pytest.mark.skipif(find_openseadragon() is None, reason=OSD_MISSING),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> str:
    paths = shared_job(tmp_path_factory)
    with background_server(create_app(ServeJob(paths["job"], survival_run=paths["run"]))) as url:
        yield url


@pytest.fixture()
def page(server: str):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 860})
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        # Only loopback traffic is allowed: anything else would mean a CDN or an external font.
        page.route(lambda url: not url.startswith(server) and not url.startswith("data:"),
                   lambda route: (page.errors.append(f"external request {route.request.url}"), route.abort()))
        yield page
        browser.close()


def _wait_loaded(page, slide_id: str) -> None:
    """Until the slide's overlays and panels are loaded and every visible tile is drawn."""
    page.wait_for_function(
        "id => window.slidevl && window.slidevl.loaded === id && window.slidevl.viewer.world.getItemCount() === 1 "
        "&& window.slidevl.viewer.world.getItemAt(0).getFullyLoaded()", arg=slide_id, timeout=20_000)


def _shapes(page) -> int:
    return int(page.eval_on_selector("#overlay", "c => Number(c.dataset.shapes || 0)"))


def test_viewer_end_to_end(server: str, page, tmp_path: Path) -> None:
    tiles: list[tuple[str, int]] = []
    page.on("response", lambda r: tiles.append((r.url, r.status)) if "/image_files/" in r.url else None)

    page.goto(f"{server}/#slide={TOY.slide_id}")
    _wait_loaded(page, TOY.slide_id)
    assert page.locator("#slide-list li").count() == 3
    assert page.locator("#slide-list li.active").get_attribute("data-id") == TOY.slide_id
    assert page.locator("#slide-list li[data-id=BROKEN-03] .status").inner_text() == "failed"
    assert "answerer: job-facts" in page.locator("#answerer-badge").inner_text()
    assert "µm" in page.locator("#scalebar-label").inner_text()
    opened = len(tiles)
    assert opened > 0

    # Zooming into the centre fetches full-resolution tiles (the last DZ level) the page had not needed yet.
    levels = page.evaluate("() => window.slidevl.slide.levels")
    scale_before = page.locator("#scalebar-label").inner_text()
    page.evaluate("() => { const v = window.slidevl.viewer; v.viewport.zoomTo(v.viewport.getMaxZoom() * 0.6, null, true); }")
    page.wait_for_function("() => window.slidevl.viewer.world.getItemAt(0).getFullyLoaded()", timeout=20_000)
    page.wait_for_timeout(300)
    new = tiles[opened:]
    assert any(f"/image_files/{levels - 1}/" in url for url, _ in new), new
    assert all(status == 200 for _, status in tiles)
    assert page.locator("#scalebar-label").inner_text() != scale_before

    # Switching slides reloads the viewer and its overlays.
    page.click(f"#slide-list li[data-id={SLIDES[1].slide_id}]")
    _wait_loaded(page, SLIDES[1].slide_id)
    # Tissue, three grids and its attention heatmap; this slide has no ROI file.
    assert page.locator("#layers label").count() == 1 + 3 + 1 and page.locator("#toggle-rois").count() == 0
    contours = len(page.evaluate("() => window.slidevl.layers.find(l => l.key === 'tissue').data.polygons"))
    page.check("#toggle-ev-patch_attention")
    assert _shapes(page) > contours  # the attention heatmap's cells are drawn over the contours
    page.click(f"#slide-list li[data-id={TOY.slide_id}]")
    _wait_loaded(page, TOY.slide_id)

    # Overlays: the tissue contour and ROIs are on by default; the token layer adds shapes, toggling tissue removes one.
    page.wait_for_timeout(200)
    base = _shapes(page)
    n_tissue = len(page.evaluate("() => window.slidevl.layers.find(l => l.key === 'tissue').data.polygons"))
    assert n_tissue >= 1 and base == n_tissue + 2  # the tissue polygons + two ROIs
    page.check("#toggle-ev-patch_opl_tokens")
    with_tokens = _shapes(page)
    assert with_tokens > base
    page.uncheck("#toggle-tissue")
    assert _shapes(page) == with_tokens - n_tissue
    page.check("#toggle-tissue")
    page.locator("[aria-label='patch opl tokens opacity']").fill("0.35")

    # Click a patch: its score and matched prompt show in the side panel.
    box = page.locator("#viewer").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    page.wait_for_selector("#patch-info table")
    info = page.locator("#patch-info").inner_text()
    assert "Patch" in info and "alignment" in info and "risk:" in info

    # Survival panel.
    assert page.locator("#survival-card").is_visible()
    assert "group" in page.locator("#survival-info").inner_text()
    assert page.locator("#km-plot path").count() >= 2

    # Draw a region and ask about it; then ask about the whole slide.
    page.click("#select-region")
    x0, y0 = box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.4
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x0 + 120, y0 + 80, steps=5)
    page.mouse.move(x0 + 240, y0 + 160, steps=5)
    page.mouse.up()
    assert page.locator("#chat-scope").is_checked()
    page.fill("#chat-input", "How many patches and how much tissue is in this region?")
    page.click("#chat-send")
    page.wait_for_selector(".msg.assistant")
    answer = page.locator(".msg.assistant").last.inner_text()
    selection = page.evaluate("() => window.slidevl.selection")
    assert answer.startswith("job-facts") and f"Rectangle [{', '.join(map(str, selection))}]" in answer
    assert "tissue patches" in answer and "mm² in the rectangle" in answer
    page.fill("#chat-input", "What is the resolution?")
    page.click("#chat-send")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length === 2")
    assert "0.5 µm per pixel" in page.locator(".msg.assistant").last.inner_text()

    assert page.errors == []
    shot = tmp_path / "serve_viewer.png"
    page.screenshot(path=str(shot))
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)
