"""Seamlessly tiling H&E texture banks, one per tissue class (and per tumour grade).

A bank is a square torus of hematoxylin and eosin densities (``uint8``) at level-0
resolution (0.5 µm/px). It is built once per cohort with vectorised numpy (Worley
cells for cells and nuclei, Fourier-filtered noise for fibres and mottling); slides
then sample it at a random offset and flip with wrap-around, which costs a memory copy
per pixel. That is what makes rendering fast enough for 40k px slides, and the
per-slide offset, flip and stain keep slides from looking alike.

Sizes are physical: 1 µm = 2 px. Lymphocyte nuclei are about 7 µm across, tumour
nuclei 8 µm (grade 1) to 12-20 µm (grade 3, pleomorphic), adipocytes about 70 µm.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .classes import FAT, LYMPHOCYTES, NECROSIS, STROMA, TUMOUR
from .noise import Worley, periodic_noise, periodic_worley


@dataclass(frozen=True)
class Texture:
    """One periodic texture bank: hematoxylin and eosin planes of shape (size, size)."""

    name: str
    h: np.ndarray
    e: np.ndarray

    @property
    def size(self) -> int:
        return int(self.h.shape[0])

    def window(self, y0: int, x0: int, height: int, width: int, flip_y: bool = False, flip_x: bool = False):
        """The (h, e) planes of the window at (y0, x0) of the infinitely tiled bank.

        Flips mirror the whole infinite tiling, so neighbouring windows still join.
        """
        p = self.size
        rows = np.arange(y0, y0 + height) % p
        cols = np.arange(x0, x0 + width) % p
        if flip_y:
            rows = p - 1 - rows
        if flip_x:
            cols = p - 1 - cols
        h = np.take(np.take(self.h, rows, axis=0), cols, axis=1)
        e = np.take(np.take(self.e, rows, axis=0), cols, axis=1)
        return h, e


@dataclass(frozen=True)
class _Nuclei:
    """Per-seed nucleus attributes for :func:`_nuclei`."""

    present: np.ndarray  # bool
    radius: np.ndarray  # px, radius of the equal-area circle
    aspect: np.ndarray  # >= 1, long / short axis
    angle: np.ndarray  # radians, long-axis direction
    irregular: np.ndarray  # amplitude of the boundary harmonics
    density: np.ndarray  # hematoxylin density 0-1


def _nuclei(cells: Worley, att: _Nuclei, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (0-1, anti-aliased) and normalised radius (0 centre, 1 rim) of nuclei.

    A nucleus is an ellipse around its cell's seed whose radius is modulated by the
    2nd-4th angular harmonics with random phases, so irregularity grows smoothly with
    ``att.irregular``; the Voronoi wall clips crowded nuclei as neighbours squash them.
    """
    n = len(cells.seeds)
    phases = rng.uniform(0, 2 * np.pi, (3, n)).astype(np.float32)
    amps = (att.irregular[None, :] * rng.uniform(0.4, 1.0, (3, n))).astype(np.float32)
    i = cells.id1
    ang = att.angle[i]
    ca, sa = np.cos(ang), np.sin(ang)
    u = cells.dx * ca + cells.dy * sa
    v = -cells.dx * sa + cells.dy * ca
    s = np.sqrt(att.aspect[i])
    rho = np.sqrt((u / s) ** 2 + (v * s) ** 2)
    theta = np.arctan2(v, u)
    r = att.radius[i] * (
        1.0
        + amps[0][i] * np.cos(2 * theta + phases[0][i])
        + amps[1][i] * np.cos(3 * theta + phases[1][i])
        + amps[2][i] * np.cos(4 * theta + phases[2][i])
    )
    r = np.maximum(r, 0.5)
    cover = np.clip(r - rho + 0.5, 0.0, 1.0) * att.present[i]
    # Squashed against the cell wall: fade the last pixel so walls do not look cut.
    cover *= np.clip(cells.gap - 0.3, 0.0, 1.0)
    return cover.astype(np.float32), (rho / r).astype(np.float32)


def _to_u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def _grade_params(grade: int) -> dict[str, float]:
    # Nottingham-style: higher grade = bigger, more variable, darker and more irregular
    # nuclei with nucleoli, fewer gland lumens (tubules), larger solid nests.
    return {
        1: dict(
            cell=30.0,
            r=7.0,
            r_sd=0.7,
            aspect=0.25,
            irregular=0.03,
            dens=0.50,
            dens_sd=0.05,
            nucleoli=0.10,
            lumen_p=0.55,
            nest=260.0,
            cyto=0.40,
        ),
        2: dict(
            cell=34.0,
            r=9.0,
            r_sd=1.5,
            aspect=0.45,
            irregular=0.08,
            dens=0.60,
            dens_sd=0.09,
            nucleoli=0.40,
            lumen_p=0.22,
            nest=360.0,
            cyto=0.36,
        ),
        3: dict(
            cell=38.0,
            r=11.5,
            r_sd=2.8,
            aspect=0.7,
            irregular=0.15,
            dens=0.70,
            dens_sd=0.13,
            nucleoli=0.75,
            lumen_p=0.0,
            nest=520.0,
            cyto=0.32,
        ),
    }[grade]


def _tumour(size: int, grade: int, rng: np.random.Generator) -> Texture:
    g = _grade_params(grade)
    cells = periodic_worley(size, g["cell"], rng, jitter=0.8)
    n = len(cells.seeds)

    # Architecture: nests of tumour cells separated by thin fibrous septa, and (for
    # low grades) round gland lumens lined by a ring of cells.
    # (The helper Worley structures are dropped as soon as they are used: each holds
    # seven full-size planes.)
    nests = periodic_worley(size, g["nest"], rng, jitter=0.9)
    septum_w = 2.0 + 3.0 * rng.random(len(nests.seeds)).astype(np.float32)
    septum = np.clip(septum_w[nests.id1] - nests.gap, 0.0, 1.0)
    del nests
    lumens = periodic_worley(size, 3.0 * g["cell"], rng, jitter=0.7)
    nl = len(lumens.seeds)
    lumen_r = np.where(rng.random(nl) < g["lumen_p"], rng.uniform(8, 22, nl), 0.0).astype(np.float32)
    lumen_dist = lumens.f1 - lumen_r[lumens.id1]
    has_lumen = lumen_r[lumens.id1] > 0
    lumen = np.clip(0.5 - lumen_dist, 0.0, 1.0) * has_lumen
    del lumens

    # A cell keeps its nucleus unless its seed falls in a lumen or a septum.
    sx = np.clip(cells.seeds[:, 0].astype(np.int64), 0, size - 1)
    sy = np.clip(cells.seeds[:, 1].astype(np.int64), 0, size - 1)
    seed_free = (lumen[sy, sx] < 0.5) & (septum[sy, sx] < 0.5) & (lumen_dist[sy, sx] > 3.0)
    radius = np.clip(rng.normal(g["r"], g["r_sd"], n), 4.5, 21.0).astype(np.float32)
    att = _Nuclei(
        present=(seed_free & (rng.random(n) < 0.93)).astype(np.float32),
        radius=radius,
        aspect=(1.0 + rng.exponential(g["aspect"], n)).clip(1.0, 2.6).astype(np.float32),
        angle=rng.uniform(0, np.pi, n).astype(np.float32),
        irregular=(g["irregular"] * rng.uniform(0.5, 1.5, n)).astype(np.float32),
        density=np.clip(rng.normal(g["dens"], g["dens_sd"], n), 0.3, 0.97).astype(np.float32),
    )
    cover, rr = _nuclei(cells, att, rng)

    chromatin = periodic_noise(size, rng, sigma=1.2)
    coarse = 0.10 + 0.08 * (grade - 1)  # coarse, clumped chromatin in high grade
    nuc_h = att.density[cells.id1] * (1.0 + coarse * chromatin + 0.18 * np.clip(rr - 0.75, 0, 1) / 0.25)
    # Nucleoli: a dark dot off-centre in a fraction of the nuclei.
    has_nucleolus = rng.random(n) < g["nucleoli"]
    off = rng.normal(0, 0.25, (2, n)).astype(np.float32) * radius
    nr = (1.2 + 0.9 * (grade - 1) * rng.random(n)).astype(np.float32)
    dn = np.hypot(cells.dx - off[0][cells.id1], cells.dy - off[1][cells.id1])
    nucleolus = np.clip(nr[cells.id1] - dn + 0.5, 0, 1) * has_nucleolus[cells.id1]
    nuc_h = nuc_h + 0.25 * nucleolus

    mottle = periodic_noise(size, rng, sigma=6.0)
    cyto_e = g["cyto"] + 0.05 * mottle + 0.10 * np.clip(1.2 - cells.gap, 0, 1)  # faint cell borders
    cyto_h = 0.07 + 0.02 * mottle

    fibres = periodic_noise(size, rng, sigma=10.0, sigma_across=1.5, angle=rng.uniform(0, np.pi))
    sept_e = 0.58 + 0.15 * fibres
    h = cyto_h * (1 - cover) + nuc_h * cover
    e = cyto_e * (1 - cover) + (0.12 + 0.1 * nucleolus) * cover
    # Lumen rim: apical cytoplasm slightly denser; lumen itself nearly empty.
    rim = np.clip(1.0 - np.abs(lumen_dist - 2.0) / 2.5, 0, 1) * has_lumen
    e = e + 0.12 * rim
    e = e * (1 - lumen) + 0.04 * lumen
    h = h * (1 - lumen)
    h = h * (1 - septum) + 0.05 * septum
    e = e * (1 - septum) + sept_e * septum
    return Texture(f"tumour_g{grade}", _to_u8(h), _to_u8(e))


def _orientation_blend(
    size: int, rng: np.random.Generator, sigma: float, across: float
) -> tuple[np.ndarray, np.ndarray]:
    """Fibre noise whose direction follows a smooth orientation field.

    Eight anisotropic noises at 22.5 degree steps are blended with weights peaked
    around the local orientation, so fibres bend gradually like collagen bundles.
    Returns the fibre noise (unit variance) and the orientation field (radians).
    """
    theta = (np.pi / 2) * periodic_noise(size, rng, sigma=220.0)
    acc = np.zeros((size, size), np.float32)
    wsum = np.zeros((size, size), np.float32)
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    for k in range(8):
        ang = k * np.pi / 8
        # cos(theta - ang)^8 by angle addition and repeated squaring (no per-angle cos).
        w = cos_t * np.float32(np.cos(ang)) + sin_t * np.float32(np.sin(ang))
        w *= w
        w *= w
        w *= w
        acc += w * periodic_noise(size, rng, sigma=sigma, sigma_across=across, angle=ang)
        wsum += w
    fib = acc / np.maximum(wsum, 1e-6)
    return fib / max(float(fib.std()), 1e-6), theta


def _stroma(size: int, rng: np.random.Generator) -> Texture:
    fib, theta = _orientation_blend(size, rng, sigma=40.0, across=2.0)
    wavy = periodic_noise(size, rng, sigma=60.0)
    e = 0.50 + 0.14 * fib + 0.06 * wavy
    # Clefts: pale gaps between collagen bundles.
    e = np.where(fib < -1.5, 0.12 + 0.2 * (fib + 2.5).clip(0, 1), e)
    h = 0.03 + 0.015 * periodic_noise(size, rng, sigma=8.0)

    # Sparse spindle-shaped fibroblast nuclei aligned with the local fibres, and a few
    # scattered lymphocytes.
    cells = periodic_worley(size, 58.0, rng, jitter=0.9)
    n = len(cells.seeds)
    sx = np.clip(cells.seeds[:, 0].astype(np.int64), 0, size - 1)
    sy = np.clip(cells.seeds[:, 1].astype(np.int64), 0, size - 1)
    lymph = rng.random(n) < 0.06
    att = _Nuclei(
        present=(rng.random(n) < 0.5).astype(np.float32),
        radius=np.where(lymph, rng.uniform(5.0, 6.0, n), rng.uniform(4.5, 6.5, n)).astype(np.float32),
        aspect=np.where(lymph, 1.05, rng.uniform(3.0, 5.0, n)).astype(np.float32),
        angle=(theta[sy, sx] + rng.normal(0, 0.15, n)).astype(np.float32),
        irregular=np.full(n, 0.04, np.float32),
        density=np.where(lymph, 0.88, rng.uniform(0.6, 0.8, n)).astype(np.float32),
    )
    cover, _ = _nuclei(cells, att, rng)
    h = h * (1 - cover) + att.density[cells.id1] * cover
    e = e * (1 - cover) + 0.2 * cover
    return Texture("stroma", _to_u8(h), _to_u8(e))


def _lymphocytes(size: int, rng: np.random.Generator) -> Texture:
    cells = periodic_worley(size, 15.0, rng, jitter=0.75)
    n = len(cells.seeds)
    big = rng.random(n) < 0.05  # plasma cells / histiocytes among the lymphocytes
    att = _Nuclei(
        present=(rng.random(n) < 0.9).astype(np.float32),
        radius=np.where(big, rng.uniform(6.5, 8.0, n), rng.normal(5.3, 0.4, n)).astype(np.float32),
        aspect=(1.0 + rng.exponential(0.08, n)).astype(np.float32),
        angle=rng.uniform(0, np.pi, n).astype(np.float32),
        irregular=np.full(n, 0.03, np.float32),
        density=np.where(big, rng.uniform(0.55, 0.7, n), rng.normal(0.88, 0.04, n)).clip(0.4, 1).astype(np.float32),
    )
    cover, rr = _nuclei(cells, att, rng)
    grain = periodic_noise(size, rng, sigma=1.0)
    nuc_h = att.density[cells.id1] * (1.0 + 0.07 * grain)
    mottle = periodic_noise(size, rng, sigma=10.0)
    e_bg = 0.24 + 0.05 * mottle
    h_bg = 0.06 + 0.02 * mottle
    h = h_bg * (1 - cover) + nuc_h * cover
    e = e_bg * (1 - cover) + 0.1 * cover
    return Texture("lymphocytes", _to_u8(h), _to_u8(e))


def _necrosis(size: int, rng: np.random.Generator) -> Texture:
    coarse = periodic_noise(size, rng, sigma=24.0)
    fine = periodic_noise(size, rng, sigma=3.0)
    # Pale, smudgy pink-grey: eosin without structure and a diffuse lavender haze
    # from dissolved chromatin.
    e = 0.34 + 0.07 * coarse + 0.04 * fine
    h = 0.07 + 0.04 * periodic_noise(size, rng, sigma=14.0)
    ghosts = periodic_worley(size, 36.0, rng, jitter=0.9)
    e = e + 0.07 * np.clip(1.0 - ghosts.gap, 0, 1)  # ghost outlines of dead cells
    # Karyorrhectic debris: small, very irregular dark fragments in clusters.
    debris = periodic_worley(size, 11.0, rng, jitter=0.95)
    n = len(debris.seeds)
    cluster = periodic_noise(size, rng, sigma=30.0)
    sx = np.clip(debris.seeds[:, 0].astype(np.int64), 0, size - 1)
    sy = np.clip(debris.seeds[:, 1].astype(np.int64), 0, size - 1)
    p = 0.12 + 0.35 * (cluster[sy, sx] > 0.3)
    att = _Nuclei(
        present=(rng.random(n) < p).astype(np.float32),
        radius=rng.uniform(1.0, 3.2, n).astype(np.float32),
        aspect=rng.uniform(1.0, 2.0, n).astype(np.float32),
        angle=rng.uniform(0, np.pi, n).astype(np.float32),
        irregular=np.full(n, 0.35, np.float32),
        density=rng.uniform(0.55, 0.9, n).astype(np.float32),
    )
    cover, _ = _nuclei(debris, att, rng)
    h = h * (1 - cover) + att.density[debris.id1] * cover
    # Cracks and washed-out patches.
    e = np.where(coarse > 1.7, e * 0.45, e)
    return Texture("necrosis", _to_u8(h), _to_u8(e))


def _fat(size: int, rng: np.random.Generator) -> Texture:
    cells = periodic_worley(size, 150.0, rng, jitter=0.9)
    n = len(cells.seeds)
    width = rng.uniform(0.8, 1.6, n).astype(np.float32)
    w = 0.5 * (width[cells.id1] + width[cells.id2])
    membrane = np.clip(w - cells.gap + 0.5, 0, 1)
    # Occasional breaks in the membrane, as seen where the section tears.
    membrane *= np.clip(periodic_noise(size, rng, sigma=12.0) + 2.2, 0, 1)
    e = 0.02 + 0.55 * membrane
    h = 0.05 * membrane
    # Flattened nuclei pressed against the wall of a few cells.
    small = periodic_worley(size, 90.0, rng, jitter=0.9)
    m = len(small.seeds)
    near_wall = np.clip(3.0 - cells.gap, 0, 1)
    att = _Nuclei(
        present=(rng.random(m) < 0.25).astype(np.float32),
        radius=rng.uniform(3.5, 5.0, m).astype(np.float32),
        aspect=rng.uniform(3.0, 4.5, m).astype(np.float32),
        angle=rng.uniform(0, np.pi, m).astype(np.float32),
        irregular=np.full(m, 0.05, np.float32),
        density=rng.uniform(0.55, 0.75, m).astype(np.float32),
    )
    cover, _ = _nuclei(small, att, rng)
    cover = cover * near_wall
    h = h * (1 - cover) + att.density[small.id1] * cover
    return Texture("fat", _to_u8(h), _to_u8(e))


@functools.lru_cache(maxsize=16)
def texture_bank(kind: int, grade: int, seed: int, size: int = 2048) -> Texture:
    """The texture bank of class ``kind`` (tumour banks per ``grade`` 1-3).

    Deterministic in (kind, grade, seed, size) and cached, since building a bank takes
    about a second and every slide of a cohort shares them.
    """
    if size < 256:
        raise ValueError(f"texture bank size must be >= 256 px, got {size}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919, kind, grade, size]))
    if kind == TUMOUR:
        if grade not in (1, 2, 3):
            raise ValueError(f"tumour grade must be 1, 2 or 3, got {grade}")
        return _tumour(size, grade, rng)
    builders = {STROMA: _stroma, LYMPHOCYTES: _lymphocytes, NECROSIS: _necrosis, FAT: _fat}
    if kind not in builders:
        raise ValueError(f"no texture bank for class index {kind}")
    return builders[kind](size, rng)


def clear_texture_cache() -> None:
    """Drop cached banks (frees memory; the next slide rebuilds what it needs)."""
    texture_bank.cache_clear()
