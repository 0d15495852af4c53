"""The viewer's JSON API through FastAPI's TestClient: content, and every kind of bad input."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import skimage.draw
from fastapi.testclient import TestClient
from PIL import Image
from serve_fixtures import ENCODER, MPP, SLIDES, shared_job, tissue_area_mm2

from slidevl.features.store import read_slide_features
from slidevl.serve.app import create_app
from slidevl.serve.job import ServeJob
from slidevl.serve.server import background_server
from slidevl.survival.predict import predict_patient

TOY = SLIDES[0]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return shared_job(tmp_path_factory)


@pytest.fixture(scope="module")
def client(paths: dict[str, Path]) -> TestClient:
    app = create_app(ServeJob(paths["job"], survival_run=paths["run"]))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _features(paths: dict[str, Path], slide_id: str = TOY.slide_id):
    return read_slide_features(paths["job"] / "features" / ENCODER / f"{slide_id}.h5")


def _rasterised_tissue(paths: dict[str, Path]) -> np.ndarray:
    """Level-0 pixel mask of the tissue contours, drawn independently of the viewer's geometry code."""
    geojson = json.loads((paths["job"] / "tissue" / ENCODER / f"{TOY.slide_id}.geojson").read_text())
    mask = np.zeros((TOY.height, TOY.width), bool)
    for feature in geojson["features"]:
        for k, ring in enumerate(feature["geometry"]["coordinates"]):
            xy = np.asarray(ring)
            rr, cc = skimage.draw.polygon(xy[:, 1], xy[:, 0], mask.shape)
            mask[rr, cc] = k == 0  # holes are cleared
    return mask


def _mm2(answer: str) -> float:
    return float(re.search(r"Tissue covers ([0-9.]+) mm²", answer).group(1))


# -- content ---------------------------------------------------------------------------------
def test_slide_list_comes_from_the_manifest(client: TestClient, paths: dict[str, Path]) -> None:
    slides = {s["id"]: s for s in client.get("/api/slides").json()}
    assert set(slides) == {"TOY-01", "TOY-02", "BROKEN-03"}
    assert slides["TOY-01"]["status"] == "ok" and slides["TOY-01"]["n_patches"] == _features(paths).n_patches
    assert slides["BROKEN-03"]["status"] == "failed" and "cannot open as a slide" in slides["BROKEN-03"]["error"]
    thumb = client.get(slides["TOY-01"]["thumbnail"], params={"size": 64})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 64


def test_slide_info_reports_geometry_and_available_overlays(client: TestClient) -> None:
    info = client.get(f"/api/slides/{TOY.slide_id}").json()
    assert (info["width"], info["height"], info["mpp"]) == (TOY.width, TOY.height, MPP)
    assert info["overlays"] == {"tissue": True, "rois": True, "evidence": True, "grid": True}
    assert info["survival"] is True
    other = client.get("/api/slides/TOY-02").json()
    assert other["overlays"]["rois"] is False


def test_deep_zoom_descriptor_and_tiles(client: TestClient) -> None:
    info = client.get(f"/api/slides/{TOY.slide_id}").json()
    dzi = client.get(info["dzi"])
    assert dzi.status_code == 200 and f'Width="{TOY.width}"' in dzi.text and 'TileSize="254"' in dzi.text
    top = info["levels"] - 1
    jpeg = client.get(f"/api/slides/{TOY.slide_id}/image_files/{top}/0_0.jpeg")
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg.content)).size == (255, 255)  # 254 + one overlap pixel
    png = client.get(f"/api/slides/{TOY.slide_id}/image_files/0/0_0.png")
    assert png.headers["content-type"] == "image/png" and Image.open(io.BytesIO(png.content)).size == (1, 1)
    # The top-left tile of the full-resolution level is glass (white), the centre is stained tissue.
    tile = np.asarray(Image.open(io.BytesIO(jpeg.content)).convert("RGB"), float)
    assert tile[:64, :64].mean() > 230
    cx, cy = (TOY.width // 2) // 254, (TOY.height // 2) // 254
    centre = np.asarray(Image.open(io.BytesIO(client.get(f"/api/slides/{TOY.slide_id}/image_files/{top}/{cx}_{cy}.jpeg").content)), float)
    assert centre.mean() < 215


def test_overlays_match_the_job_outputs(client: TestClient, paths: dict[str, Path]) -> None:
    sf = _features(paths)
    tissue = client.get(f"/api/slides/{TOY.slide_id}/overlays/tissue").json()
    geojson = json.loads((paths["job"] / "tissue" / ENCODER / f"{TOY.slide_id}.geojson").read_text())
    rings = [[np.rint(np.asarray(r)[:-1]).astype(int).tolist() for r in f["geometry"]["coordinates"]] for f in geojson["features"]]
    assert tissue["polygons"] == rings and len(rings) == 1
    xs, ys = np.asarray(rings[0][0]).T  # the contour hugs the known tissue rectangle
    assert np.allclose([xs.min(), ys.min(), xs.max(), ys.max()], TOY.tissue_box, atol=16)
    grid = client.get(f"/api/slides/{TOY.slide_id}/overlays/grid", params={"kind": "patch"}).json()
    assert grid["size"] == 256.0 and grid["coords"] == sf.patch_coords.tolist()
    region = client.get(f"/api/slides/{TOY.slide_id}/overlays/grid", params={"kind": "region"}).json()
    assert region["size"] == 4096.0 and region["coords"] == sf.region_coords.tolist()
    rois = client.get(f"/api/slides/{TOY.slide_id}/overlays/rois").json()
    assert [r["label"] for r in rois["rois"]] == ["tumour nest", "stroma"]
    ev = client.get(f"/api/slides/{TOY.slide_id}/overlays/evidence").json()
    layers = {layer["name"]: layer for layer in ev["layers"]}
    assert set(layers) == {"patch_opl_tokens", "patch_alignment", "region_opl_tokens", "region_alignment"}
    tokens = layers["patch_opl_tokens"]
    assert tokens["coords"] == sf.patch_coords.tolist() and tokens["size"] == 256.0
    assert tokens["prompt"][:3] == [0, 1, 2]  # flat prompt index → position in the scale's prompt list
    assert ev["prompts"]["patch"][2] == {"text": "low risk: lymphocyte-rich stroma", "label": "low risk", "level": 1}
    assert ev["model"] == "hila"
    assert layers["region_opl_tokens"]["size"] == 4096.0
    attention = client.get("/api/slides/TOY-02/overlays/evidence").json()
    assert [(l["name"], l["kind"]) for l in attention["layers"]] == [("patch_attention", "heatmap")]
    assert sum(attention["layers"][0]["score"]) == pytest.approx(1.0, abs=1e-3) and attention["model"] == "abmil"


def test_patch_click_returns_scores_and_matched_prompt(client: TestClient, paths: dict[str, Path]) -> None:
    sf = _features(paths)
    evidence = json.loads((paths["run"] / "evidence" / f"{TOY.slide_id}.json").read_text())
    i = 4
    x, y = sf.patch_coords[i] + 100
    d = client.get(f"/api/slides/{TOY.slide_id}/patch", params={"x": x, "y": y}).json()
    assert d["patch"]["index"] == i and [d["patch"]["x"], d["patch"]["y"]] == sf.patch_coords[i].tolist()
    patch_ev = next(e for e in d["evidence"] if e["level"] == "patch")
    assert patch_ev["alignment"] == evidence["patch"]["alignment"][i]
    assert patch_ev["kept"] == evidence["patch"]["kept"][i]
    assert patch_ev["prompt_text"] == ["high risk: necrosis", "low risk: dense tumour nests", "low risk: lymphocyte-rich stroma"][i % 3]
    glass = client.get(f"/api/slides/{TOY.slide_id}/patch", params={"x": 10, "y": 10}).json()
    assert glass["patch"] is None and [e["level"] for e in glass["evidence"]] == ["region"]


def test_survival_panel_reads_the_run_folder(client: TestClient, paths: dict[str, Path]) -> None:
    rows = list(csv.DictReader(open(paths["run"] / "oof_risks.csv")))
    mine = next(r for r in rows if r["patient_id"] == "P00")  # named by TOY-01's evidence file
    d = client.get(f"/api/slides/{TOY.slide_id}/survival").json()
    risks = np.array([float(r["risk"]) for r in rows])
    assert d["patient"]["risk"] == float(mine["risk"]) and d["patient"]["fold"] == 0
    assert d["patient"]["group"] == ("high" if float(mine["risk"]) > np.median(risks) else "low")
    assert d["cohort"]["threshold"] == pytest.approx(np.median(risks))
    assert set(d["cohort"]["km"]) == {"high", "low"} and d["cohort"]["n"] == len(rows) and 0 <= d["cohort"]["logrank_p"] <= 1
    summary = json.loads((paths["run"] / "summary.json").read_text())
    assert d["summary"]["c_index_mean"] == summary["c_index"]["mean"] and d["summary"]["folds"] == 5
    assert d["cohort"]["logrank_p"] == pytest.approx(summary["logrank_p"])  # same split as the run's own
    # The patient's curve comes from their fold's checkpoint through the survival predictor.
    pred = predict_patient(paths["run"] / "fold_0", [paths["job"] / "features" / ENCODER / f"{TOY.slide_id}.h5"])
    curve = d["patient"]["curve"]
    assert curve["t"] == [0.0, 12.0, 30.0, 60.0, 120.0] and curve["s"] == pytest.approx([1.0] + pred["survival"])
    assert curve["slides"] == [TOY.slide_id] and d["patient"]["curve_note"] is None
    # TOY-02's patient was validated in fold 1, whose checkpoint is not in the run.
    other = client.get("/api/slides/TOY-02/survival").json()["patient"]
    assert other["patient_id"] == "P01" and other["curve"] is None and "fold_1" in other["curve_note"]
    assert client.get("/api/survival/summary").json() == summary


def test_chat_answers_with_job_facts(client: TestClient, paths: dict[str, Path]) -> None:
    sf = _features(paths)
    bbox = [600, 300, 1400, 900]
    reply = client.post(f"/api/slides/{TOY.slide_id}/chat",
                        json={"question": "How many patches, and how much tissue area?", "bbox": bbox}).json()
    centre = sf.patch_coords + 128
    inside = int(((centre[:, 0] >= 600) & (centre[:, 0] < 1400) & (centre[:, 1] >= 300) & (centre[:, 1] < 900)).sum())
    assert reply["answerer"] == "job-facts" and reply["bbox"] == bbox
    assert f"There are {inside} tissue patches" in reply["answer"]
    mask = _rasterised_tissue(paths)
    assert _mm2(reply["answer"]) == pytest.approx(mask[300:900, 600:1400].sum() * (MPP / 1000) ** 2, abs=0.002)
    whole = client.post(f"/api/slides/{TOY.slide_id}/chat", json={"question": "What is the tissue area?"}).json()
    assert _mm2(whole["answer"]) == pytest.approx(mask.sum() * (MPP / 1000) ** 2, abs=0.002)
    # And the segmentation found the planted rectangle (its contour sits a little inside the edge).
    assert _mm2(whole["answer"]) == pytest.approx(tissue_area_mm2(TOY), rel=0.1)
    info = client.get("/api/info").json()
    assert info["answerer"]["name"] == "job-facts" and "no VQA model" in info["answerer"]["description"]


def test_openapi_and_page(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/api/slides", "/api/slides/{slide_id}/image_files/{level}/{tile}", "/api/slides/{slide_id}/chat",
                 "/api/slides/{slide_id}/overlays/evidence", "/api/slides/{slide_id}/survival"):
        assert path in spec["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "/vendor/openseadragon/openseadragon.min.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    assert client.get("/static/app.js").status_code == 200


def test_injected_answerer_is_used(paths: dict[str, Path]) -> None:
    class Echo:
        name = "echo"

        def answer(self, slide_id, question, bbox, history):
            return f"{slide_id}|{question}|{bbox}|{len(history)}"

    with TestClient(create_app(ServeJob(paths["job"]), answerer=Echo())) as c:
        r = c.post(f"/api/slides/{TOY.slide_id}/chat", json={
            "question": "hi", "bbox": [1, 2, 3.5, 4], "history": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        assert r.json() == {"answer": "TOY-01|hi|(1, 2, 4, 4)|2", "answerer": "echo", "bbox": [1, 2, 4, 4]}
        assert c.get("/api/info").json()["answerer"]["name"] == "echo"


def test_without_survival_run_the_panels_say_so(paths: dict[str, Path]) -> None:
    with TestClient(create_app(ServeJob(paths["job"]))) as c:
        assert c.get(f"/api/slides/{TOY.slide_id}").json()["overlays"]["evidence"] is False
        assert c.get(f"/api/slides/{TOY.slide_id}").json()["survival"] is False
        for url in (f"/api/slides/{TOY.slide_id}/survival", "/api/survival/summary", f"/api/slides/{TOY.slide_id}/overlays/evidence"):
            r = c.get(url)
            assert r.status_code == 404, url
        assert "--survival-run" in c.get("/api/survival/summary").json()["detail"]


# -- bad input -------------------------------------------------------------------------------
SLIDE_ROUTES = ["/api/slides/{id}", "/api/slides/{id}/thumbnail.jpg", "/api/slides/{id}/image.dzi",
                "/api/slides/{id}/image_files/12/0_0.jpeg", "/api/slides/{id}/overlays/tissue",
                "/api/slides/{id}/overlays/grid", "/api/slides/{id}/overlays/rois", "/api/slides/{id}/overlays/evidence",
                "/api/slides/{id}/patch?x=1&y=1", "/api/slides/{id}/survival"]
TRAVERSALS = ["..", "%2e%2e", "..%2f..%2fetc%2fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%5c..%5cetc%5cpasswd",
              "%252e%252e%252fetc%252fpasswd", "TOY-01%00", "%2fetc%2fpasswd", "manifest", "TOY-01.tiff"]


def _assert_clean_4xx(r: httpx.Response) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.url)
    assert "Traceback" not in r.text and "root:" not in r.text and "File \"" not in r.text
    assert r.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("slide", TRAVERSALS)
@pytest.mark.parametrize("route", SLIDE_ROUTES)
def test_traversal_and_unknown_ids_are_4xx(client: TestClient, route: str, slide: str) -> None:
    _assert_clean_4xx(client.get(route.replace("{id}", slide)))


@pytest.mark.parametrize("url", [
    "/api/slides/../../etc/passwd", "/api/slides/TOY-01/../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/serve/app.py", "/static/..%2f..%2fapp.py", "/static/%2e%2e%2f%2e%2e%2fjob.py",
    "/vendor/openseadragon/%2e%2e/%2e%2e/%2e%2e/package.json", "/vendor/openseadragon/..%2f..%2f..%2fpackage.json",
    "/api/slides/TOY-01/image_files/12/..%2f..%2f..%2fmanifest.json", "/etc/passwd",
])
def test_traversal_outside_slide_routes_is_4xx(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert 400 <= r.status_code < 500 and "root:" not in r.text and "import" not in r.text


def test_unknown_slide_message(client: TestClient) -> None:
    r = client.get("/api/slides/NOPE/image.dzi")
    assert r.status_code == 404 and r.json()["detail"].startswith("unknown slide id")


@pytest.mark.parametrize("tile, status", [
    ("13/0_0.jpeg", 404),      # level beyond the pyramid
    ("99999/0_0.jpeg", 404),
    ("-1/0_0.jpeg", 404),
    ("abc/0_0.jpeg", 422),     # level is not an integer
    ("12/13_0.jpeg", 404),     # column beyond the level (13 x 9 tiles)
    ("12/0_9.jpeg", 404),      # row beyond the level
    ("12/99999999_0.jpeg", 400),
    ("12/-1_0.jpeg", 400),
    ("12/0_0.gif", 400),       # format not served
    ("12/0_0.JPEG.php", 400),
    ("12/0_0", 400),
    ("12/a_b.jpeg", 400),
    ("12/0_0_0.jpeg", 400),
])
def test_bad_tile_addresses(client: TestClient, tile: str, status: int) -> None:
    r = client.get(f"/api/slides/{TOY.slide_id}/image_files/{tile}")
    assert r.status_code == status, r.text
    _assert_clean_4xx(r)


@pytest.mark.parametrize("params", [{"kind": "cell"}, {"kind": ""}])
def test_bad_grid_kind(client: TestClient, params: dict) -> None:
    _assert_clean_4xx(client.get(f"/api/slides/{TOY.slide_id}/overlays/grid", params=params))


@pytest.mark.parametrize("params", [{"x": -1, "y": 0}, {"x": "a", "y": 1}, {"x": 1}, {"x": "nan", "y": 1}, {"x": 1e12, "y": 1}])
def test_bad_patch_queries(client: TestClient, params: dict) -> None:
    _assert_clean_4xx(client.get(f"/api/slides/{TOY.slide_id}/patch", params=params))


@pytest.mark.parametrize("size", [0, 5000, "big"])
def test_bad_thumbnail_size(client: TestClient, size) -> None:
    _assert_clean_4xx(client.get(f"/api/slides/{TOY.slide_id}/thumbnail.jpg", params={"size": size}))


@pytest.mark.parametrize("body", [
    {"question": "q", "bbox": [1, 2, 3]},
    {"question": "q", "bbox": [1, 2, 3, 4, 5]},
    {"question": "q", "bbox": ["a", 0, 10, 10]},
    {"question": "q", "bbox": [10, 0, 5, 10]},          # x1 < x0
    {"question": "q", "bbox": [0, 10, 10, 10]},         # empty
    {"question": "q", "bbox": [-5, 0, 10, 10]},
    {"question": "q", "bbox": [0, 0, 10, 99999]},       # beyond the slide
    {"question": "q", "bbox": "0,0,10,10"},
    {"question": "q", "bbox": {"x0": 0}},
    {"question": ""},
    {"question": "q" * 5000},
    {"bbox": [0, 0, 10, 10]},
    {"question": "q", "history": [{"role": "system", "content": "x"}]},
    {"question": "q", "history": "nope"},
])
def test_malformed_chat_requests(client: TestClient, body: dict) -> None:
    _assert_clean_4xx(client.post(f"/api/slides/{TOY.slide_id}/chat", json=body))


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"[]", b'{"question": "q", "bbox": [NaN, 0, 1, 1]}'])
def test_chat_bodies_that_are_not_requests(client: TestClient, raw: bytes) -> None:
    _assert_clean_4xx(client.post(f"/api/slides/{TOY.slide_id}/chat", content=raw, headers={"content-type": "application/json"}))


def test_failed_slide_is_listed_but_not_viewable(client: TestClient) -> None:
    for url in ("/api/slides/BROKEN-03", "/api/slides/BROKEN-03/image.dzi", "/api/slides/BROKEN-03/thumbnail.jpg",
                "/api/slides/BROKEN-03/image_files/0/0_0.jpeg"):
        r = client.get(url)
        assert r.status_code == 409, url
        # The operator is told which file failed and what to do about it.
        assert "BROKEN-03.svs: OpenSlide cannot open it" in r.json()["detail"] and "readable copy" in r.json()["detail"]


def test_bugs_become_500_without_a_traceback(paths: dict[str, Path]) -> None:
    class Broken:
        name = "broken"

        def answer(self, slide_id, question, bbox, history):
            raise ZeroDivisionError("secret internals")

    with TestClient(create_app(ServeJob(paths["job"]), answerer=Broken()), raise_server_exceptions=False) as c:
        r = c.post(f"/api/slides/{TOY.slide_id}/chat", json={"question": "q"})
        assert r.status_code == 500 and r.json() == {"detail": "internal error; see the server log"}


def test_many_concurrent_tile_requests_on_a_real_server(paths: dict[str, Path]) -> None:
    app = create_app(ServeJob(paths["job"]))

    async def fetch_all(base: str) -> list[int]:
        async with httpx.AsyncClient(base_url=base, limits=httpx.Limits(max_connections=32), timeout=30) as http:
            urls = []
            for s in SLIDES:
                top = (await http.get(f"/api/slides/{s.slide_id}")).json()["levels"] - 1
                urls += [f"/api/slides/{s.slide_id}/image_files/{level}/{c}_{r}.jpeg"
                         for level in (top, top - 1) for c in range(4) for r in range(4)]
            # Each tile three times: repeats hit the cache while other misses are still rendering.
            return [r.status_code for r in await asyncio.gather(*(http.get(u) for u in urls * 3))]

    with background_server(app) as base:
        statuses = asyncio.run(fetch_all(base))
        stats = httpx.get(f"{base}/api/stats").json()["tile_cache"]
    assert len(statuses) == 2 * 2 * 16 * 3 and set(statuses) == {200}
    assert stats["entries"] == 2 * 2 * 16 and stats["hits"] > 0
