"""Ground-truth annotations → the tumour region in level-0 px, and its raster on the cell grid.

Formats (sniffed from the content first, the extension second):
- QuPath GeoJSON: a FeatureCollection, one Feature, a bare list of Features (older QuPath exports)
  or a bare geometry; Polygon/MultiPolygon with holes. Only `objectType: "annotation"` features
  (or features without an objectType) count; detections and cells are skipped. The class is
  `properties.classification.name` (also `.names`, or a plain string in older exports).
- ASAP XML: `<ASAP_Annotations>`; the class is the annotation's `PartOfGroup` and every group above it
  in `<AnnotationGroups>`. ASAP has no holes: they are exclusion groups (CAMELYON16's `_2`).
- Aperio ImageScope XML: `<Annotations>`; the class is the layer's `Name`. Within one layer the regions
  with `NegativeROA="1"` are subtracted from the union of its positive regions; layers are then
  united (an island inside a hole therefore belongs in its own layer, as ImageScope draws it).
- Mask images (PNG/TIFF/...): nonzero = tumour (or, when `tumour_classes` holds integers, those label
  values), at a stated downsample (level-0 px per mask px) or µm/px (with the slide's mpp0). A
  pyramidal TIFF mask is read at its largest level of at most 2^26 px (scale adjusted).

Each region is tumour, cut out or left out by its class (annotation_classes.py: tumour vocabulary,
exclusion vocabulary, explicit class lists). Tumour regions are united; an exclusion region is cut out
of every tumour region except those lying entirely inside it, so a tumour island drawn in an ASAP
exclusion (a hole) stays tumour, as the same lesion drawn with a real hole and an island in QuPath.
(ASAP's own mask conversion paints `_2` last and would erase such an island.)

Sampling rule, used for polygons and mask images alike: cell (i, j) of the cell grid covers level-0
[j*cell0, (j+1)*cell0) × [i*cell0, (i+1)*cell0) and is tumour when its centre ((j+.5)*cell0,
(i+.5)*cell0) lies inside the region (a mask image is sampled at that point, nearest pixel).
"""
from __future__ import annotations

import io
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import cv2
import numpy as np
import shapely
import shapely.affinity
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry import shape as geo_shape
from shapely.geometry.base import BaseGeometry

from .classes import EXCLUDE, OTHER, TUMOUR, ClassRules, class_rules, is_placeholder
from ..errors import AnnotationError

log = logging.getLogger(__name__)

_GEOMETRY_TYPES = {"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon",
                   "GeometryCollection"}
_IMAGE_MAGIC = (b"\x89PNG", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"\xff\xd8\xff", b"BM")
_IMAGE_EXT = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}


@dataclass(frozen=True)
class Annotation:
    """Tumour ground truth of one slide.

    `geometry`: polygonal tumour region in level-0 px (possibly empty) for vector formats; None for
    a mask image, which is kept as `mask` (bool) with `downsample` level-0 px per mask pixel.
    `classes`: every class name seen in the file (for messages and reports); `tumour`, `excluded`
    and `left_out`: the classes counted as tumour, cut out, and neither (ASAP: "group / subgroup").
    """
    source: str
    geometry: BaseGeometry | None = None
    mask: np.ndarray | None = None
    downsample: float | None = None
    classes: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()
    tumour: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "mask" if self.mask is not None else "polygons"


def _fail(src: str, what: str) -> AnnotationError:
    return AnnotationError(f"annotation file {src}: {what}")


def _read_bytes(src: str, storage_options: dict | None = None) -> bytes:
    from ..storage import remote  # the input.storage_options rules of every input read
    try:
        fs, path = remote.filesystem(src, storage_options)
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise _fail(src, "not found; check the path or the manifest's annotation_uri") from None
    except Exception as e:  # noqa: BLE001 - any backend error becomes one line naming the file
        raise _fail(src, f"cannot be read ({type(e).__name__}: {e})") from None


def _ext(src: str) -> str:
    return os.path.splitext(urlparse(src).path if "://" in src else src)[1].lower()


def _num(value, src: str, where: str) -> float:
    try:  # ASAP in some locales writes decimal commas ("1234,5")
        v = float(str(value).replace(",", "."))
    except (TypeError, ValueError):
        raise _fail(src, f"{where}: coordinate {value!r} is not a number") from None
    if not np.isfinite(v):
        raise _fail(src, f"{where}: coordinate {value!r} is not finite")
    return v


def _polygonal(g: BaseGeometry) -> BaseGeometry:
    """The polygonal part of a geometry (make_valid can return lines and points beside polygons)."""
    if isinstance(g, (Polygon, MultiPolygon)):
        return g
    parts = [p for p in shapely.get_parts(g) if isinstance(p, (Polygon, MultiPolygon))]
    return shapely.union_all(parts) if parts else Polygon()


def _repaired(g: BaseGeometry, src: str, where: str) -> BaseGeometry:
    if not g.is_valid:
        log.warning("annotation file %s: %s is invalid (%s); repaired with shapely.make_valid",
                    src, where, shapely.is_valid_reason(g))
        g = shapely.make_valid(g)
    return _polygonal(g)


def _ring_polygon(coords: list[tuple[float, float]], src: str, where: str) -> BaseGeometry | None:
    if len(set(coords)) < 3:
        log.warning("annotation file %s: %s has fewer than 3 distinct vertices; skipped", src, where)
        return None
    return _repaired(Polygon(coords), src, where)


def _label(names: tuple[str, ...]) -> str:
    named = [n.strip() for n in names if n and n.strip()]
    return " / ".join(reversed(named)) if named and not all(map(is_placeholder, named)) else "(unclassified)"


def _nested(tumour: list[BaseGeometry], cut: list[BaseGeometry]) -> BaseGeometry:
    """Tumour parts minus the exclusions that overlap them; a part lying entirely inside an exclusion
    is an island drawn in it (or tumour drawn on a larger excluded area) and is kept whole."""
    if not tumour:
        return Polygon()
    if not cut:
        return shapely.union_all(tumour)
    tree = shapely.STRtree(cut)
    shapely.prepare(cut)
    kept = []
    for t in tumour:
        cutters = [cut[i] for i in tree.query(t, predicate="intersects") if not cut[i].covers(t)]
        kept.append(t.difference(shapely.union_all(cutters)) if cutters else t)
    return shapely.union_all(kept)


def _finish(src: str, regions: list[tuple[BaseGeometry, tuple[str, ...]]], rules: ClassRules) -> Annotation:
    found = tuple(sorted({n for _, names in regions for n in names if n}))
    parts: dict[str, list] = {TUMOUR: [], EXCLUDE: [], OTHER: []}
    labels: dict[str, set] = {TUMOUR: set(), EXCLUDE: set(), OTHER: set()}
    for g, names in regions:
        kind = rules.kind(names)
        parts[kind].extend(shapely.get_parts(g) if kind == TUMOUR else [g])
        labels[kind].add(_label(names))
    tumour, excluded, left_out = (tuple(sorted(labels[k])) for k in (TUMOUR, EXCLUDE, OTHER))
    # the one line per slide a pathologist reads to check what was taken as the truth
    log.info("annotation file %s: classes not counted as tumour: %s; tumour: %s; cut out: %s",
             src, ", ".join(left_out) or "none", ", ".join(tumour) or "none", ", ".join(excluded) or "none")
    if regions and not tumour:
        log.warning("annotation file %s: no region has a tumour class (found %s); the slide has no true "
                    "tumour; set evaluation.tumour_classes or evaluation.tumour_terms if this is wrong",
                    src, list(found) or "no classes")
    geom = _polygonal(_nested(parts[TUMOUR], parts[EXCLUDE]))
    return Annotation(source=src, geometry=geom, classes=found, left_out=left_out, tumour=tumour,
                      excluded=excluded)


# --- QuPath GeoJSON -------------------------------------------------------------------------------

def _qupath_classes(props: dict) -> tuple[str, ...]:
    c = props.get("classification")
    if isinstance(c, str):
        return (c,)
    if isinstance(c, dict):
        if c.get("name"):
            return (str(c["name"]),)
        if isinstance(c.get("names"), list):  # derived classes, e.g. ["Tumor", "Positive"]
            return (": ".join(map(str, c["names"])),)
    return ()


def _geojson_features(obj, src: str) -> list:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        if obj.get("type") == "FeatureCollection":
            if not isinstance(obj.get("features"), list):
                raise _fail(src, "FeatureCollection without a 'features' list")
            return obj["features"]
        if obj.get("type") == "Feature" or obj.get("type") in _GEOMETRY_TYPES:
            return [obj]
    raise _fail(src, "top level is not a GeoJSON FeatureCollection, Feature, geometry or list of features")


def _parse_geojson(src: str, data: bytes, rules: ClassRules) -> Annotation:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(src, f"not valid JSON ({e})") from None
    regions, skipped = [], 0
    for k, feat in enumerate(_geojson_features(obj, src)):
        if not isinstance(feat, dict):
            raise _fail(src, f"feature {k} is not a JSON object")
        if feat.get("type") in _GEOMETRY_TYPES:
            gobj, props = feat, {}
        elif feat.get("type") == "Feature":
            gobj, props = feat.get("geometry"), feat.get("properties")
            props = props if isinstance(props, dict) else {}
        else:
            raise _fail(src, f"feature {k} has type {feat.get('type')!r}, expected 'Feature'")
        otype = str(props.get("objectType", props.get("object_type", "annotation"))).lower()
        if otype != "annotation" or gobj is None:
            skipped += 1
            continue
        try:
            g = geo_shape(gobj)
        except Exception as e:  # noqa: BLE001 - shapely raises several types for bad coordinates
            kind = gobj.get("type", "?") if isinstance(gobj, dict) else type(gobj).__name__
            raise _fail(src, f"feature {k}: bad {kind} geometry ({e})") from None
        g = _repaired(g, src, f"feature {k}")
        if g.is_empty:
            skipped += 1
            continue
        regions.append((g, _qupath_classes(props)))
    if skipped:
        log.info("annotation file %s: %d features without area or not annotations skipped", src, skipped)
    return _finish(src, regions, rules)


# --- ASAP and Aperio ImageScope XML ---------------------------------------------------------------

def _parse_asap(src: str, root, rules: ClassRules) -> Annotation:
    parent = {g.get("Name"): g.get("PartOfGroup") for g in root.iter("Group")}
    regions = []
    for k, ann in enumerate(root.iter("Annotation")):
        where = f"annotation {k} ({ann.get('Name', '')!r})"
        if (ann.get("Type") or "Polygon").lower() in {"dot", "pointset", "measurement"}:
            continue
        pts = []
        for c in ann.iter("Coordinate"):
            order = c.get("Order")
            pts.append((_num(order, src, where) if order is not None else len(pts),
                        _num(c.get("X"), src, where), _num(c.get("Y"), src, where)))
        pts.sort(key=lambda t: t[0])
        g = _ring_polygon([(x, y) for _, x, y in pts], src, where)
        if g is None or g.is_empty:
            continue
        names, group = [], ann.get("PartOfGroup")
        while group and group != "None" and group not in names:  # the group and its ancestors
            names.append(group)
            group = parent.get(group)
        regions.append((g, tuple(names)))
    return _finish(src, regions, rules)


def _parse_imagescope(src: str, root, rules: ClassRules) -> Annotation:
    regions = []
    for a, layer in enumerate(root.findall("Annotation")):
        pos, neg = [], []
        for r, reg in enumerate(layer.iter("Region")):
            where = f"layer {a} ({layer.get('Name', '')!r}) region {reg.get('Id', r)}"
            pts = [(_num(v.get("X"), src, where), _num(v.get("Y"), src, where)) for v in reg.iter("Vertex")]
            if reg.get("Type") == "2" and len(pts) >= 2:  # ellipse: stored as its bounding box corners
                (x0, y0), (x1, y1) = np.min(pts, axis=0), np.max(pts, axis=0)
                g = shapely.affinity.scale(shapely.Point(0, 0).buffer(1.0, 64), (x1 - x0) / 2, (y1 - y0) / 2,
                                           origin=(0, 0))
                g = shapely.affinity.translate(g, (x0 + x1) / 2, (y0 + y1) / 2)
            else:
                g = _ring_polygon(pts, src, where)
            if g is not None and not g.is_empty:
                (neg if reg.get("NegativeROA") == "1" else pos).append(g)
        if pos:
            g = shapely.union_all(pos)
            regions.append((_polygonal(g.difference(shapely.union_all(neg)) if neg else g),
                            (layer.get("Name") or "",)))
    return _finish(src, regions, rules)


def _parse_xml(src: str, data: bytes, rules: ClassRules) -> Annotation:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise _fail(src, f"not valid XML ({e})") from None
    tag = root.tag.rsplit("}", 1)[-1]
    if tag == "ASAP_Annotations":
        return _parse_asap(src, root, rules)
    if tag == "Annotations":
        return _parse_imagescope(src, root, rules)
    raise _fail(src, f"XML root <{tag}> is neither ASAP (<ASAP_Annotations>) nor Aperio ImageScope (<Annotations>)")


# --- mask images ----------------------------------------------------------------------------------

_MAX_MASK_PX = 1 << 26  # a pyramidal TIFF mask is read at its largest level up to this many pixels


def _decode_image(src: str, data: bytes) -> tuple[np.ndarray, float]:
    """The mask pixels and the extra downsample of the level read (1 unless a pyramid level was used)."""
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        import tifffile
        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                levels = tif.series[0].levels
                # level-0 masks of gigapixel slides (e.g. Camelyon16) do not fit in memory: take the
                # largest pyramid level that does; its extra downsample is applied to the scale
                level = next((lv for lv in levels if lv.shape[0] * lv.shape[1] <= _MAX_MASK_PX), levels[-1])
                return level.asarray(), levels[0].shape[1] / level.shape[1]
        except Exception as e:  # noqa: BLE001
            raise _fail(src, f"TIFF mask cannot be decoded ({type(e).__name__}: {e})") from None
    import cv2
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise _fail(src, "mask image cannot be decoded (corrupt or unsupported image)")
    return img, 1.0


def _parse_mask(src: str, data: bytes, tumour_classes, mpp0, mask_downsample, mask_mpp) -> Annotation:
    if mask_downsample is None:
        if mask_mpp is None or mpp0 is None:
            raise _fail(src, "a mask image needs its scale: give mask_downsample (level-0 px per mask px) "
                             "or mask_mpp together with the slide's mpp0")
        mask_downsample = float(mask_mpp) / float(mpp0)
    if not mask_downsample > 0:
        raise _fail(src, f"mask downsample must be > 0, got {mask_downsample}")
    img, level_ds = _decode_image(src, data)
    mask_downsample *= level_ds
    if img.ndim == 3:  # colour masks: any colour channel set (alpha ignored)
        img = img[..., :3].max(axis=-1) if img.shape[-1] >= 3 else img[..., 0]
    if img.ndim != 2 or img.size == 0:
        raise _fail(src, f"mask image has shape {img.shape}, expected a 2-D image")
    labels = [int(c) for c in tumour_classes or () if str(c).strip().lstrip("-").isdigit()]
    mask = np.isin(img, labels) if labels else img != 0
    values = np.unique(img)
    left_out = tuple(str(v) for v in values[:64] if v != 0 and labels and int(v) not in labels)
    if labels:
        log.info("annotation file %s: mask labels not counted as tumour: %s; tumour: %s", src,
                 ", ".join(left_out) or "none", ", ".join(map(str, labels)))
    return Annotation(source=src, mask=mask, downsample=float(mask_downsample),
                      classes=tuple(str(v) for v in values[:64]), left_out=left_out,
                      tumour=tuple(map(str, labels)) if labels else ("nonzero",))


# --- public API -----------------------------------------------------------------------------------

def read_annotation(path_or_uri, *, tumour_classes: Sequence[str] | None = None,
                    exclude_classes: Sequence[str] | None = None, tumour_terms: Sequence[str] | None = None,
                    exclude_terms: Sequence[str] | None = None, tumour_class_name: str | None = None,
                    mpp0: float | None = None, mask_downsample: float | None = None,
                    mask_mpp: float | None = None, storage_options: dict | None = None) -> Annotation:
    """Read one slide's ground truth (local path or fsspec URI: s3://, gs://, http...).

    By default unclassified annotations and classes named by `tumour_terms` (None: the defaults of
    annotation_classes.py) or by `tumour_class_name` (the prompt set's tumour class) are tumour;
    classes named by `exclude_terms` (None: `_2`, exclusion, normal, ...) are cut out; the rest is
    left out and named in one INFO line. `tumour_classes` / `exclude_classes`: exact class names
    (case-insensitive) that replace the matching vocabulary; for mask images, integer label values.
    Mask images need mask_downsample, or mask_mpp with mpp0. Raises AnnotationError (one line naming
    the file) for a missing or malformed file; repairs invalid polygons with a logged warning.
    """
    src = os.fspath(path_or_uri)
    rules = class_rules(tumour_classes, exclude_classes, tumour_terms, exclude_terms, tumour_class_name)
    data = _read_bytes(src, storage_options)   # storage_options: the config's input.storage_options
    ext = _ext(src)
    head = data[:64].lstrip(b"\xef\xbb\xbf \t\r\n")
    if data.startswith(_IMAGE_MAGIC) or (ext in _IMAGE_EXT and not head.startswith((b"{", b"[", b"<"))):
        return _parse_mask(src, data, tumour_classes, mpp0, mask_downsample, mask_mpp)
    if head.startswith((b"{", b"[")) or (ext in {".json", ".geojson"} and not head.startswith(b"<")):
        return _parse_geojson(src, data, rules)
    if head.startswith(b"<") or ext == ".xml":
        return _parse_xml(src, data, rules)
    raise _fail(src, "not a recognised annotation format (QuPath GeoJSON, ASAP XML, Aperio ImageScope XML, "
                     "or a PNG/TIFF mask image)")


def read_with_settings(path_or_uri, evaluation: dict, *, mpp0: float | None, tumour_class_name: str | None = None,
                       storage_options: dict | None = None) -> Annotation:
    """`read_annotation` with the class and mask settings of a config's `evaluation` section
    (a dict), as every evaluation path (run, zeus evaluate, ablation, doctor) reads ground truth."""
    ev = evaluation or {}
    return read_annotation(path_or_uri, tumour_classes=ev.get("tumour_classes"),
                           exclude_classes=ev.get("exclude_classes"), tumour_terms=ev.get("tumour_terms"),
                           exclude_terms=ev.get("exclude_terms"), tumour_class_name=tumour_class_name, mpp0=mpp0,
                           mask_downsample=ev.get("mask_downsample"), mask_mpp=ev.get("mask_mpp"),
                           storage_options=storage_options)


_SHIFT = 8                          # OpenCV fixed-point bits: vertices to 1/256 cell
_PAD = 4                            # canvas margin (cells): the clipped rings never reach its border
_BAND = np.ones((5, 5), np.uint8)   # cells within 2 of a drawn ring pixel (fillPoly errs within 1 of a ring)


def rasterise_geometry(geom: BaseGeometry, shape: tuple[int, int], cell0: float) -> np.ndarray:
    """Bool (H, W): cells whose centre lies inside `geom` (level-0 px), as shapely.contains_xy says.

    OpenCV's fillPoly (even-odd over every ring: holes and islands in holes included) fills the
    grid in cell-centre units; only near a ring can its pixel rounding differ from point-in-region,
    so the cells in a band around the rings are decided by shapely.contains_xy at their centres.
    The rings are clipped to the grid plus two cells first, so OpenCV never clips (its clipping of
    sub-pixel lines loses pieces of the band) and coordinates stay small.
    """
    h, w = int(shape[0]), int(shape[1])
    geom = _polygonal(geom)
    if h == 0 or w == 0 or geom.is_empty:
        return np.zeros((h, w), dtype=bool)
    c = float(cell0)
    clipped = shapely.clip_by_rect(geom, -1.5 * c, -1.5 * c, (w + 1.5) * c, (h + 1.5) * c)
    pts = [np.round((shapely.get_coordinates(r) / c - 0.5 + _PAD) * (1 << _SHIFT)).astype(np.int32)
           for poly in shapely.get_parts(_polygonal(clipped)) for r in [poly.exterior, *poly.interiors]]
    pts = [r for r in pts if len(r)]
    canvas = np.zeros((h + 2 * _PAD, w + 2 * _PAD), dtype=np.uint8)
    if not pts:
        return canvas[_PAD:-_PAD, _PAD:-_PAD].astype(bool)
    cv2.fillPoly(canvas, pts, 1, lineType=cv2.LINE_8, shift=_SHIFT)
    band = cv2.dilate(cv2.polylines(np.zeros_like(canvas), pts, True, 1, 1, cv2.LINE_8, _SHIFT), _BAND)
    out, band = canvas[_PAD:-_PAD, _PAD:-_PAD], band[_PAD:-_PAD, _PAD:-_PAD]
    found = cv2.findNonZero(band)                     # the band's (x, y); None when empty
    jj, ii = (found if found is not None else np.empty((0, 2), np.int32)).reshape(-1, 2).T
    shapely.prepare(geom)
    out[ii, jj] = shapely.contains_xy(geom, (jj + 0.5) * c, (ii + 0.5) * c)
    return out.astype(bool)


def rasterise_annotation(annotation: Annotation, shape: tuple[int, int], cell0: float,
                         origin0: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The ground truth on the cell grid (H, W) of `cell0` level-0 px per cell whose (x, y) origin
    is `origin0` level-0 px, sampled at cell centres: polygons by point-in-region, mask images by
    their nearest pixel (outside the mask: False)."""
    ox, oy = float(origin0[0]), float(origin0[1])
    if annotation.mask is None:
        geom = annotation.geometry if annotation.geometry is not None else Polygon()
        if ox or oy:
            geom = shapely.transform(geom, lambda xy: xy - np.array([ox, oy]))
        return rasterise_geometry(geom, shape, cell0)
    from ..maps.rasterise import resample_nearest   # mask px are `downsample` level-0 px, cells `cell0`
    return resample_nearest(annotation.mask.astype(bool, copy=False), annotation.downsample, shape, float(cell0), False,
                            offset=(oy, ox))
