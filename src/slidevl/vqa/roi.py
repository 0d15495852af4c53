"""Regions of interest grown over a slide's patch graph, for hierarchical QA sampling.

A slide's tissue patches form a graph: two patches are neighbours when their grid
cells touch (8-neighbourhood). ROIs are grown on that graph so every ROI is one
8-connected piece of tissue whose patches look alike:

1. **Features.** Patch features are standardised per slide (z-score per dimension)
   and L2-normalised, so cosine similarity compares patterns, not the scale of each
   feature (hand-crafted features mix optical densities, counts and texture
   statistics) nor the positive offset most encoders have, which would make every
   cosine close to 1.
2. **Seeds: k-means++** (:func:`sklearn.cluster.kmeans_plusplus`) on those features,
   deterministic by ``seed``. It spreads seeds over the feature space like
   farthest-point sampling, but samples by squared distance, so one outlier patch
   cannot claim a seed. Every 8-connected tissue piece gets at least one seed (a
   piece without one could never be reached), and the remaining seeds go to the
   pieces in proportion to their size: ``max(k, n_pieces)`` seeds in all. Pieces
   larger than 20,000 patches are seeded from a deterministic sample of them.
3. **Growth**, either

   - ``"prim"`` (default): multi-source region growing. Each ROI keeps the sum of its
     members' features; the frontier patch most similar (cosine) to the mean of the
     ROI it borders joins that ROI next, as in Prim's algorithm with a best-first
     queue. Priorities go stale as means move, so a popped patch is re-scored
     against the current mean and put back if it got worse.
   - ``"mst"``: the minimum spanning forest of the graph with edge weights
     ``1 - cosine`` (:func:`scipy.sparse.csgraph.minimum_spanning_tree`), cut into
     one tree per seed by Kruskal's rule: its edges are joined lightest first unless
     they would join two seeds. Each patch goes to the seed it reaches along the path
     whose heaviest step is smallest.

   Both reach every patch of a seeded piece, so the ROIs cover the tissue patches
   exactly once, with no leftovers to assign.
4. **Small ROIs merge.** Where the slide has fewer distinct textures than seeds, a
   seed whose texture a larger ROI already covers is starved to a patch or two. ROIs
   under ``min_fraction`` of the slide's patches (at least 2 patches) are merged into
   the touching ROI with the most similar mean, so the count can end below ``k``.

Geometry per ROI: member patch indices (rows of the feature file), level-0 bbox,
area in mm² (patches and tissue), centroid, and a ``centre`` that is the member patch
nearest the centroid (the centroid of a curved ROI can lie outside it; windows are cut
around ``centre``), plus the outline polygon for the viewer.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree
from sklearn.cluster import kmeans_plusplus

from slidevl.features.store import SlideFeatures
from slidevl.slide.geojson import mask_polygons
from slidevl.slide.tissue import TissueMask, TissueParams

METHODS: tuple[str, ...] = ("prim", "mst")
# Eight neighbour offsets (dcol, drow); only four are needed to list each edge once.
_HALF_NEIGHBOURS = ((1, 0), (0, 1), (1, 1), (1, -1))
# Added to 1 - cosine so that identical neighbours still form an edge (csgraph
# drops zero weights).
_EDGE_EPS = 1e-9
# Relative slack before a re-scored frontier entry is put back in the queue.
_STALE_TOL = 1e-9
# ROIs smaller than this share of the slide's patches (and never under
# MIN_ROI_PATCHES) are merged into a neighbour: a seed in a texture that a larger ROI
# already covers is starved to a patch or two, which is no region to ask about.
MIN_ROI_FRACTION = 0.02
MIN_ROI_PATCHES = 2
# Largest number of patches of one tissue piece that k-means++ seeding looks at.
_MAX_SEEDING_PATCHES = 20000
# Mask pixels per patch edge when tracing an ROI outline.
_OUTLINE_UPSAMPLE = 4


@dataclass(frozen=True)
class ROI:
    """One grown region and its geometry (level-0 pixels unless stated)."""

    id: str
    patch_index: np.ndarray  # rows of the slide's feature file, sorted
    seed_index: int
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    centre: tuple[float, float]
    area_mm2: float
    tissue_area_mm2: float
    cohesion: float  # mean cosine of the members to the ROI mean (standardised features)
    polygon: list[list[float]] | None = None

    @property
    def n_patches(self) -> int:
        return int(len(self.patch_index))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready geometry, in the viewer's ROI format plus the richer fields."""
        out: dict[str, Any] = {
            "id": self.id,
            "bbox": list(self.bbox),
            "n_patches": self.n_patches,
            "patch_index": self.patch_index.tolist(),
            "seed_index": self.seed_index,
            "centroid": [round(v, 1) for v in self.centroid],
            "centre": [round(v, 1) for v in self.centre],
            "area_mm2": round(self.area_mm2, 5),
            "tissue_area_mm2": round(self.tissue_area_mm2, 5),
            "cohesion": round(self.cohesion, 4),
        }
        if self.polygon is not None:
            out["polygon"] = self.polygon
        return out


def neighbour_graph(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges between 8-neighbouring patches as two index arrays ``(src, dst)``.

    ``grid`` is (N, 2) integer (col, row); each undirected edge is listed once.
    """
    grid = np.asarray(grid, dtype=np.int64).reshape(-1, 2)
    n = len(grid)
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if len(np.unique(grid, axis=0)) != n:
        raise ValueError("patch grid has duplicate (col, row) cells; the feature file is inconsistent")
    lo = grid.min(0)
    g = grid - lo + 1  # one cell of padding so every neighbour lookup stays in range
    width, height = int(g[:, 0].max()) + 2, int(g[:, 1].max()) + 2
    lookup = np.full((height, width), -1, dtype=np.int64)
    lookup[g[:, 1], g[:, 0]] = np.arange(n)
    src, dst = [], []
    for dc, dr in _HALF_NEIGHBOURS:
        other = lookup[g[:, 1] + dr, g[:, 0] + dc]
        keep = other >= 0
        src.append(np.nonzero(keep)[0])
        dst.append(other[keep])
    return np.concatenate(src), np.concatenate(dst)


def normalise_features(features: np.ndarray) -> np.ndarray:
    """Per-slide z-score per dimension, then unit L2 norm per patch (see module doc).

    float32 (with float64 moments): a 100k-patch slide stays at a few hundred MB.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values; re-run `slidevl preprocess` for this slide")
    mean = x.mean(0, dtype=np.float64).astype(np.float32)
    sd = x.std(0, dtype=np.float64)
    x = (x - mean) * (1.0 / np.where(sd > 0, sd, 1.0)).astype(np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    # A patch at the slide mean has no direction; it gets a zero vector and so a
    # cosine of 0 to everything, which only makes it join whichever ROI reaches it.
    return x / np.where(norm > 0, norm, np.float32(1.0))


def choose_seeds(unit: np.ndarray, component: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Seed patch indices: at least one per connected piece, ``max(k, pieces)`` in all."""
    n_comp = int(component.max()) + 1 if len(component) else 0
    sizes = np.bincount(component, minlength=n_comp)
    total = min(max(k, n_comp), len(unit))
    # One seed per piece, the rest by largest remainder in proportion to size.
    extra = total - n_comp
    alloc = np.ones(n_comp, dtype=np.int64)
    if extra > 0:
        share = extra * sizes / sizes.sum()
        alloc += np.floor(share).astype(np.int64)
        left = extra - int(np.floor(share).sum())
        order = np.lexsort((np.arange(n_comp), -(share - np.floor(share))))
        alloc[order[:left]] += 1
        alloc = np.minimum(alloc, sizes)
        # Capping at a piece's size can leave seeds unplaced; give them to pieces with room.
        while alloc.sum() < total:
            room = np.nonzero(alloc < sizes)[0]
            alloc[room[np.argmax(sizes[room] - alloc[room])]] += 1
    seeds: list[int] = []
    for c in range(n_comp):
        members = np.nonzero(component == c)[0]
        if alloc[c] == 1 and len(members) == 1:
            seeds.append(int(members[0]))
            continue
        if len(members) > _MAX_SEEDING_PATCHES:
            # k-means++ costs O(n k D) in float64; a deterministic sample of a big piece places seeds as well.
            pick = np.random.default_rng([seed, c]).choice(len(members), _MAX_SEEDING_PATCHES, replace=False)
            members = members[np.sort(pick)]
        _, local = kmeans_plusplus(unit[members].astype(np.float64), n_clusters=int(alloc[c]), random_state=seed + c)
        seeds.extend(int(members[i]) for i in local)
    return np.asarray(sorted(seeds), dtype=np.int64)


def _adjacency(n: int, src: np.ndarray, dst: np.ndarray) -> sparse.csr_matrix:
    adj = sparse.coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n)).tocsr()
    return (adj + adj.T).tocsr()


def grow_prim(unit: np.ndarray, src: np.ndarray, dst: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Best-first growth from ``seeds`` by cosine to the current ROI mean; returns labels."""
    n = len(unit)
    adj = _adjacency(n, src, dst)
    indptr, indices = adj.indptr, adj.indices
    label = np.full(n, -1, dtype=np.int64)
    sums = unit[seeds].copy()
    norms = np.linalg.norm(sums, axis=1)
    heap: list[tuple[float, int, int]] = []

    def push_neighbours(patch: int, roi: int) -> None:
        nbrs = indices[indptr[patch] : indptr[patch + 1]]
        nbrs = nbrs[label[nbrs] < 0]
        if len(nbrs) == 0:
            return
        norm = norms[roi]
        sims = unit[nbrs] @ sums[roi] / norm if norm > 0 else np.zeros(len(nbrs))
        for j, sim in zip(nbrs.tolist(), sims.tolist()):
            # Ties break on patch then ROI index, so the result never depends on heap internals.
            heapq.heappush(heap, (-sim, j, roi))

    for r, s in enumerate(seeds.tolist()):
        label[s] = r
    for r, s in enumerate(seeds.tolist()):
        push_neighbours(s, r)
    while heap:
        neg, j, r = heapq.heappop(heap)
        if label[j] >= 0:
            continue
        current = float(unit[j] @ sums[r]) / norms[r] if norms[r] > 0 else 0.0
        if current < -neg - _STALE_TOL * max(1.0, abs(neg)):
            heapq.heappush(heap, (-current, j, r))
            continue
        label[j] = r
        sums[r] += unit[j]
        norms[r] = float(np.linalg.norm(sums[r]))
        push_neighbours(j, r)
    return label


def edge_cosines(unit: np.ndarray, src: np.ndarray, dst: np.ndarray, chunk: int = 32768) -> np.ndarray:
    """Cosine of each edge's end points, in chunks so memory stays bounded on big slides."""
    out = np.empty(len(src), dtype=np.float64)
    for i in range(0, len(src), chunk):
        out[i : i + chunk] = np.einsum("ij,ij->i", unit[src[i : i + chunk]], unit[dst[i : i + chunk]])
    return out


def grow_mst(unit: np.ndarray, src: np.ndarray, dst: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Seeded cut of the minimum spanning forest on ``1 - cosine``; returns labels."""
    n = len(unit)
    # float32 cosines can exceed 1 by rounding; clip so every weight stays positive.
    weight = np.maximum(1.0 - edge_cosines(unit, src, dst), 0.0) + _EDGE_EPS
    graph = sparse.coo_matrix((weight, (src, dst)), shape=(n, n)).tocsr()
    mst = minimum_spanning_tree(graph).tocoo()
    order = np.lexsort((mst.col, mst.row, mst.data))
    rows, cols = mst.row[order].tolist(), mst.col[order].tolist()
    # Union-find on plain lists: element access on numpy arrays is ten times slower here.
    parent = list(range(n))
    owner = [-1] * n  # seed label held by a union-find root
    for r, s in enumerate(seeds.tolist()):
        owner[s] = r

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in zip(rows, cols):
        a, b = find(i), find(j)
        if a == b or (owner[a] >= 0 and owner[b] >= 0):
            continue
        parent[b] = a
        if owner[a] < 0:
            owner[a] = owner[b]
    # Point every node at its root (vectorised pointer jumping), then read the root's seed.
    root = np.asarray(parent, dtype=np.int64)
    while True:
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    return np.asarray(owner, dtype=np.int64)[root]


def merge_small(
    labels: np.ndarray, unit: np.ndarray, src: np.ndarray, dst: np.ndarray, min_patches: int
) -> np.ndarray:
    """Merge ROIs under ``min_patches`` into the adjacent ROI with the most similar mean.

    Smallest first. Merging two touching connected sets keeps them connected, and an
    ROI with no neighbour (a small tissue piece of its own) stays as it is.
    """
    labels = labels.copy()
    stuck: set[int] = set()
    while True:
        sizes = np.bincount(labels, minlength=int(labels.max()) + 1)
        small = [r for r in np.argsort(sizes, kind="stable").tolist() if 0 < sizes[r] < min_patches and r not in stuck]
        if not small:
            return labels
        r = small[0]
        ls, ld = labels[src], labels[dst]
        touching = np.unique(np.concatenate([ld[(ls == r) & (ld != r)], ls[(ld == r) & (ls != r)]]))
        if len(touching) == 0:
            stuck.add(r)
            continue
        mean = unit[labels == r].mean(0)
        sims = []
        for t in touching.tolist():
            other = unit[labels == t].mean(0)
            denom = float(np.linalg.norm(mean) * np.linalg.norm(other))
            sims.append(float(mean @ other) / denom if denom > 0 else 0.0)
        labels[labels == r] = int(touching[int(np.argmax(sims))])


def patch_boxes(sf: SlideFeatures) -> np.ndarray:
    """(N, 4) level-0 boxes of the patches of a feature file.

    Patch edges follow the grid's rule ``round(i * step)`` so adjacent patches share
    an edge; files without a grid step fall back to ``coords + step``.
    """
    step = patch_step(sf)
    grid = np.asarray(sf.patch_grid, dtype=np.int64)
    coords = np.asarray(sf.patch_coords, dtype=np.int64)
    lo = np.rint(grid * step).astype(np.int64)
    if np.array_equal(lo, coords):
        hi = np.rint((grid + 1) * step).astype(np.int64)
    else:  # imported files: coords are not on a lattice anchored at (0, 0)
        lo, hi = coords, coords + int(round(step))
    return np.concatenate([lo, hi], axis=1)


def patch_step(sf: SlideFeatures) -> float:
    """Level-0 pixels per patch edge, as preprocess recorded it."""
    step = sf.attrs.get("patch_size_level0")
    if step is None or not float(step) > 0:
        raise ValueError(
            f"slide {sf.slide_id}: feature file has no 'patch_size_level0' attribute; re-run `slidevl preprocess` "
            "or import the features with `slidevl features import --patch-size-level0 ...`"
        )
    return float(step)


def slide_mpp(sf: SlideFeatures) -> float:
    """The slide's own µm per level-0 pixel, as resolved when the features were made."""
    mpp = sf.attrs.get("mpp")
    if mpp is None or not float(mpp) > 0:
        raise ValueError(
            f"slide {sf.slide_id}: feature file records no mpp; re-run `slidevl preprocess` with --mpp-override "
            "or --mpp-csv so the physical scale is known"
        )
    return float(mpp)


def grow_rois(
    sf: SlideFeatures,
    k: int = 4,
    *,
    seed: int = 0,
    method: str = "prim",
    min_fraction: float = MIN_ROI_FRACTION,
    outline: bool = True,
) -> list[ROI]:
    """Grow ROIs over the tissue patches of ``sf`` (see the module docstring).

    Returns ROIs ``R1..Rm`` ordered by size (largest first, ties by first patch); every
    patch belongs to exactly one of them, and each is 8-connected.
    """
    if sf.n_patches == 0:
        raise ValueError(f"slide {sf.slide_id}: the feature file has no patches, so no ROI can be grown")
    unit = normalise_features(sf.patch_features)
    labels, seeds = _grow(unit, sf.patch_grid, k, seed, method, min_fraction)
    return describe_rois(sf, labels, seeds, unit=unit, outline=outline)


def roi_labels(
    features: np.ndarray,
    grid: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    method: str = "prim",
    min_fraction: float = MIN_ROI_FRACTION,
) -> tuple[np.ndarray, np.ndarray]:
    """ROI label per patch (0..m-1) and the seed patch of each label, from features and (col, row) grid."""
    return _grow(normalise_features(features), grid, k, seed, method, min_fraction)


def _grow(
    unit: np.ndarray, grid: np.ndarray, k: int, seed: int, method: str, min_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    if method not in METHODS:
        raise ValueError(f"ROI method {method!r} is not one of {', '.join(METHODS)}")
    if k < 1:
        raise ValueError(f"the number of ROIs must be >= 1, got {k}")
    if not 0.0 <= min_fraction < 1.0:
        raise ValueError(f"min_fraction must lie in [0, 1), got {min_fraction}")
    if len(unit) != len(grid):
        raise ValueError(f"{len(unit)} feature rows but {len(grid)} grid cells")
    src, dst = neighbour_graph(grid)
    n = len(unit)
    graph = sparse.coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    seeds = choose_seeds(unit, component, k, seed)
    grow = grow_prim if method == "prim" else grow_mst
    labels = grow(unit, src, dst, seeds)
    if (labels < 0).any():  # every piece has a seed, so growth must reach every patch
        raise RuntimeError("ROI growth left patches unassigned; this is a bug")
    if min_fraction > 0:
        labels = merge_small(labels, unit, src, dst, max(MIN_ROI_PATCHES, int(np.ceil(min_fraction * n))))
    # Renumber the surviving labels 0..m-1 in seed order and keep their seeds.
    kept = np.unique(labels)
    renumber = np.full(len(seeds), -1, dtype=np.int64)
    renumber[kept] = np.arange(len(kept))
    return renumber[labels], seeds[kept]


def describe_rois(
    sf: SlideFeatures, labels: np.ndarray, seeds: np.ndarray, *, unit: np.ndarray | None = None, outline: bool = True
) -> list[ROI]:
    """Geometry of each labelled group of patches, as :class:`ROI` objects ``R1..Rm``.

    ``seeds[r]`` is the seed patch of label ``r``; ``unit`` the normalised features
    (computed from ``sf`` when not given).
    """
    boxes = patch_boxes(sf)
    mpp = slide_mpp(sf)
    step = patch_step(sf)
    patch_mm2 = (step * mpp / 1000.0) ** 2
    unit = normalise_features(sf.patch_features) if unit is None else unit
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    groups = [(r, np.nonzero(labels == r)[0]) for r in range(int(labels.max()) + 1)]
    groups = [(r, g) for r, g in groups if len(g)]
    groups.sort(key=lambda item: (-len(item[1]), int(item[1][0])))
    rois = []
    for i, (label, members) in enumerate(groups, start=1):
        centroid = centres[members].mean(0)
        nearest = members[int(np.argmin(((centres[members] - centroid) ** 2).sum(1)))]
        mean = unit[members].mean(0)
        norm = float(np.linalg.norm(mean))
        cohesion = float((unit[members] @ mean).mean() / norm) if norm > 0 else 0.0
        rois.append(
            ROI(
                id=f"R{i}",
                patch_index=members.astype(np.int64),
                seed_index=int(seeds[label]),
                bbox=(
                    int(boxes[members, 0].min()),
                    int(boxes[members, 1].min()),
                    int(boxes[members, 2].max()),
                    int(boxes[members, 3].max()),
                ),
                centroid=(float(centroid[0]), float(centroid[1])),
                centre=(float(centres[nearest, 0]), float(centres[nearest, 1])),
                area_mm2=float(len(members) * patch_mm2),
                tissue_area_mm2=float(np.asarray(sf.patch_tissue, np.float64)[members].sum() * patch_mm2),
                cohesion=cohesion,
                polygon=_outline(sf.patch_grid[members], step) if outline else None,
            )
        )
    return rois


def _outline(grid: np.ndarray, step: float) -> list[list[float]] | None:
    # The patch cells of one ROI as a mask on the patch lattice, traced by the same
    # code that outlines tissue for the viewer. Each patch is drawn as a block of
    # pixels so that the tracer's simplification (under a mask pixel) keeps corners.
    grid = np.asarray(grid, dtype=np.int64)
    lo = grid.min(0)
    mask = np.zeros((int(grid[:, 1].max() - lo[1]) + 1, int(grid[:, 0].max() - lo[0]) + 1), dtype=bool)
    mask[grid[:, 1] - lo[1], grid[:, 0] - lo[0]] = True
    mask = np.kron(mask, np.ones((_OUTLINE_UPSAMPLE, _OUTLINE_UPSAMPLE), dtype=bool))
    scale = step / _OUTLINE_UPSAMPLE
    polygons = mask_polygons(
        TissueMask(mask=mask, scale_x=scale, scale_y=scale, threshold=0.0, level=0, params=TissueParams())
    )
    if not polygons:
        return None
    outer = max(polygons, key=lambda rings: len(rings[0]))[0]
    outer = outer + lo * step
    return np.round(outer, 1).tolist()


