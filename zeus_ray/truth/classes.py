"""Which annotation classes are tumour, which are cut out, and which are left out.

Defaults follow what pathologists draw (README "Ground truth annotations" documents them):
- tumour: a class that names a tumour (DEFAULT_TUMOUR_TERMS, plus the prompt set's tumour class),
  or no class at all (QuPath "unclassified", an ASAP annotation in no group, an unnamed ImageScope
  layer);
- cut out: exclusion classes (DEFAULT_EXCLUDE_TERMS);
- left out: everything else (Stroma, Necrosis, Immune cells, Other, QuPath's Region*/Ignore*, ...).

CAMELYON conventions relied on (CAMELYON16/17 data README, mask conversion example with ASAP's
multiresolutionimageinterface; camelyon17.grand-challenge.org/Data links it): CAMELYON16 label map
{'_0': 1, '_1': 1, '_2': 0} drawn in the order _0, _1, _2, i.e. groups `_0` and `_1` are metastases
and `_2` marks non-tumour regions inside them; CAMELYON17 {'metastases': 1, 'normal': 2} drawn
metastases first, so a "normal" region inside a metastasis is not tumour.

Matching rule, case-insensitive; a class name is split into words at anything not a letter or
digit ("Tumor: Positive" -> tumor, positive; "non-tumour" -> non, tumour):
- a term equal to the whole name always matches (this is how `_0`, `_1`, `_2` match: terms with no
  letters match only the whole name, never a word of it);
- otherwise a term matches where its words appear as whole, consecutive words of the name
  ("in situ" matches "Carcinoma in-situ"; "tumor" does not match "peritumoral"); a term `*oma`
  matches any word ending in "oma" (carcinoma, melanoma, leiomyoma);
- a tumour-term match does not count when the word just before it is a negation (non, no, not,
  without, peri) or the word just after it is "free"/"absent" ("Non-tumour", "Tumour-free margin"),
  and a name holding a non-tumour tissue word (stroma, necrosis, normal, lymphocytes, ...) is never
  tumour by vocabulary ("Tumor-associated stroma", "Tumour necrosis").
Explicit class lists (tumour_classes / exclude_classes) are exact, case-insensitive whole names and
replace the vocabulary they stand for; the unclassified rule only applies with the vocabulary.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..config import DEFAULT_EXCLUDE_TERMS, DEFAULT_TUMOUR_TERMS   # the vocabulary is config data

# Words that, next to a tumour term, negate it (before / after it).
NEGATE_BEFORE = frozenset({"non", "no", "not", "without", "peri"})
NEGATE_AFTER = frozenset({"free", "absent"})
# Tissue words that make a name non-tumour wherever they stand ("*oma" would otherwise take stroma
# and haematoma); an exact tumour term or class still counts.
NOT_TUMOUR_WORDS = frozenset({
    "normal", "healthy", "stroma", "stromal", "necrosis", "necrotic", "immune", "inflamed",
    "inflammatory", "inflammation", "lymphocyte", "lymphocytes", "lymphocytic", "adjacent",
    "surrounding", "haematoma", "hematoma", "granuloma", "granulomas", "seroma", "glaucoma", "atheroma",
})
# Names that carry no class: QuPath/ASAP/ImageScope placeholders ("Layer 1", "Annotation Group 0").
_PLACEHOLDER = re.compile(r"(none|null|unclassified|(annotation\s*)?(group|layer)(\s*\d+)?)")

TUMOUR, EXCLUDE, OTHER = "tumour", "exclude", "other"


def words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[^\W_]+", str(text).casefold()))


def is_placeholder(name: str) -> bool:
    n = str(name).strip().casefold()
    return not n or _PLACEHOLDER.fullmatch(n) is not None


@dataclass(frozen=True)
class _Term:
    exact: str
    words: tuple[str, ...]   # empty: whole-name only

    @classmethod
    def of(cls, term: str) -> _Term:
        t = str(term).strip().casefold()
        if not any(c.isalpha() for c in t):        # `_0`: the whole name only
            return cls(t, ())
        return cls(t, ("*" + t.lstrip("*"),) if t.startswith("*") else words(t))

    def spans(self, ws: tuple[str, ...]) -> list[tuple[int, int]]:
        """(start, end) word spans of the name where this term stands."""
        if not self.words:
            return []
        if self.words[0].startswith("*"):
            suffix = self.words[0][1:]
            return [(i, i + 1) for i, w in enumerate(ws) if w.endswith(suffix)]
        n = len(self.words)
        return [(i, i + n) for i in range(len(ws) - n + 1) if ws[i:i + n] == self.words]


def _terms(items: Iterable[str]) -> tuple[_Term, ...]:
    return tuple(_Term.of(t) for t in items if str(t).strip())


def _exact(names: Iterable[str] | None) -> frozenset[str] | None:
    return None if names is None else frozenset(str(n).strip().casefold() for n in names)


@dataclass(frozen=True)
class ClassRules:
    """Sorts an annotation's class names (its class, or an ASAP group and the groups above it)."""
    tumour_names: frozenset[str] | None      # explicit tumour_classes (exact), else None
    exclude_names: frozenset[str] | None     # explicit exclude_classes (exact), else None
    tumour_terms: tuple[_Term, ...]
    exclude_terms: tuple[_Term, ...]

    def kind(self, names: Sequence[str]) -> str:
        names = [str(n).strip() for n in names if str(n).strip()]
        folded = {n.casefold() for n in names}
        if self.exclude_names is not None and folded & self.exclude_names:
            return EXCLUDE
        if self.tumour_names is not None and folded & self.tumour_names:
            return TUMOUR
        if self.exclude_names is None and any(_plain_match(n, self.exclude_terms) for n in names):
            return EXCLUDE
        if self.tumour_names is not None:
            return OTHER
        if all(is_placeholder(n) for n in names):   # no class at all: drawn as tumour
            return TUMOUR
        return TUMOUR if any(_tumour_match(n, self.tumour_terms) for n in names) else OTHER


def _plain_match(name: str, terms: tuple[_Term, ...]) -> bool:
    n, ws = name.casefold(), words(name)
    return any(t.exact == n or t.spans(ws) for t in terms)


def _tumour_match(name: str, terms: tuple[_Term, ...]) -> bool:
    n, ws = name.casefold(), words(name)
    if any(t.exact == n for t in terms):
        return True
    if NOT_TUMOUR_WORDS.intersection(ws):
        return False
    for t in terms:
        for i, j in t.spans(ws):
            negated = (i > 0 and ws[i - 1] in NEGATE_BEFORE) or (j < len(ws) and ws[j] in NEGATE_AFTER)
            if not negated:
                return True
    return False


def class_rules(tumour_classes: Sequence[str] | None = None, exclude_classes: Sequence[str] | None = None,
                tumour_terms: Sequence[str] | None = None, exclude_terms: Sequence[str] | None = None,
                tumour_class_name: str | None = None) -> ClassRules:
    """The rules for one read: explicit class lists win over the term vocabularies (None = defaults);
    the prompt set's tumour class name joins the tumour terms."""
    tt = list(DEFAULT_TUMOUR_TERMS if tumour_terms is None else tumour_terms)
    if tumour_class_name and str(tumour_class_name).strip():
        tt.append(str(tumour_class_name))
    return ClassRules(_exact(tumour_classes), _exact(exclude_classes), _terms(tt),
                      _terms(DEFAULT_EXCLUDE_TERMS if exclude_terms is None else exclude_terms))
