"""The ``cmhash train`` and ``cmhash eval`` commands.

They register into the one ``cmhash`` entry point through the ``cmhash.commands`` group of
pyproject.toml (see :mod:`cmhash.cli`). This module imports only the runtime: ``cmhash
--help`` loads it to list the commands even where the ``train`` extra is not installed, and
each command checks the extra before it imports the training code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cmhash.cli import print_json, require_extra, setup_logging
from cmhash.bundle import describe_pretrained
from cmhash.errors import CmhashError

# import names of the train extra's packages (pyproject.toml)
TRAIN_MODULES = ("torch", "torchvision", "open_clip", "timm", "huggingface_hub", "torch_geometric", "ot", "scipy",
                 "safetensors", "yaml", "tqdm")


def training_run():
    """:mod:`cmhash.training.run`, or a CmhashError naming the extra when it is not installed."""
    require_extra("train", *TRAIN_MODULES)
    from . import run

    return run


def add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="a YAML file, or a shipped config such as egath/demo or egath/mirflickr25k-64")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=3 model.bits=32")
    train.add_argument("--json", action="store_true", help="print one JSON object at the end")
    train.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    train.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    run = training_run()
    quiet = args.json or args.quiet
    setup_logging(quiet)
    config = run.load_config(args.config, [*args.overrides, "train.progress=false"] if quiet else args.overrides)
    result = run.train(config)
    summary = {"out_dir": str(result.out_dir), "best": result.best,
               "last": {k: v for k, v in result.last.items() if k.startswith(("epoch", "map_"))}}
    if args.json:
        print_json(summary)
    else:
        best = result.best or {}
        print(f"trained {config.method} for {config.train.epochs} epochs; checkpoints in {result.out_dir}/best and /last")
        if best:
            print(f"best epoch {best['epoch']}: I->T mAP {best['map_i2t']:.4f}, T->I mAP {best['map_t2i']:.4f}")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser("eval", help="I->T and T->I metrics of a trained checkpoint")
    evaluate.add_argument("checkpoint", help="a checkpoint folder (run/best, run/last) or a run folder")
    evaluate.add_argument("--query", help="query data: a manifest (.jsonl/.csv) or a YAML data section")
    evaluate.add_argument("--database", help="database data, the same forms as --query")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    run = training_run()
    if (args.query is None) != (args.database is None):
        raise CmhashError("give both --query and --database, or neither (the training run's own split)")
    query = _data_spec(args.query) if args.query else None
    database = _data_spec(args.database) if args.database else None
    result = run.evaluate(args.checkpoint, query=query, database=database)
    if args.json:
        print_json(result)
        return 0
    print(f"{args.checkpoint}: {result['n_query']} queries against {result['n_database']} items, {result['bits']} bits")
    print(f"  backbone started from {describe_pretrained(result.get('pretrained'))}")
    for name, title in (("i2t", "I->T"), ("t2i", "T->I")):
        r = result[name]
        extra = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "map")
        print(f"  {title} mAP {r['map']:.4f}  {extra}")
    return 0


def _data_spec(text: str) -> dict:
    """--query / --database: a manifest (.jsonl/.csv) or a YAML file holding a data section."""
    path = Path(text)
    if path.suffix in (".jsonl", ".csv"):
        return {"source": "manifest", "path": str(path)}
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            spec = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise CmhashError(f"{text}: cannot read a data section from it ({exc})") from None
        if not isinstance(spec, dict) or "source" not in spec:
            raise CmhashError(f"{text}: a data file must be a mapping with a 'source' key (like a config's data section)")
        return spec
    raise CmhashError(f"{text}: give a manifest (.jsonl, .csv) or a YAML data section (.yaml)")
