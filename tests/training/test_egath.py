"""EGATH: config, towers, loss terms and ablations, the discrete update, the schedule, the
run glue (data preparation, checkpoints back to towers, evaluation), the CLI, and learning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cmhash.cli import main as cli
from cmhash.training.blocks import dcg_triplet_loss, quantization_loss
from cmhash.training.errors import ConfigError
from cmhash.training.method import get_method
from cmhash.training.run import evaluate, list_configs, load_config, load_trained, prepare_data, train
from cmhash.training.trainer import build_method

from conftest import SHAPES, SHARED_DATA, first_batch, require

TINY_MODEL = [
    "model.bits=16", "model.backbone=clip:tiny-resnet", "model.d_model=32", "model.heads=2", "model.ffn_dim=64",
    "model.hidden=64", "model.gat_hidden=32", "model.label_embedding_dim=16", "model.lr=1e-3",
    "model.backbone_lr=1e-3", "model.final_lr=1e-4", "model.decay_epochs=2",
    "train.epochs=2", "train.batch_size=32", "train.progress=false", "train.device=cpu",
]
TINY = TINY_MODEL + SHAPES


def tiny_config(tmp_path: Path, *overrides: str, data: list[str] = SHAPES):
    return load_config(None, ["method=egath", *TINY_MODEL, *data, f"train.out_dir={tmp_path / 'run'}", *overrides])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_data(tiny_config(tmp_path_factory.mktemp("prep")))


# --------------------------------------------------------------------------- config


def test_config_checks_before_any_training(tmp_path):
    with pytest.raises(ConfigError, match="multiple of model.heads"):
        tiny_config(tmp_path, "model.heads=3")
    with pytest.raises(ConfigError, match="multiple of 8"):
        tiny_config(tmp_path, "model.bits=12")
    with pytest.raises(ConfigError, match="no_such_key"):
        tiny_config(tmp_path, "model.no_such_key=1")
    with pytest.raises(ConfigError, match="graph_threshold"):
        tiny_config(tmp_path, "model.graph_threshold=0")


def test_every_shipped_config_is_valid():
    shipped = {name for name in list_configs() if name.startswith("egath/")}
    assert {"egath/demo", "egath/mirflickr-mini", "egath/mirflickr25k", "egath/nuswide10", "egath/mscoco"} <= shipped
    published = {f"egath/{d}-{b}" for d in ("mirflickr25k", "nuswide10", "mscoco") for b in (16, 32, 64)}
    for name in sorted(shipped | published):
        config = load_config(name)
        assert config.method == "egath"
        if "nuswide" in name:
            assert config.model.graph_threshold == 0.01  # spec §4
        if name in published:
            assert config.model.backbone == "clip:ViT-B-32" and config.model.bits == int(name.rsplit("-", 1)[1])
            assert config.train.out_dir == f"runs/{name.replace('/', '-')}"
    # a published name is its dataset's config with model.bits; the user's overrides come last
    assert load_config("egath/mscoco").model.bits == 64
    assert load_config("egath/mscoco-16", ["train.out_dir=x"]).train.out_dir == "x"
    assert load_config("egath/demo-16").model.bits == 16
    with pytest.raises(ConfigError, match="shipped: .*egath/demo"):
        load_config("egath/nope")


def test_paper_defaults():
    c = get_method("egath").Config()
    assert (c.d_model, c.heads, c.ffn_dim, c.layers, c.hidden) == (512, 8, 2048, 1, 2048)
    assert (c.margin, c.triplet_weight, c.mu, c.weight_decay, c.lr, c.backbone_lr) == (0.3, 10.0, 0.5, 5e-4, 1e-4, 1e-5)
    assert (c.gat_hidden, c.gat_slope, c.gat_dropout, c.graph_threshold) == (1024, 0.2, 0.0, 0.3)


# --------------------------------------------------------------------------- model


def test_towers_take_one_modality_and_are_per_sample(tmp_path, prepared):
    method = build_method(tiny_config(tmp_path), prepared.info)
    batch = first_batch(prepared, 8)
    image, text = method.image_tower().eval(), method.text_tower().eval()
    with torch.no_grad():
        h_i, h_t = image(batch.image), text(batch.text)
        assert h_i.shape == h_t.shape == (8, 16)
        assert h_i.abs().max() < 1 and h_t.abs().max() < 1
        # a sample's code does not depend on the rest of the batch (no attention across it)
        torch.testing.assert_close(image(batch.image[3:4]), h_i[3:4], atol=1e-5, rtol=0)
        torch.testing.assert_close(text(batch.text[5:6]), h_t[5:6], atol=1e-5, rtol=0)
    assert set(method.modules()) == {"image", "text", "classifier"}
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in method.modules()["classifier"].modules())


def test_loss_terms_equal_their_definitions(tmp_path, prepared):
    torch.manual_seed(0)
    method = build_method(tiny_config(tmp_path, "model.dropout=0"), prepared.info)
    batch = first_batch(prepared)
    terms = method.losses(batch)
    with torch.no_grad():
        f_i, h_i = method.image.encode(batch.image)
        f_t, h_t = method.text.encode(batch.text)
        b = method.codes.rows(batch.index)
        triplet = sum(dcg_triplet_loss(a, t, batch.labels, margin=0.3) for a, t in
                      ((h_i, h_t), (h_i, h_i), (h_t, h_i), (h_t, h_t)))
        quant = ((b - h_i) ** 2).sum() + ((b - h_t) ** 2).sum()
        logits = torch.cat([f_i, f_t], 1) @ method.classifier.label_vectors().T
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
    torch.testing.assert_close(terms["triplet"].detach(), triplet, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(terms["quantization"].detach(), quant, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms["classification"].detach(), bce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"].detach(), 10 * triplet + quant + bce, rtol=1e-4, atol=1e-3)
    # the batch's tanh outputs are stored for the epoch's discrete update
    torch.testing.assert_close(method.image_codes[: len(batch.index)], h_i)
    assert float(quantization_loss(b, b)) == 0.0


def test_every_part_gets_gradients(tmp_path, prepared):
    method = build_method(tiny_config(tmp_path), prepared.info)
    method.losses(first_batch(prepared))["loss"].backward()
    for name, module in method.modules().items():
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert any(float(g.abs().sum()) > 0 for g in grads), name


def test_ablations(tmp_path, prepared):
    no_gat = build_method(tiny_config(tmp_path, "model.use_gat=false"), prepared.info)
    assert "classifier" not in no_gat.modules()
    assert set(no_gat.losses(first_batch(prepared))) == {"triplet", "quantization", "loss"}
    no_triplet = build_method(tiny_config(tmp_path, "model.use_triplet=false"), prepared.info)
    assert set(no_triplet.losses(first_batch(prepared))) == {"quantization", "classification", "loss"}
    per_modality = build_method(tiny_config(tmp_path, "model.per_modality=true"), prepared.info)
    assert per_modality.classifier.label_vectors().shape == (prepared.info.n_labels, 64)


def test_glove_label_embeddings_are_used_when_given(tmp_path):
    glove = require(SHARED_DATA / "label_glove" / "mir_glove.mat")
    data = require(SHARED_DATA / "mirflickr-mini")
    config = tiny_config(tmp_path, f"model.label_embeddings={glove}",
                         data=["data.source=mirflickr-mini", f"data.root={data}", "data.split={query: 20, train: 60, seed: 0}"])
    method = build_method(config, prepare_data(config).info)
    embeddings = method.classifier.embeddings
    assert embeddings.source == "glove:mir_glove.mat" and embeddings().shape == (24, 300)
    assert not any(p is embeddings.vectors for p in method.classifier.parameters())  # fixed, not learned


def test_discrete_update_and_schedule_over_epochs(tmp_path):
    result = train(tiny_config(tmp_path, "train.epochs=2", "train.eval_every=0"))
    _, method, ckpt = load_trained(result.out_dir / "last")
    state = ckpt.method_state()
    b = state["codes.B"]
    assert set(b.unique().tolist()) <= {-1.0, 1.0} and b.shape == (96, 16)
    p = state["codes.P"]
    torch.testing.assert_close(p.T @ p, torch.eye(16), atol=1e-4, rtol=0)  # orthonormal columns
    assert math.isclose(float(state["codes.gamma"]), 0.01 * 1.05 ** 2, rel_tol=1e-6)
    # lr_e = lr_0 * g^(e+1), g = (final / lr_0)^(1 / decay_epochs): after 2 of 2 epochs, final_lr
    lrs = [g["lr"] for g in ckpt.restore("optimizers")["adam"]["param_groups"]]
    assert lrs == pytest.approx([1e-4, 1e-4])
    assert [row["lr/adam"] for row in result.history] == pytest.approx([1e-3, 1e-3 * 0.1 ** 0.5])  # lr during the epoch


# --------------------------------------------------------------------------- glue


def test_cached_images_equal_decoded_ones(tmp_path):
    cached = prepare_data(tiny_config(tmp_path))
    decoded = prepare_data(tiny_config(tmp_path, "data.cache=false"))
    for k in (0, 17, 95):
        for a, b in zip(cached.train[k], decoded.train[k]):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert cached.info.vocabulary == decoded.info.vocabulary and cached.info.text_dim == decoded.info.text_dim
    with pytest.raises(ConfigError, match="augment"):
        prepare_data(tiny_config(tmp_path, "data.augment=true"))
    with pytest.raises(ConfigError, match="vocabulary has unknown"):
        prepare_data(tiny_config(tmp_path, "data.vocabulary={min_cnt: 2}"))


def test_vocabulary_comes_from_training_texts_only(prepared):
    from cmhash.text import Vocabulary
    from cmhash.training.data import load_data

    raw = load_data({"source": "shapes", "n": 160, "seed": 0})
    vocab = Vocabulary.from_dict(prepared.info.vocabulary)
    assert vocab == raw.build_vocabulary(prepared.split.train)
    assert vocab.rules["ngram_max"] == 2 and len(vocab) == prepared.info.text_dim


def test_checkpoint_rebuilds_the_same_towers(tmp_path, prepared):
    result = train(tiny_config(tmp_path, "train.epochs=1"))
    config, method, _ = load_trained(result.out_dir)  # the run folder means its best checkpoint
    assert config.method == "egath" and not method.image.training
    batch = first_batch(prepared, 8)
    trained = load_trained(result.out_dir / "best")[1]
    with torch.no_grad():
        assert torch.equal(method.image_tower()(batch.image), trained.image_tower()(batch.image))
    # evaluation from the checkpoint alone reproduces the trainer's own numbers
    scores = evaluate(result.out_dir / "best")
    assert scores["i2t"]["map"] == pytest.approx(result.best["map_i2t"], abs=1e-9)
    assert scores["t2i"]["map"] == pytest.approx(result.best["map_t2i"], abs=1e-9)
    assert 0 <= scores["i2t"]["precision@100"] <= 1 and scores["n_query"] == 32


def test_eval_cli_on_two_manifests(tmp_path, capsys):
    from cmhash.training.data import captions, make_shapes

    data = make_shapes(40, seed=5)
    texts = captions(data)
    for part, rows in (("query", range(0, 10)), ("db", range(10, 40))):
        lines = []
        for i in rows:
            data.images.load(i).save(tmp_path / f"{i}.png")
            names = [data.label_names[j] for j in np.flatnonzero(data.labels[i])]
            lines.append(json.dumps({"image": f"{i}.png", "text": texts[i], "labels": names}))
        (tmp_path / f"{part}.jsonl").write_text("\n".join(lines) + "\n")
    result = train(tiny_config(tmp_path, "train.epochs=1"))
    assert cli(["eval", str(result.out_dir / "best"), "--query", str(tmp_path / "query.jsonl"),
                "--database", str(tmp_path / "db.jsonl"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_query"] == 10 and out["n_database"] == 30 and 0 < out["i2t"]["map"] <= 1
    assert cli(["eval", str(result.out_dir / "best"), "--query", str(tmp_path / "query.jsonl")]) == 2
    assert "both --query and --database" in capsys.readouterr().err


def test_train_cli_with_overrides(tmp_path, capsys):
    args = ["train", "egath/demo", *TINY, f"train.out_dir={tmp_path / 'cli'}", "train.epochs=1", "--json"]
    assert cli(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["out_dir"] == str(tmp_path / "cli") and out["best"]["epoch"] == 1
    assert (tmp_path / "cli" / "best" / "model.safetensors").is_file()
    assert cli(["train", "egath/demo", "model.bits=12"]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_missing_mirflickr_images_are_named_before_training(tmp_path, capsys):
    arrays = require(SHARED_DATA / "mirflickr25k" / "labels_tags.npz")
    images = tmp_path / "images"
    images.mkdir()
    args = ["train", "egath/mirflickr25k-64", f"data.arrays={arrays}", f"data.image_root={images}",
            f"train.out_dir={tmp_path / 'run'}", "model.pretrained=null"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "20015" in err and "im1.jpg" in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- learning


def test_learns_real_mirflickr_photos_better_than_random(tmp_path):
    root = require(SHARED_DATA / "mirflickr-mini")
    config = load_config("egath/mirflickr-mini",
                         [f"data.root={root}", f"model.label_embeddings={SHARED_DATA / 'label_glove' / 'mir_glove.mat'}",
                          f"train.out_dir={tmp_path / 'run'}", "train.progress=false", "train.device=cpu"])
    result = train(config)
    scores = evaluate(result.out_dir / "last")
    prepared = prepare_data(config)
    rng = np.random.default_rng(0)
    from cmhash.metrics import mean_average_precision

    q_lab, d_lab = prepared.query.labels.numpy(), prepared.database.labels.numpy()
    chance = np.mean([mean_average_precision(rng.integers(0, 256, (len(q_lab), 4), dtype=np.uint8),
                                             rng.integers(0, 256, (len(d_lab), 4), dtype=np.uint8), q_lab, d_lab)
                      for _ in range(5)])
    print(f"mirflickr-mini: I->T {scores['i2t']['map']:.4f}, T->I {scores['t2i']['map']:.4f}, random {chance:.4f}")
    assert scores["i2t"]["map"] > chance + 0.02 and scores["t2i"]["map"] > chance + 0.02


@pytest.mark.slow
def test_demo_learns_the_generated_dataset(tmp_path, capsys):
    # one thread, train.seed 0: 0.97 both ways with AVX-512 kernels and with torch pinned to AVX2
    # (one seed each); random codes score 0.23
    assert cli(["demo", "--out", str(tmp_path / "demo"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    print(out)
    assert out["i2t"] >= 0.85 and out["t2i"] >= 0.85, out
    assert out["random"] < 0.6
    assert len(out["example"]["captions"]) == 5
    assert (tmp_path / "demo" / "best" / "checkpoint.json").is_file()


def test_feature_cache_gives_the_same_training(tmp_path):
    frozen = ["model.freeze_backbone=true", "train.epochs=1", "train.eval_every=0"]
    plain = train(tiny_config(tmp_path / "plain", *frozen))
    cached = train(tiny_config(tmp_path / "cached", *frozen, f"data.feature_cache={tmp_path / 'features'}"))
    files = list((tmp_path / "features").glob("features-*.f32"))
    assert len(files) == 1 and not list((tmp_path / "features").glob("*.tmp"))
    assert cached.last["map_i2t"] == pytest.approx(plain.last["map_i2t"], abs=0.02)
    a = load_trained(plain.out_dir / "last")[1].text.state_dict()
    b = load_trained(cached.out_dir / "last")[1].text.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)
    # a second run reuses the file; a trainable backbone refuses the cache
    train(tiny_config(tmp_path / "again", *frozen, f"data.feature_cache={tmp_path / 'features'}"))
    assert list((tmp_path / "features").glob("features-*.f32")) == files
    with pytest.raises(ConfigError, match="frozen image backbone"):
        train(tiny_config(tmp_path / "x", "train.epochs=1", f"data.feature_cache={tmp_path / 'features'}"))


def test_demo_exports_a_bundle_and_searches_with_the_sdk(tmp_path):
    pytest.importorskip("onnx")
    from cmhash.export.demo import demo

    small = ["data.n=300", "data.split={query: 50, train: 200, seed: 0}", "train.epochs=1", "model.decay_epochs=1"]
    result = demo(tmp_path / "demo", progress=False, overrides=small)
    deployed = result["deployed"]
    # raw captions and PIL images through the bundle give PyTorch's codes, hence its mAP
    assert min(deployed["bits_equal_to_pytorch"].values()) >= 0.999
    assert deployed["i2t"] == pytest.approx(result["i2t"], abs=0.01)
    assert deployed["t2i"] == pytest.approx(result["t2i"], abs=0.01)
    assert result["bundle"] == str(tmp_path / "demo" / "bundle")
    assert (tmp_path / "demo" / "bundle" / "manifest.json").is_file()
    assert len(result["example"]["distances"]) == 5
