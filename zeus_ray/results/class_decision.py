"""The annotation class decision of each slide (which classes counted as tumour, which were left
out, which were cut out), kept in its result row (result.json, slides table) and shown once per
distinct decision on the console and in the report's settings."""
from __future__ import annotations

from collections import Counter

CLASS_COLUMNS = ("classes_tumour", "classes_left_out", "classes_cut_out")
SEP = "; "   # class names may hold commas (ASAP "group / subgroup" names do not use ';')


def decision_columns(ann) -> dict:
    """The row columns of one Annotation (truth.annotations): class names joined by SEP, '' for none."""
    return dict(zip(CLASS_COLUMNS, (SEP.join(ann.tumour), SEP.join(ann.left_out), SEP.join(ann.excluded))))


def _text(value) -> str:
    return value if isinstance(value, str) and value else "none"


def decision_lines(rows) -> list[str]:
    """One line per distinct class decision among result rows (dicts), with how many slides had it."""
    seen = Counter(tuple(r.get(c) for c in CLASS_COLUMNS) for r in rows
                   if any(isinstance(r.get(c), str) for c in CLASS_COLUMNS))
    return [f"annotation classes of {n} slide{'s' if n > 1 else ''}: tumour: {_text(t)}; not counted as tumour: "
            f"{_text(left)}; cut out: {_text(cut)}" for (t, left, cut), n in sorted(seen.items(), key=lambda kv: -kv[1])]
