"""The committed test data: every slide listed in tests/data/slides/README.md is there with the sha256
the README states, and the checkpoint layouts are readable, so a fresh clone runs every real-slide test."""
from __future__ import annotations

import hashlib
import json
import re


def test_slides_match_the_sha256_in_their_readme(slides_dir):
    rows = re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", (slides_dir / "README.md").read_text(), re.M)
    assert {name for name, _ in rows} == {p.name for p in slides_dir.glob("*.svs")}
    for name, digest in rows:
        assert hashlib.sha256((slides_dir / name).read_bytes()).hexdigest() == digest, name


def test_checkpoint_layouts_are_in_the_repository(test_data):
    for name, n in [("conch_ViT-B-16.json", 641), ("keep.json", 546)]:
        assert len(json.loads((test_data / "checkpoint-layouts" / name).read_text())["entries"]) == n
