"""`zeus models`: the encoder registry as a table (weights source, licence, access, preprocessing,
embedding size, tokenizer), plus the generic id families."""
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
    p = sub.add_parser("models", help="list the registered encoders and the generic model id families")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from ..encoders.registry import GENERIC
    print(format_table(registry_rows()))
    print("\ninput: shortest side resized (interpolation, antialiased), then center crop; "
          "gated repos need `hf auth login` after accepting the terms on the hub.")
    print("generic ids:")
    for pattern, what in GENERIC.items():
        print(f"  {pattern:38s} {what}")
    return 0
