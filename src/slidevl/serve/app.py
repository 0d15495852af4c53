"""The FastAPI application behind ``slidevl serve``: JSON API, tiles, and the page at ``/``.

Slides are addressed only by manifest id; every error is a JSON ``{"detail": ...}`` with a
4xx status (5xx only for a broken job file or a bug), never a traceback. Blocking work
(OpenSlide reads, JPEG encoding, HDF5, lifelines) runs in the thread pool: sync endpoints
are run there by FastAPI, and the tile endpoint answers cache hits on the event loop and
hands misses to :func:`run_in_threadpool`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, field_validator

import slidevl
from slidevl.errors import InputError
from slidevl.serve.answerer import Answerer, AnswerError
from slidevl.serve.assets import OSD_MISSING, STATIC_DIR, find_openseadragon
from slidevl.serve.job import JobError, NotAvailableError, ServeJob, UnknownSlideError
from slidevl.serve.jobfacts import JobFactsAnswerer
from slidevl.serve.overlays import (
    GridKind,
    evidence_at,
    evidence_layers,
    grid_layer,
    parse_evidence,
    parse_rois,
    tissue_layer,
)
from slidevl.serve.risk import SurvivalRun
from slidevl.serve.tiles import (
    FORMATS,
    SlideUnreadableError,
    TileRangeError,
    TileService,
)

log = logging.getLogger("slidevl.serve")
_TILE_NAME = re.compile(r"^(\d{1,7})_(\d{1,7})\.([A-Za-z]{1,5})$")
_TILE_CACHE_HEADERS = {"Cache-Control": "private, max-age=3600"}


class ChatTurn(BaseModel):
    role: Literal["user", "assistant"]
    content: str = Field(max_length=8000)


class ChatRequest(BaseModel):
    """A question about the slide, or about the level-0 rectangle ``bbox`` = [x0, y0, x1, y1]."""

    question: str = Field(min_length=1, max_length=2000)
    bbox: tuple[float, float, float, float] | None = None
    history: list[ChatTurn] = Field(default_factory=list, max_length=50)

    @field_validator("bbox")
    @classmethod
    def _ordered(cls, v: tuple[float, float, float, float] | None) -> tuple[float, float, float, float] | None:
        if v is None:
            return v
        if not all(math.isfinite(c) for c in v):
            raise ValueError("bbox coordinates must be finite numbers")
        x0, y0, x1, y1 = v
        if not (x1 > x0 and y1 > y0 and x0 >= 0 and y0 >= 0):
            raise ValueError("bbox must be [x0, y0, x1, y1] in level-0 pixels with 0 <= x0 < x1 and 0 <= y0 < y1")
        return v


class ChatReply(BaseModel):
    answer: str
    answerer: str
    bbox: tuple[int, int, int, int] | None


class _HTTPError(InputError):
    """A request the API refuses: ``status`` and ``detail`` go back to the client."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def create_app(job: ServeJob | str | Path, *, answerer: Answerer | None = None, tiles: TileService | None = None,
               osd_dir: Path | None = None) -> FastAPI:
    """Build the app for ``job``. ``answerer`` defaults to :class:`JobFactsAnswerer`."""
    job = job if isinstance(job, ServeJob) else ServeJob(job)
    tiles = tiles or TileService(job.slide_file)
    answerer = answerer or JobFactsAnswerer(job, tiles.meta)
    survival = SurvivalRun(job.survival_run, job) if job.survival_run else None
    osd_dir = osd_dir or find_openseadragon()
    job_root = str(job.job_dir)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        tiles.close()

    app = FastAPI(title="slidevl viewer", version=slidevl.__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Slides, model evidence, survival risk and slide Q&A for one slidevl job folder.")
    app.state.job, app.state.tiles, app.state.answerer = job, tiles, answerer

    def _clean(message: str) -> str:
        # Files of the job are named relative to it. A slide file that cannot be opened is named in
        # full: the operator needs that path to fix it (the server is loopback-only unless asked).
        return message.replace(job_root, "<job>")

    @app.exception_handler(_HTTPError)
    async def _http_error(_: Request, exc: _HTTPError) -> JSONResponse:
        return JSONResponse({"detail": _clean(exc.detail)}, status_code=exc.status)

    @app.exception_handler(UnknownSlideError)
    async def _unknown(_: Request, exc: UnknownSlideError) -> JSONResponse:
        return JSONResponse({"detail": "unknown slide id; GET /api/slides lists the job's slides"}, status_code=404)

    @app.exception_handler(NotAvailableError)
    async def _missing(_: Request, exc: NotAvailableError) -> JSONResponse:
        return JSONResponse({"detail": _clean(str(exc))}, status_code=404)

    @app.exception_handler(TileRangeError)
    async def _range(_: Request, exc: TileRangeError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(SlideUnreadableError)
    async def _unreadable(_: Request, exc: SlideUnreadableError) -> JSONResponse:
        # The message names the slide paths tried and the fix (--slides-root, `slidevl job relocate`).
        return JSONResponse({"detail": _clean(str(exc))}, status_code=409)

    @app.exception_handler(AnswerError)
    async def _no_answer(_: Request, exc: AnswerError) -> JSONResponse:
        return JSONResponse({"detail": _clean(str(exc))}, status_code=422)

    @app.exception_handler(JobError)
    async def _job_error(_: Request, exc: JobError) -> JSONResponse:
        log.error("job data error: %s", exc)
        return JSONResponse({"detail": _clean(str(exc))}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)

    # -- page ---------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if osd_dir is not None:
        app.mount("/vendor/openseadragon", StaticFiles(directory=osd_dir), name="openseadragon")

    # -- job ----------------------------------------------------------------------------------
    @app.get("/api/info", tags=["job"])
    def info() -> dict[str, Any]:
        """Job name, the answerer in use, and which optional parts are present."""
        return {
            "job": job.job_dir.name, "version": slidevl.__version__,
            "answerer": {"name": answerer.name, "description": getattr(answerer, "description", "")},
            "survival_run": job.survival_run.name if job.survival_run else None,
            "openseadragon": osd_dir is not None, "openseadragon_hint": None if osd_dir else OSD_MISSING,
        }

    @app.get("/api/stats", tags=["job"])
    def stats() -> dict[str, Any]:
        """Tile cache counters."""
        return {"tile_cache": tiles.cache.stats()}

    @app.get("/api/slides", tags=["slides"])
    def list_slides() -> list[dict[str, Any]]:
        """Every manifest entry with its status and thumbnail URL."""
        return [{**e.as_dict(), "thumbnail": f"/api/slides/{e.slide_id}/thumbnail.jpg"} for e in job.slides()]

    @app.get("/api/slides/{slide_id}", tags=["slides"])
    def slide_info(slide_id: str) -> dict[str, Any]:
        """Dimensions, mpp and pyramid of a slide plus the overlays available for it."""
        entry = job.get(slide_id)
        meta = tiles.meta(slide_id)
        overlays = {k: job.file_for(slide_id, k) is not None for k in ("tissue", "rois", "evidence")}
        overlays["grid"] = job.file_for(slide_id, "features") is not None
        mpp = job.mpp(slide_id, meta.mpp)
        return {**entry.as_dict(), "width": meta.width, "height": meta.height, "mpp": mpp, "levels": meta.levels,
                "tile_size": meta.tile_size, "overlap": meta.overlap, "vendor": meta.vendor,
                "objective_power": meta.objective_power, "dzi": f"/api/slides/{slide_id}/image.dzi",
                "overlays": overlays, "survival": survival is not None}

    # -- pixels -------------------------------------------------------------------------------
    @app.get("/api/slides/{slide_id}/thumbnail.jpg", tags=["pixels"], response_class=Response)
    async def thumbnail(slide_id: str, size: int = Query(256, ge=16, le=1024)) -> Response:
        job.get(slide_id)
        data = await run_in_threadpool(tiles.thumbnail, slide_id, size)
        return Response(data, media_type="image/jpeg", headers=_TILE_CACHE_HEADERS)

    @app.get("/api/slides/{slide_id}/image.dzi", tags=["pixels"], response_class=Response)
    async def dzi(slide_id: str) -> Response:
        """Deep Zoom descriptor; tiles follow at ``image_files/{level}/{col}_{row}.jpeg``."""
        job.get(slide_id)
        xml = await run_in_threadpool(tiles.dzi, slide_id, "jpeg")
        return Response(xml, media_type="application/xml")

    @app.get("/api/slides/{slide_id}/image_files/{level}/{tile}", tags=["pixels"], response_class=Response)
    async def tile(slide_id: str, level: int, tile: str) -> Response:
        """One Deep Zoom tile: ``tile`` is ``{col}_{row}.{jpeg|jpg|png}``."""
        job.get(slide_id)
        m = _TILE_NAME.match(tile)
        if m is None:
            raise _HTTPError(400, "tile name must be {col}_{row}.{format} with non-negative integers")
        col, row, fmt = int(m.group(1)), int(m.group(2)), m.group(3).lower()
        if fmt not in FORMATS:
            raise _HTTPError(400, f"format {fmt!r} not served; use one of {sorted(FORMATS)}")
        if level < 0:
            raise _HTTPError(404, "level must be >= 0")
        data = tiles.cached(slide_id, level, col, row, fmt)
        if data is None:
            data = await run_in_threadpool(tiles.render, slide_id, level, col, row, fmt)
        return Response(data, media_type=FORMATS[fmt][1], headers=_TILE_CACHE_HEADERS)

    # -- overlays -----------------------------------------------------------------------------
    @app.get("/api/slides/{slide_id}/overlays/tissue", tags=["overlays"])
    def tissue(slide_id: str) -> dict[str, Any]:
        """Tissue contours (level-0 polygons) from the slide's tissue GeoJSON (``<job>/tissue/<encoder>/<slide>.geojson``)."""
        return tissue_layer(job.read_json(slide_id, "tissue"), str(job.file_for(slide_id, "tissue")))

    @app.get("/api/slides/{slide_id}/overlays/grid", tags=["overlays"])
    def grid(slide_id: str, kind: GridKind = "patch") -> dict[str, Any]:
        """Top-left corners and edge length of the patch, region or pack lattice."""
        return grid_layer(job.patches(slide_id), kind)

    @app.get("/api/slides/{slide_id}/overlays/rois", tags=["overlays"])
    def rois(slide_id: str) -> dict[str, Any]:
        """ROIs of the VQA data construction for this slide."""
        return parse_rois(job.read_json(slide_id, "rois"), f"rois/{slide_id}.json").model_dump()

    def _table_or_none(slide_id: str):
        try:
            return job.patches(slide_id)
        except NotAvailableError:
            return None

    @app.get("/api/slides/{slide_id}/overlays/evidence", tags=["overlays"])
    def evidence(slide_id: str) -> dict[str, Any]:
        """Survival evidence layers (OPL tokens, attention) with level-0 corners and scores."""
        source = f"evidence/{slide_id}.json"
        ev = parse_evidence(job.read_json(slide_id, "evidence"), source)
        return evidence_layers(ev, _table_or_none(slide_id), source)

    @app.get("/api/slides/{slide_id}/patch", tags=["overlays"])
    def patch_at(slide_id: str, x: float = Query(..., ge=0, le=1e8), y: float = Query(..., ge=0, le=1e8)) -> dict[str, Any]:
        """The patch under level-0 point (x, y): its index, corner, tissue fraction and evidence scores."""
        job.get(slide_id)
        table = _table_or_none(slide_id)
        out: dict[str, Any] = {"x": x, "y": y, "patch": None, "evidence": []}
        if table is not None:
            i = table.index_at(x, y)
            if i is not None:
                out["patch"] = {"index": i, "x": int(table.coords[i, 0]), "y": int(table.coords[i, 1]),
                                "size": table.patch_size, "tissue_fraction": float(table.tissue[i])}
        if job.file_for(slide_id, "evidence") is not None:
            source = f"evidence/{slide_id}.json"
            out["evidence"] = evidence_at(parse_evidence(job.read_json(slide_id, "evidence"), source), table, source, x, y)
        return out

    # -- survival -----------------------------------------------------------------------------
    @app.get("/api/survival/summary", tags=["survival"])
    def survival_summary() -> dict[str, Any]:
        """The survival run's ``summary.json``."""
        if survival is None:
            raise _HTTPError(404, "no survival run; start the viewer with --survival-run RUN")
        return survival.summary()

    @app.get("/api/slides/{slide_id}/survival", tags=["survival"])
    def slide_survival(slide_id: str) -> dict[str, Any]:
        """The patient's OOF risk, group and curve, and the cohort's Kaplan–Meier curves by risk group."""
        job.get(slide_id)
        if survival is None:
            raise _HTTPError(404, "no survival run; start the viewer with --survival-run RUN")
        return survival.for_slide(slide_id)

    # -- chat ---------------------------------------------------------------------------------
    @app.post("/api/slides/{slide_id}/chat", tags=["chat"], response_model=ChatReply)
    def chat(slide_id: str, req: ChatRequest) -> ChatReply:
        """Answer a question about the slide or about ``bbox`` (level-0 [x0, y0, x1, y1])."""
        job.get(slide_id)
        bbox = None
        if req.bbox is not None:
            meta = tiles.meta(slide_id)
            x0, y0, x1, y1 = req.bbox
            if x1 > meta.width or y1 > meta.height:
                raise _HTTPError(422, f"bbox exceeds the slide ({meta.width} × {meta.height} level-0 px)")
            bbox = (int(x0), int(y0), int(math.ceil(x1)), int(math.ceil(y1)))
        history = [t.model_dump() for t in req.history]
        text = answerer.answer(slide_id, req.question, bbox, history)
        return ChatReply(answer=text, answerer=answerer.name, bbox=bbox)

    return app
