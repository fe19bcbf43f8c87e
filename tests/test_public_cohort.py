"""The CAMELYON16 recipe (configs/camelyon16-keep.yaml) against a public bucket with the real
layout, served by the moto S3 server: anonymous listing, manifest, slide and annotation reads with
`input.storage_options: {anon: true}` and no credentials anywhere."""
from __future__ import annotations

import json
from pathlib import Path

import boto3
import pandas as pd
import pytest
import shapely
from shapely.geometry import Polygon

from zeus_ray.truth.annotations import read_annotation
from zeus_ray.config import load_config
from zeus_ray.errors import AnnotationError, ConfigError, SlideError
from zeus_ray.cohort_input.manifest import load_cohort
from zeus_ray.slides.access import localise, open_slide
from zeus_ray.demo.synthetic import write_synthetic_slide

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "camelyon16-keep.yaml"
BUCKET = "camelyon-dataset"
PREFIX = f"s3://{BUCKET}/CAMELYON16"
LESION = [(300, 200), (900, 220), (1000, 700), (350, 760)]
EXCLUDED = [(550, 400), (700, 400), (700, 550), (550, 550)]      # an `_2` exclusion inside the lesion


def asap_xml(regions) -> str:
    """An ASAP XML as CAMELYON16 ships it: polygons in groups `_0`/`_1` (tumour) and `_2` (exclusion)."""
    out = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    for i, (coords, group) in enumerate(regions):
        out.append(f'\t\t<Annotation Name="Annotation {i}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">')
        out.append("\t\t\t<Coordinates>")
        out += [f'\t\t\t\t<Coordinate Order="{k}" X="{x}" Y="{y}" />' for k, (x, y) in enumerate(coords)]
        out += ["\t\t\t</Coordinates>", "\t\t</Annotation>"]
    out += ["\t</Annotations>", "\t<AnnotationGroups>"]
    for g, colour in (("_0", "#FF0000"), ("_1", "#FF0000"), ("_2", "#00FF00")):
        out.append(f'\t\t<Group Name="{g}" PartOfGroup="None" Color="{colour}"><Attributes /></Group>')
    out += ["\t</AnnotationGroups>", "</ASAP_Annotations>"]
    return "\n".join(out)


@pytest.fixture(scope="module")
def public_bucket(s3_server, tmp_path_factory):
    """`camelyon-dataset` with CAMELYON16's layout and a public-read bucket policy, plus a private
    bucket with the same content. Yields {name: local file} of what was uploaded."""
    tmp = tmp_path_factory.mktemp("camelyon")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    files = {
        "images/tumor_001.tif": write_synthetic_slide(tmp / "tumor_001.tif", 1280, 1024, 0.25, fmt="tiff",
                                                      downsamples=(1, 4), lesions=Polygon(LESION)).path,
        "images/normal_001.tif": write_synthetic_slide(tmp / "normal_001.tif", 1024, 768, 0.25, fmt="tiff",
                                                       downsamples=(1, 4), seed=1).path,
    }
    xml = tmp / "tumor_001.xml"
    xml.write_text(asap_xml([(LESION, "_0"), (EXCLUDED, "_2")]))
    files["annotations/tumor_001.xml"] = str(xml)
    # what `zeus manifest ... --out camelyon16.csv` writes: normal slides have no annotation
    manifest = tmp / "camelyon16.csv"
    pd.DataFrame({"slide_id": ["normal_001", "tumor_001"],
                  "uri": [f"{PREFIX}/images/normal_001.tif", f"{PREFIX}/images/tumor_001.tif"],
                  "annotation_uri": ["", f"{PREFIX}/annotations/tumor_001.xml"]}).to_csv(manifest, index=False)
    for bucket in (BUCKET, "camelyon-private"):
        if bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
            s3.create_bucket(Bucket=bucket)
        for key, path in files.items():
            s3.upload_file(path, bucket, f"CAMELYON16/{key}")
    s3.upload_file(str(manifest), "camelyon-private", "camelyon16.csv")   # a manifest kept privately ...
    s3.upload_file(str(manifest), BUCKET, "manifests/camelyon16.csv")    # ... and one shared publicly
    # Anyone may read: AWS grants HEAD with s3:GetObject, moto checks it as s3:HeadObject. (moto
    # refuses anonymous object reads without such a policy, as S3 does; it does not check listings.)
    s3.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:HeadObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}))
    return files


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """Nothing to sign with: no keys in the environment, no profile or credentials file."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def recipe(tmp_path, *overrides):
    return load_config(RECIPE, [f"cache.dir={tmp_path / 'cache'}", f"output.root={tmp_path / 'out'}", *overrides])


def test_recipe_is_the_public_setting():
    cfg = load_config(RECIPE)
    assert cfg.input.storage_options == {"anon": True} and cfg.input.manifest == "camelyon16.csv"
    assert cfg.model.id == "keep" and cfg.prompts.file == "prompts/metastasis.yaml" and (ROOT / cfg.prompts.file).is_file()
    assert (cfg.tiling.magnification, cfg.tiling.patch_size, cfg.tiling.overlap) == (10, 448, 0.75)
    assert cfg.postprocess == "none"
    # the recipe leaves the annotation classes to the evaluation defaults (`_2` exclusion etc.)
    assert cfg.evaluation.tumour_classes is None and cfg.evaluation.exclude_classes is None


def test_glob_lists_the_bucket_anonymously(public_bucket, no_credentials, tmp_path):
    cfg = recipe(tmp_path, "input.manifest=null", f"input.glob={PREFIX}/images/*.tif")
    entries = load_cohort(cfg.input)
    assert [(e.slide_id, e.uri) for e in entries] == [
        ("normal_001", f"{PREFIX}/images/normal_001.tif"), ("tumor_001", f"{PREFIX}/images/tumor_001.tif")]
    # the anonymous setting is what makes it work: without it there is nothing to sign with
    signed = recipe(tmp_path, "input.manifest=null", f"input.glob={PREFIX}/images/*.tif", "input.storage_options.anon=false")
    with pytest.raises(ConfigError, match=r"input\.glob .*credentials.*anon: true"):
        load_cohort(signed.input)
    # (moto, unlike S3, lets anyone list a private bucket; it does refuse anonymous object reads,
    # which the tests below check on the private twin of the bucket)


def test_manifest_slide_and_annotation_read_anonymously(public_bucket, no_credentials, tmp_path):
    cfg = recipe(tmp_path, f"input.manifest=s3://{BUCKET}/manifests/camelyon16.csv")
    opts = cfg.input.storage_options
    entries = {e.slide_id: e for e in load_cohort(cfg.input)}
    assert entries["normal_001"].annotation_uri is None           # normal slides: no annotation file
    tumour = entries["tumor_001"]
    assert tumour.annotation_uri == f"{PREFIX}/annotations/tumor_001.xml"

    path = localise(tumour.uri, cfg.cache, tumour.slide_id, opts)
    assert Path(path).read_bytes() == Path(public_bucket["images/tumor_001.tif"]).read_bytes()
    assert Path(path).is_relative_to(tmp_path / "cache")
    slide = open_slide(tumour.uri, tumour.slide_id, cfg.cache, storage_options=opts)
    try:
        assert slide.dimensions == (1280, 1024)
    finally:
        slide.close()
    with pytest.raises(SlideError, match="tumor_001.*access denied"):   # a bucket without a public policy
        localise(tumour.uri.replace(BUCKET, "camelyon-private"), cfg.cache, "tumor_001", opts)

    ann = read_annotation(tumour.annotation_uri, exclude_classes=["_2"], storage_options=opts)
    expected = Polygon(LESION).difference(Polygon(EXCLUDED))
    assert shapely.equals_exact(shapely.normalize(ann.geometry), shapely.normalize(expected), 1e-6)
    assert {"_0", "_2"} <= set(ann.classes)
    with pytest.raises(AnnotationError, match="camelyon-private"):
        read_annotation(tumour.annotation_uri.replace(BUCKET, "camelyon-private"), storage_options=opts)


def test_private_manifest_needs_credentials(public_bucket, no_credentials, tmp_path):
    cfg = recipe(tmp_path, "input.manifest=s3://camelyon-private/camelyon16.csv")
    with pytest.raises(ConfigError, match=r"input\.manifest s3://camelyon-private/camelyon16\.csv: access denied"):
        load_cohort(cfg.input)


def test_storage_option_secrets_never_dumped():
    cfg = load_config(RECIPE, ["input.storage_options.key=AKIAEXAMPLE", "input.storage_options.secret=s3cr3t-value",
                               "input.storage_options.s3.token=t0ken-value", "input.storage_options.gs.token=anon"])
    assert cfg.input.storage_options["secret"] == "s3cr3t-value"   # used for the reads ...
    dumped = json.dumps(cfg.model_dump())                           # ... never written to run.json
    assert "s3cr3t" not in dumped and "AKIAEXAMPLE" not in dumped and "t0ken" not in dumped
    assert cfg.model_dump()["input"]["storage_options"] == {"anon": True, "s3": {}, "gs": {"token": "anon"}}


def test_options_per_protocol_and_not_for_local_files(public_bucket, no_credentials, tmp_path):
    # a protocol's own options beat the flat ones (here: the recipe's anon, turned off)
    per_protocol = {"anon": False, "s3": {"anon": True}, "gs": {"token": "anon"}}
    cfg = recipe(tmp_path, "input.manifest=null", f"input.glob={PREFIX}/images/tumor_*.tif",
                 f"input.storage_options={json.dumps(per_protocol)}")
    assert cfg.input.storage_options == per_protocol
    assert [e.slide_id for e in load_cohort(cfg.input)] == ["tumor_001"]
    local = Path(public_bucket["images/tumor_001.tif"])
    assert localise(str(local), None, "t", {"anon": True}) == str(local)      # local paths take no options
    glob = recipe(tmp_path, "input.manifest=null", f"input.glob={local.parent}/*.tif")
    assert [e.slide_id for e in load_cohort(glob.input)] == ["normal_001", "tumor_001"]
