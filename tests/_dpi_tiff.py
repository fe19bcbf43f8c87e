"""One-level tiled TIFFs with chosen resolution tags (what scanners, exporters and image editors
write), for the µm/px plausibility tests: a pink tissue disc on white, so that a slide planned
with a sensible µm/px has tiles."""
from __future__ import annotations

import cv2
import numpy as np
import tifffile


def write_dpi_tiff(path, resolution: float | None, unit: str = "INCH", size: int = 2048,
                   description: str | None = None) -> str:
    """`size`² px, tiles of 256; `resolution` px per `unit` (INCH, CENTIMETER or NONE) in the
    XResolution/YResolution tags (None: tifffile writes none). `description` becomes the
    ImageDescription (e.g. an Aperio header, which OpenSlide reads instead of the tags)."""
    img = np.full((size, size, 3), 240, np.uint8)
    cv2.circle(img, (size // 2, size // 2), size * 3 // 8, (228, 156, 196), cv2.FILLED)
    kw = {} if resolution is None else {"resolution": (resolution, resolution), "resolutionunit": unit}
    tifffile.imwrite(path, img, photometric="rgb", tile=(256, 256), compression="jpeg",
                     description=description, metadata=None, **kw)
    return str(path)
