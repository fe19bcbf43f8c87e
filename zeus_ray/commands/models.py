"""`zeus models`: the encoder registry as a table (weights source, licence, access, preprocessing,
embedding size, tokenizer), plus the generic id families.

`zeus models fetch ID --to DIR_OR_BUCKET [--weights SRC] [--tokenizer FILE]` copies a model's files
(from the hub, its cache, or SRC) with a sha256 manifest, for clusters without internet."""
from __future__ import annotations


COLUMNS = ("id", "weights", "licence", "gated", "input", "mean/std", "dim", "tokenizer", "context")


def registry_rows() -> list[tuple[str, ...]]:
    # Imported here: the registry pulls in torch, which every other `zeus` command would pay for.
    from ..encoders.preprocess import mean_std_name
    from ..encoders.registry import MODELS
    rows = []
    for entry in MODELS.values():
        s = entry.spec
        resize = (f"{s.input_size} {s.interpolation}" if s.resize_size == s.input_size
                  else f"{s.resize_size}→{s.input_size} {s.interpolation}")
        rows.append((s.id, s.weights_source, s.licence, "yes" if s.gated else "no", resize,
                     mean_std_name(s.mean, s.std), str(s.embed_dim), s.tokenizer, str(s.context_length)))
    return rows


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...] = COLUMNS) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def register(sub) -> None:
    p = sub.add_parser("models", help="list the registered encoders (`zeus models fetch` copies one's files)")
    p.set_defaults(handler=_run)
    models_sub = p.add_subparsers(dest="models_command", metavar="{fetch}")   # optional: no subcommand lists
    f = models_sub.add_parser(
        "fetch", help="copy a model's weights, configs and tokenizer into a folder or bucket, with a sha256 manifest",
        description="Copy what a model needs from the Hugging Face hub (or its cache; HF_HUB_OFFLINE=1 uses the "
                    "cache only) or from --weights SRC into DIR_OR_BUCKET, and write zeus_weights.json there. "
                    "Then --set model.weights=DIR_OR_BUCKET works on every node without internet, and each "
                    "file is checked against its sha256 when the model loads.")
    f.add_argument("model_id", metavar="ID", help="model id (conch, keep, plip, quiltnet, hf-clip:<repo>, ...)")
    f.add_argument("--to", required=True, metavar="DIR_OR_BUCKET", help="destination folder or bucket URI")
    f.add_argument("--weights", metavar="SRC", help="take the files from this folder, file or bucket, not the hub")
    f.add_argument("--tokenizer", metavar="FILE",
                   help="tokenizer file or folder to include (CONCH: its BPE JSON from the official package; "
                        "found automatically when that package is installed)")
    f.set_defaults(handler=_fetch)


def _run(args) -> int:
    from ..encoders.registry import GENERIC
    print(format_table(registry_rows()))
    print("\ninput: shortest side resized (interpolation, antialiased), then center crop; "
          "gated repos need `hf auth login` after accepting the terms on the hub.")
    print("generic ids:")
    for pattern, what in GENERIC.items():
        print(f"  {pattern:38s} {what}")
    return 0


def _fetch(args) -> int:
    from ..encoders.fetch import fetch_model
    from ..encoders.weights import MANIFEST_NAME

    manifest = fetch_model(args.model_id, args.to, source=args.weights, tokenizer=args.tokenizer)
    files = manifest["files"]
    total = sum(e["size"] for e in files.values()) / 1e9
    dest = args.to.rstrip("/")
    print(f"fetched {manifest['model_id']}: {len(files)} file(s), {total:.2f} GB from {manifest['source']} "
          f"to {dest} ({MANIFEST_NAME}); use --set model.weights={dest}")
    tok = next((n for n, e in files.items() if e["role"] == "tokenizer" and n.endswith(".json")), None)
    if manifest["model_id"] == "conch":
        if tok:
            print(f"CONCH tokenizer included: model.weights={dest} finds it (hash-checked)")
        else:
            print("CONCH tokenizer not included: it ships with the official CONCH code, not the weights; "
                  "fetch again with --tokenizer /path/to/conch_byte_level_bpe_uncased.json")
    return 0
