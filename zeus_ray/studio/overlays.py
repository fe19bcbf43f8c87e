"""Overlay pictures for the viewer (pure functions): the mask, a class's similarity heat-map and
outlines (ground truth, tissue), as RGBA PNGs with transparent background, in the report's colours.

An overlay is one picture laid over the whole slide from its top-left corner; `px0` says how many
level-0 px one of its pixels covers (the viewer scales it, without smoothing)."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..results.export import PRED_RGB, TISSUE_RGB, TRUTH_RGB

MAX_OUTLINE_SIDE = 4096   # outlines are drawn on an upsampled grid; its long side stays below this
HEAT_COLORMAP = cv2.COLORMAP_JET   # as the report's heat-maps (results/export.similarity_heatmap)


@dataclass(frozen=True)
class Overlay:
    png: bytes
    px0: float            # level-0 px per overlay pixel
    width: int
    height: int
    legend: dict

    def meta(self) -> dict:
        return {"px0": self.px0, "width": self.width, "height": self.height, "legend": self.legend}


def rgba_png(rgba: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgba), cv2.COLOR_RGBA2BGRA),
                           [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("overlay could not be encoded as PNG")
    return buf.tobytes()


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % tuple(int(c) for c in rgb)


def mask_overlay(tumour: np.ndarray, cell0: float) -> Overlay:
    """The tumour mask (cell grid) filled in the prediction colour."""
    m = np.asarray(tumour, bool)
    rgba = np.zeros(m.shape + (4,), np.uint8)
    rgba[m] = (*PRED_RGB, 255)
    return Overlay(rgba_png(rgba), float(cell0), m.shape[1], m.shape[0],
                   {"kind": "fill", "color": _hex(PRED_RGB), "label": "predicted tumour"})


def heat_overlay(values: np.ndarray, tissue: np.ndarray, cell0: float, label: str) -> Overlay:
    """A class map coloured with the report's colormap over tissue (transparent elsewhere); the
    range is the map's min/max inside tissue, given in the legend."""
    v = np.asarray(values, np.float32)
    ok = np.asarray(tissue, bool) & np.isfinite(v)
    lo, hi = (float(v[ok].min()), float(v[ok].max())) if ok.any() else (0.0, 1.0)
    idx = np.clip((np.nan_to_num(v, nan=lo) - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255).astype(np.uint8)
    rgb = cv2.applyColorMap(idx, HEAT_COLORMAP)[..., ::-1]
    rgba = np.dstack([rgb, np.where(ok, 255, 0).astype(np.uint8)])
    stops = cv2.applyColorMap(np.linspace(0, 255, 5).astype(np.uint8)[None], HEAT_COLORMAP)[0, :, ::-1]
    return Overlay(rgba_png(rgba), float(cell0), v.shape[1], v.shape[0],
                   {"kind": "ramp", "colors": [_hex(c) for c in stops], "min": lo, "max": hi, "label": label})


def outline_overlay(mask: np.ndarray, px0: float, rgb, label: str, thickness: int = 2) -> Overlay:
    """The contours of a boolean mask (`px0` level-0 px per mask pixel), drawn on a grid upsampled
    so that the line is thin against the mask's pixels."""
    m = np.asarray(mask, bool)
    k = max(1, min(8, MAX_OUTLINE_SIDE // max(m.shape)))
    big = cv2.resize(m.view(np.uint8), (m.shape[1] * k, m.shape[0] * k), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(big, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    rgba = np.zeros(big.shape + (4,), np.uint8)
    cv2.drawContours(rgba, contours, -1, (*[int(c) for c in rgb], 255), thickness)
    return Overlay(rgba_png(rgba), float(px0) / k, big.shape[1], big.shape[0],
                   {"kind": "line", "color": _hex(rgb), "label": label})


def truth_overlay(truth: np.ndarray, px0: float) -> Overlay:
    return outline_overlay(truth, px0, TRUTH_RGB, "ground truth")


def tissue_overlay(tissue: np.ndarray, px0: float) -> Overlay:
    return outline_overlay(tissue, px0, TISSUE_RGB, "tissue")
