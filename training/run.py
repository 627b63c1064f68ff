"""From a run config to a trained model and back: the one path every method and the CLI use.

``load_config(name_or_path, overrides)`` reads a run config (a YAML file or a shipped config
such as ``egath/mirflickr25k-64``), ``train(config)`` prepares the data the config's ``data``
section describes, builds the method and runs the :class:`~cmhash.training.trainer.Trainer`.
``load_trained(checkpoint)`` rebuilds a trained method from a checkpoint directory alone (for
evaluation and export), and ``evaluate`` scores it on any data.

Shipped configs live in ``configs/<method>/<name>.yaml``, one per method and dataset. A name
may end in ``-<bits>``: ``egath/mirflickr25k-16`` is ``egath/mirflickr25k`` with
``model.bits=16`` and ``-16`` appended to its ``train.out_dir``.

The ``data`` section holds a source's loader options (see :func:`cmhash.training.data.load_data`)
plus these keys of its own::

    split:      a preset name (mirflickr25k, nuswide10, mscoco) or {query, train, database, seed}
    vocabulary: {min_count, max_size} for vocabularies built from the training texts
    augment:    light random crops for training images (default false)
    cache:      decode and preprocess every image once and keep the tensors in memory
                (default false; needs augment false, as the cached pixels are fixed)
    feature_cache: a folder; with a frozen image backbone, its features of every image are
                computed once into a memory-mapped file there (reused by later runs on the
                same data and backbone) and epochs run only the heads (needs augment false)
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cmhash.files import atomic_path
from cmhash.metrics import retrieval_metrics
from cmhash.text import Vocabulary

from . import checkpoint as ckpt_io
from .blocks.pretrained import architecture_only
from .config import RunConfig, apply_overrides, parse_config, read_config
from .data import CrossModalData, CrossModalDataset, Split, build_transform, load_data, make_split
from .errors import ConfigError
from .method import DatasetInfo, HashingMethod, get_method
from .trainer import FitResult, Trainer, build_method, encode_dataset, fit_torch_threads

log = logging.getLogger("cmhash.training")

__all__ = ["Prepared", "RowTensors", "prepare_data", "train", "load_trained", "evaluate", "encode_both",
           "load_config", "build_config", "list_configs", "CONFIG_DIR", "DATA_KEYS"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped configs: <method>/<name>.yaml

DATA_KEYS = ("split", "vocabulary", "augment", "cache", "feature_cache")  # data-section keys that are not loader options
DEFAULT_SPLIT = {"query": 0.1, "train": 0.5}  # fractions of the data when no split is given


@dataclass
class Prepared:
    """Everything training needs from the data: the samples, the split, the torch datasets
    and what the method may know about them."""

    data: CrossModalData  # text already encoded over the (training) vocabulary
    split: Split
    info: DatasetInfo
    train: Dataset
    query: Dataset
    database: Dataset


class RowTensors:
    """Per-sample tensors computed once for some rows of the data (preprocessed pixels in
    memory, or backbone features memory-mapped), looked up by the sample's row in ``data``.
    The demo and tests train many epochs on small data, where decoding would dominate."""

    def __init__(self, values: torch.Tensor | np.ndarray, rows: np.ndarray):
        self.values = values
        self.position = {int(i): k for k, i in enumerate(rows)}

    def __call__(self, i: int) -> torch.Tensor:
        value = self.values[self.position[i]]
        return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))  # a copy off the map


def _image_rows(data: CrossModalData, rows: np.ndarray, transform: Callable) -> Iterator[torch.Tensor]:
    """The preprocessed image of each row, decoded in order."""
    return (transform(transform.load(data.images, int(i))) for i in rows)


def _preprocessed_images(data: CrossModalData, rows: np.ndarray, transform: Callable) -> RowTensors:
    return RowTensors(torch.stack(list(_image_rows(data, rows, transform))), rows)


def list_configs() -> list[str]:
    """The shipped config names (``egath/demo``, ``egath/mirflickr25k``, ...); each also
    takes a ``-<bits>`` suffix."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.glob("*/*.yaml"))


def _shipped(name: str) -> tuple[Path, int | None]:
    """The file of a shipped config name, and the bits its ``-<bits>`` suffix asks for."""
    name = name.removesuffix(".yaml")
    if (CONFIG_DIR / f"{name}.yaml").is_file():
        return CONFIG_DIR / f"{name}.yaml", None
    match = re.fullmatch(r"(.+)-(\d+)", name)
    if match and (CONFIG_DIR / f"{match[1]}.yaml").is_file():
        return CONFIG_DIR / f"{match[1]}.yaml", int(match[2])
    raise ConfigError(f"config {name!r} is neither a file nor a shipped config; shipped: {', '.join(list_configs())} "
                      "(each also as <name>-<bits>, e.g. egath/mirflickr25k-16)")


def build_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a raw config mapping (e.g. parsed YAML) into a RunConfig of a registered method."""
    return parse_config(raw, lambda name: get_method(name).Config)


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """A validated run config from a YAML file, a shipped config name (see the module
    docstring) or nothing (an empty config), with ``section.key=value`` overrides applied last."""
    if source is None or Path(source).is_file():
        return build_config(read_config(source, overrides))
    try:
        path, bits = _shipped(str(source))
    except ConfigError:
        if Path(source).suffix in (".yaml", ".yml"):
            raise ConfigError(f"config file {str(source)!r} does not exist") from None
        raise
    raw = read_config(path)
    if bits is not None:
        out_dir = (raw.get("train") or {}).get("out_dir")
        raw = apply_overrides(raw, [f"model.bits={bits}", *([f"train.out_dir={out_dir}-{bits}"] if out_dir else [])])
    return build_config(apply_overrides(raw, overrides))


def resolve_config(name: str | Path) -> str | Path:
    """Deprecated, kept for one release: :func:`load_config` takes shipped names itself.
    Checks that ``name`` is a file or a shipped config and returns it unchanged."""
    warnings.warn("resolve_config is no longer needed: give the name to load_config", DeprecationWarning, stacklevel=2)
    if not Path(name).is_file():
        _shipped(str(name))
    return name


def _split_sizes(spec: Any, n: int) -> Any:
    """A split given as fractions (0 < x < 1) of the data becomes counts."""
    if isinstance(spec, Mapping):
        spec = {k: (max(1, int(round(v * n))) if k in ("query", "train", "database") and isinstance(v, float)
                    and 0 < v < 1 else v) for k, v in spec.items()}
    return spec


def prepare_data(config: RunConfig, vocabulary: Vocabulary | None = None) -> Prepared:
    """Load the configured data, split it, build the vocabulary from the training texts only
    (or encode them over ``vocabulary``, a trained model's), and make the training (augmented
    if asked), query and database datasets with the preprocessing of the method's image tower."""
    options = dict(config.data)
    if "source" not in options:
        raise ConfigError("the config's data section needs a 'source' (e.g. shapes, manifest, mirflickr-mini)")
    split_spec = options.pop("split", DEFAULT_SPLIT)
    vocab_options = options.pop("vocabulary", None) or {}
    augment = bool(options.pop("augment", False))
    cache = bool(options.pop("cache", False))
    feature_cache = options.pop("feature_cache", None)
    if (cache or feature_cache) and augment:
        raise ConfigError("data.cache and data.feature_cache keep one preprocessed copy of each image, so they "
                          "need data.augment: false")
    unknown_vocab = sorted(set(vocab_options) - {"min_count", "max_size"})
    if unknown_vocab:
        raise ConfigError(f"data.vocabulary has unknown key(s) {unknown_vocab}; valid: min_count, max_size")

    data = load_data(options)
    split = make_split(len(data), _split_sizes(split_spec, len(data)))
    if data.texts is not None:
        data = data.with_vocabulary(vocabulary or data.build_vocabulary(split.train, **vocab_options))
    elif vocabulary is not None and data.vocabulary != vocabulary:
        raise ConfigError(f"{data.name} comes with a fixed vocabulary of {len(data.vocabulary)} terms that is not "
                          f"the model's ({len(vocabulary)} terms); evaluate on data with the model's vocabulary")
    preprocess = get_method(config.method).image_preprocessing(config.model)

    eval_transform = build_transform(preprocess)
    train_transform = build_transform(preprocess, train=True, augment=augment)
    if cache:
        images = _preprocessed_images(data, np.unique(np.concatenate([split.query, split.database])), eval_transform)
        eval_transform = train_transform = None
    datasets = {}
    for name, indices, transform in (("train", split.train, train_transform), ("query", split.query, eval_transform),
                                     ("database", split.database, eval_transform)):
        datasets[name] = CrossModalDataset(data, indices, transform, images=images if cache else None)
    info = DatasetInfo(
        n_train=len(split.train),
        n_labels=data.num_labels,
        text_dim=len(data.vocabulary),
        train_labels=datasets["train"].labels.clone(),
        label_names=list(data.label_names),
        image_size=preprocess["image_size"],
        preprocessing=preprocess,
        vocabulary=data.vocabulary.to_dict(),
    )
    return Prepared(data=data, split=split, info=info, **datasets)


def train(config: RunConfig | str | Path, overrides: Sequence[str] = ()) -> FitResult:
    """Train as ``config`` (a RunConfig, or a YAML path plus ``key=value`` overrides) says."""
    if not isinstance(config, RunConfig):
        config = load_config(config, overrides)
    elif overrides:
        raise ValueError("overrides apply to a config file; change the RunConfig directly instead")
    weights = get_method(config.method).fetch_pretrained(config.model)  # before any data are read
    if weights is not None:
        log.info("pretrained %s weights %s: %s (sha256 %s)", weights.library, weights.tag or "(local file)",
                 weights.path, weights.sha256)
    prepared = prepare_data(config)
    log.info("data %s: %d train, %d query, %d database, %d labels, %d text terms", prepared.data.name,
             len(prepared.train), len(prepared.query), len(prepared.database), prepared.info.n_labels,
             prepared.info.text_dim)
    method = build_method(config, prepared.info)
    if config.data.get("feature_cache"):
        prepared = with_cached_features(prepared, method, config.data["feature_cache"])
    return Trainer(config, method, prepared.train, prepared.query, prepared.database).fit()


def with_cached_features(prepared: Prepared, method: HashingMethod, directory: str | Path,
                         batch_size: int = 128) -> Prepared:
    """Replace the images of every dataset by the frozen backbone's features, computed once.

    The file is keyed by a digest of the backbone's weights, its preprocessing and the rows'
    identity, so a changed backbone or dataset never reads stale features. Written
    atomically, so a killed run leaves no half-written cache behind.
    """
    import hashlib
    import json

    backbone = method.image_backbone()
    if backbone is None or not getattr(backbone, "frozen", False):
        raise ConfigError(f"data.feature_cache needs a frozen image backbone (model.freeze_backbone: true); "
                          f"{method.name} trains its backbone here")
    rows = np.unique(np.concatenate([prepared.split.query, prepared.split.database]))
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps([prepared.info.preprocessing, prepared.data.name, prepared.data.info],
                             sort_keys=True, default=str).encode())
    digest.update(rows.tobytes())
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"features-{digest.hexdigest()[:24]}-{len(rows)}x{backbone.output_dim}.f32"
    shape = (len(rows), backbone.output_dim)
    if not path.is_file():
        images = _image_rows(prepared.data, rows, build_transform(prepared.info.preprocessing))
        backbone.eval()
        with atomic_path(path) as tmp, torch.inference_mode():
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            for start in range(0, len(rows), batch_size):
                batch = torch.stack([next(images) for _ in range(min(batch_size, len(rows) - start))])
                out[start:start + len(batch)] = backbone(batch).float().numpy()
            out.flush()
            del out
        log.info("cached %d backbone features in %s", len(rows), path)
    features = RowTensors(np.load(path, mmap_mode="r"), rows)
    datasets = {name: CrossModalDataset(prepared.data, getattr(prepared, name).indices, None, images=features)
                for name in ("train", "query", "database")}
    return dataclasses.replace(prepared, **datasets)


def load_trained(checkpoint: str | Path) -> tuple[RunConfig, HashingMethod, ckpt_io.Checkpoint]:
    """Rebuild the trained method from a checkpoint directory (``out_dir/best`` or ``/last``,
    or the run's out_dir, which means its ``best``), on CPU, in eval mode.

    Everything comes from the checkpoint: the config, the data facts the method was built
    with, and every module's weights (a backbone weights file named in the config is not
    needed any more). Training-only state (code matrix, banks) is not restored.
    """
    path = Path(checkpoint)
    if not ckpt_io.exists(path) and ckpt_io.exists(path / "best"):
        path = path / "best"  # a run's out_dir means its best checkpoint
    ckpt = ckpt_io.read_checkpoint(path)
    meta = ckpt.meta
    raw = dict(meta["config"])
    model = dict(raw.get("model") or {})
    if model.get("backbone_weights") is not None:
        model["backbone_weights"] = None  # the trained weights are in the checkpoint
    config = build_config({**raw, "model": model})
    n_train = int(meta.get("n_train", 1))
    info = DatasetInfo(
        n_train=n_train,
        n_labels=int(meta["n_labels"]),
        text_dim=int(meta["text_dim"]),
        # the label graph is a buffer of the checkpoint; these labels only have to be well-formed
        train_labels=torch.zeros(n_train, int(meta["n_labels"])),
        label_names=list(meta.get("label_names") or []),
        image_size=int(meta.get("image_size", 224)),
        preprocessing=dict(meta.get("preprocessing") or {}),
        vocabulary=meta.get("vocabulary"),
    )
    fit_torch_threads()
    torch.manual_seed(0)
    with architecture_only():  # the checkpoint holds every weight: nothing to fetch
        method = get_method(config.method)(config.model, info)
    modules = method.modules()
    if sorted(modules) != meta["modules"]:
        raise ckpt_io.CheckpointError(f"checkpoint {ckpt.path} holds modules {meta['modules']}, "
                                      f"but method {config.method!r} has {sorted(modules)}")
    for name, module in modules.items():
        module.load_state_dict(ckpt.module_state(name), strict=True)
        module.eval()
    return config, method, ckpt


def _whole_dataset(spec: Mapping[str, Any], method: HashingMethod, vocabulary: Vocabulary | None) -> CrossModalDataset:
    """Every sample of the data section ``spec`` as one dataset, texts over the model's vocabulary."""
    options = {k: v for k, v in spec.items() if k not in DATA_KEYS}
    if options.get("source") == "manifest" and options.get("label_names") is None and method.info.label_names:
        options["label_names"] = list(method.info.label_names)  # the model's label columns, in its order
    data = load_data(options)
    if data.texts is not None:
        if vocabulary is None:
            raise ConfigError(f"{data.name} has raw texts, but the model has no vocabulary to encode them with")
        data = data.with_vocabulary(vocabulary)
    elif data.vocabulary.dim != method.info.text_dim:
        raise ConfigError(f"{data.name} has {data.vocabulary.dim} text terms; the model takes {method.info.text_dim}")
    if method.info.label_names and data.label_names != method.info.label_names:
        log.warning("%s: its label names differ from the model's; relevance uses the data's own labels", data.name)
    return CrossModalDataset(data, np.arange(len(data)), build_transform(method.info.preprocessing))


def evaluate(checkpoint: str | Path, query: Mapping[str, Any] | None = None, database: Mapping[str, Any] | None = None,
             precision_k: Sequence[int] = (100,), map_k: int | None = None, batch_size: int = 256) -> dict[str, Any]:
    """I->T and T->I retrieval metrics of a trained model.

    By default on the query and database sets of the run's own data and split; with ``query``
    and ``database`` (data sections, e.g. ``{"source": "manifest", "path": ...}``) every item
    of the one is a query against every item of the other. Texts are always encoded over the
    model's own vocabulary. Returns {"i2t": {...}, "t2i": {...}, "n_query", "n_database",
    "bits", "pretrained"}; each direction has "map", "tie_aware_map" and "precision@k" for each
    k; "pretrained" names the weights the backbone started from (None: from scratch).
    """
    if (query is None) != (database is None):
        raise ConfigError("give both query and database data, or neither")
    config, method, ckpt = load_trained(checkpoint)
    vocabulary = Vocabulary.from_dict(method.info.vocabulary) if method.info.vocabulary else None
    if query is None:
        prepared = prepare_data(config, vocabulary)
        query_set, database_set = prepared.query, prepared.database
    else:
        query_set = _whole_dataset(query, method, vocabulary)
        database_set = _whole_dataset(database, method, vocabulary)
        if query_set.data.num_labels != database_set.data.num_labels:
            raise ConfigError(f"query data has {query_set.data.num_labels} labels, database data "
                              f"{database_set.data.num_labels}: relevance needs the same label set")
    codes = encode_both(method, query_set, database_set, batch_size)
    return {"bits": config.model.bits, **retrieval_summary(*codes, precision_k=precision_k, map_k=map_k),
            "pretrained": ckpt.meta.get("pretrained")}


def encode_both(method: HashingMethod, query_set: Dataset, database_set: Dataset, batch_size: int = 256):
    """Packed image and text codes and labels of the query set, then of the database set,
    with the method's towers as they are (on their device, in their mode)."""
    device = next(method.image_tower().parameters()).device
    q_img, q_txt, q_lab = encode_dataset(method, query_set, device, batch_size, what="query")
    d_img, d_txt, d_lab = encode_dataset(method, database_set, device, batch_size, what="database")
    return q_img, q_txt, q_lab, d_img, d_txt, d_lab


def retrieval_summary(q_img, q_txt, q_lab, d_img, d_txt, d_lab, precision_k: Sequence[int] = (100,),
                      map_k: int | None = None) -> dict[str, Any]:
    """Both directions' mAP, tie-aware mAP and precision@k from packed codes and labels."""
    out: dict[str, Any] = {"n_query": int(len(q_lab)), "n_database": int(len(d_lab))}
    for name, (q, d) in {"i2t": (q_img, d_txt), "t2i": (q_txt, d_img)}.items():
        result = retrieval_metrics(q, d, q_lab, d_lab, map_k=(map_k,), precision_k=tuple(precision_k), tie_aware=True)
        out[name] = {"map": float(result["map"][map_k]), "tie_aware_map": float(result["tie_aware_map"]),
                     **{f"precision@{k}": float(v) for k, v in result["precision"].items()}}
    return out
