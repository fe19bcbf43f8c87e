"""Cohort manifests and globs: validated before any work, relative URIs resolved, unsafe ids refused."""
import pytest

from zeus_ray.config import InputConfig
from zeus_ray.errors import ConfigError
from zeus_ray.cohort_input.manifest import glob_slides, load_cohort, read_manifest
from zeus_ray.storage.store import OutputStore


def write(tmp_path, text, name="m.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_manifest_with_optional_columns_and_relative_uris(tmp_path):
    m = write(tmp_path, "slide_id,uri,annotation_uri,dataset,center,mpp\n"
                        "a,slides/a.svs,ann/a.geojson,D1,C1,0.25\n"
                        "b,s3://bucket/b.svs,,D1,,\n")
    a, b = read_manifest(m)
    assert a.uri == str(tmp_path / "slides" / "a.svs") and a.annotation_uri == str(tmp_path / "ann" / "a.geojson")
    assert (a.dataset, a.center, a.mpp) == ("D1", "C1", 0.25)
    assert b.uri == "s3://bucket/b.svs" and b.annotation_uri is None and b.center is None and b.mpp is None


@pytest.mark.parametrize("text,match", [
    ("slide,uri\na,a.svs\n", "missing column"),
    ("slide_id,uri,colour\na,a.svs,red\n", "unknown column"),
    ("slide_id,uri\na,a.svs\na,b.svs\n", "appears twice"),
    ("slide_id,uri,mpp\na,a.svs,-1\n", "mpp"),
    ("slide_id,uri\n../../etc,a.svs\n", "not a safe folder name"),
    ("slide_id,uri\na/b,a.svs\n", "not a safe folder name"),
    ("slide_id,uri\n", "no slides"),
])
def test_bad_manifests_fail_naming_the_problem(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match) as e:
        read_manifest(write(tmp_path, text))
    assert "\n" not in str(e.value)


def test_glob_over_a_folder(tmp_path):
    for name in ("x.svs", "y.tiff", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    entries = glob_slides(str(tmp_path / "*"))
    assert [e.slide_id for e in entries] == ["x", "y"]
    assert load_cohort(InputConfig(glob=str(tmp_path / "*.svs")))[0].slide_id == "x"
    with pytest.raises(ConfigError, match="matched no slide"):
        glob_slides(str(tmp_path / "*.ndpi"))
    with pytest.raises(ConfigError, match="input.manifest"):
        load_cohort(InputConfig())


def test_slide_ids_cannot_escape_the_output_root(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    assert store.slide_dir("ok-1", "tiles").startswith(str(tmp_path / "out" / "slides" / "ok-1"))
    for bad in ("..", "../x", "/abs", "a\\b", ".hidden", ""):
        with pytest.raises(Exception, match="safe folder name"):
            store.slide_dir(bad)
