"""Where the page's files live: our own static folder and the npm-installed OpenSeadragon.

OpenSeadragon comes from the ``openseadragon`` npm package (``npm ci`` at the repository
root) and is served by the app itself, so the viewer works offline and loads nothing from
a CDN. ``SLIDEVL_OPENSEADRAGON`` may point at another copy of its ``build/openseadragon``
folder.
"""

from __future__ import annotations

import os
from pathlib import Path

STATIC_DIR = Path(__file__).with_name("static")
OSD_ENV = "SLIDEVL_OPENSEADRAGON"
_OSD_REL = Path("node_modules/openseadragon/build/openseadragon")
OSD_SCRIPT = "openseadragon.min.js"
OSD_MISSING = ("OpenSeadragon is not installed: run `npm ci` in the slidevl repository root "
               f"(or set {OSD_ENV} to a folder holding {OSD_SCRIPT} and images/)")


def find_openseadragon() -> Path | None:
    """The folder holding ``openseadragon.min.js`` and ``images/``, or None."""
    env = os.environ.get(OSD_ENV)
    candidates = [Path(env)] if env else []
    # An editable install runs from the checkout, whose root holds node_modules/.
    candidates += [parent / _OSD_REL for parent in Path(__file__).resolve().parents]
    candidates.append(Path.cwd() / _OSD_REL)
    for folder in candidates:
        if (folder / OSD_SCRIPT).is_file():
            return folder
    return None
