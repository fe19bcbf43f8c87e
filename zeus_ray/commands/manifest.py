"""`zeus manifest SOURCE... --out manifest.csv`: write the cohort manifest from folders or bucket
prefixes of slides (and annotation files), then print what was found and what needs a look."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Scan folders or bucket prefixes (local paths, s3://, gs://, any fsspec URI) recursively and write
the manifest `zeus run` reads: slide_id,uri,annotation_uri,dataset,center,mpp (sorted by slide_id;
uris absolute or full bucket URIs; mpp left empty for you to fill where a slide lacks it).

slides       every OpenSlide extension (.svs .tif .tiff .ndpi .vms .vmu .scn .mrxs .svslide .bif .dcm).
             A folder of .dcm files is ONE DICOM slide (its uri is the folder). A .mrxs file is the
             slide; its data folder <stem>/ is not listed (warning when it is missing). Hidden files
             are skipped. .tif/.tiff inside an --annotations folder are masks, not slides.
pairing      by name: <stem>.<ext> (or <stem>.svs.<ext>, <slide_id>.<ext>) first, then
             <stem><sep><word>.<ext> with sep _ - . or space and word mask(s), annotation(s), anno,
             label(s), gt, tumor, tumour (any case); ext .geojson .json .xml .png .tif .tiff. Among
             slides of one stem, the one in the same relative folder wins. Two files for one slide,
             or one file for two slides, are reported and left empty, never guessed.
slide ids    the file stem (folder name for DICOM), unsafe characters replaced by _; equal stems in
             different folders get parent folders prefixed (D1_a, D2_a), and are reported.
dataset/center rules (--dataset-from, --center-from):
  parent           the slide's parent folder name
  part:N           folder N under SOURCE (0 = first, -1 = the slide's parent)
  regex:PATTERN    re.search on the path under SOURCE, with a named group (?P<dataset>...) or
                   (?P<center>...); one regex naming both groups fills both fields
  value:TEXT       the same text for every slide

examples:
  zeus manifest /data/slides --annotations /data/annotations --dataset-from part:0 --out cohort.csv
  zeus manifest s3://bucket/wsi --dataset-from 'regex:^(?P<dataset>[^/]+)/(?P<center>[^/]+)/' --out m.csv
"""


def register(sub) -> None:
    p = sub.add_parser("manifest", help="write a cohort manifest from folders/bucket prefixes of slides and annotations",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="folder, slide file or bucket prefix (s3://, gs://, ...)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="manifest to write: .csv (or .parquet), local or bucket URI")
    p.add_argument("--annotations", action="append", default=[], metavar="DIR_OR_PREFIX",
                   help="folder or prefix of annotation files to pair by name (repeatable)")
    p.add_argument("--dataset-from", metavar="SPEC", help="fill `dataset`: parent, part:N, regex:PATTERN or value:TEXT")
    p.add_argument("--center-from", metavar="SPEC", help="fill `center`: parent, part:N, regex:PATTERN or value:TEXT")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--storage-option", dest="storage_options", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option for bucket sources, e.g. anon=true (repeatable; dotted keys nest); "
                        "`zeus run` needs the same as input.storage_options")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from ..cohort_input.builder import build_manifest, check_output, write_manifest
    from ..cohort_input.rules import parse_storage_options
    options = parse_storage_options(args.storage_options)
    check_output(args.out, args.force, options)   # before a long scan
    build = build_manifest(args.sources, args.annotations, args.dataset_from, args.center_from, options)
    out = write_manifest(build, args.out, args.force, options)
    print(build.summary(out))
    return 0
