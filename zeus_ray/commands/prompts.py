"""`zeus prompts show [FILE] --model ID`: validate a prompt ensemble, count its prompts per class,
and print the cosine between class embeddings (classes close to 1 are hard to separate by argmax)
and the prompt key."""
from __future__ import annotations

from .options import add_set_option
from ..config import load_config


def register(sub) -> None:
    p = sub.add_parser("prompts", help="inspect prompt ensembles (prompts per class, text-space cosines)")
    psub = p.add_subparsers(dest="prompts_command", metavar="ACTION", required=True)
    s = psub.add_parser("show", help="prompts per class, cosine between class embeddings, prompt key")
    s.add_argument("file", nargs="?", help="prompt YAML (default: prompts.file of the config)")
    s.add_argument("--model", help="encoder id, e.g. conch, keep, random:vit_tiny_patch16_224 (default: model.id)")
    s.add_argument("--weights", help="local dir/file or bucket URI of the weights (default: model.weights)")
    s.add_argument("--config", help="job config YAML to take model/prompts settings from")
    s.add_argument("--list", action="store_true", help="also print every prompt")
    add_set_option(s)
    s.set_defaults(handler=_show)
    a = psub.add_parser("ablate", help="Dice of the full ensemble and of leave-one-out variants, from cached "
                                       "embeddings and the annotations (no slide read, no image encoded)")
    a.add_argument("--results", required=True, help="output root of an earlier `zeus run`")
    a.add_argument("--prompts", required=True, help="prompt ensemble YAML to study")
    a.add_argument("--model", help="model id whose embeddings to use (default: the one of the latest run)")
    add_set_option(a)
    a.set_defaults(handler=_ablate)


def _ablate(args) -> int:
    from ..engine.prompt_ablation import run_ablation, to_markdown
    from .reprompt import reprompt_config
    cfg = reprompt_config(args.results, args.prompts, args.model, args.overrides, None)
    per_slide, table, out = run_ablation(cfg)
    print(to_markdown(table))
    print(f"zeus prompts ablate: {per_slide['slide_id'].nunique()} slides, {table['variant'].nunique()} variants; "
          f"tables in {out}")
    return 0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)


def _show(args) -> int:
    # Heavy imports here so `zeus --help` stays fast.
    from ..prompts import class_embeddings, load_prompt_set, prompt_key, text_cosines

    extra: dict = {}
    if args.model:
        extra.setdefault("model", {})["id"] = args.model
    if args.weights:
        extra.setdefault("model", {})["weights"] = args.weights
    if args.file:
        extra["prompts"] = {"file": args.file}
    cfg = load_config(args.config, args.overrides, extra)

    ps = load_prompt_set(cfg.prompts.file)  # validate before loading a model
    print(f"prompt set: {ps.name} ({ps.path})")
    if ps.source:
        print(f"source: {ps.source}")
    rows = [["class", "classnames", "templates", "prompts"]]
    groups = dict(ps.prompts())
    for c in ps.classes:
        marker = " (tumour)" if c.name == ps.tumour_class else ""
        rows.append([c.name + marker, str(len(c.classnames)), str(len(ps.templates_for(c))), str(len(groups[c.name]))])
    rows.append(["total", "", "", str(sum(len(v) for v in groups.values()))])
    print(_table(rows))
    if args.list:
        for name, prompts in groups.items():
            print(f"\n{name}:")
            print("\n".join(f"  {p}" for p in prompts))

    from ..encoders.registry import load_encoder
    encoder = load_encoder(cfg.model)
    emb = class_embeddings(encoder, ps)
    cos = text_cosines(emb)
    names = ps.class_names
    print(f"\nmodel: {cfg.model.id} (model key {encoder.model_key}, embedding dim {emb.shape[1]})")
    print("cosine between class embeddings:")
    print(_table([[""] + names] + [[n] + [f"{v:.4f}" for v in row] for n, row in zip(names, cos)]))
    print(f"prompt key: {prompt_key(ps, encoder.model_key)}")
    return 0
