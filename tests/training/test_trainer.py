"""The trainer on the tiny ``toy`` method: config, determinism, resume, checkpoints, NaN stop,
evaluation and model selection, logs, torchrun over gloo, interrupted checkpoint writes."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from cmhash.text import Vocabulary  # noqa: E402
from cmhash.training import checkpoint as ckpt_io  # noqa: E402
from cmhash.training.run import load_config  # noqa: E402
from cmhash.training.errors import ConfigError  # noqa: E402
from cmhash.training.method import get_method, list_methods  # noqa: E402
from cmhash.training.trainer import NonFiniteLossError, Trainer, build_method  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import toy_method  # noqa: E402  (registers "toy")

TIMING_COLUMNS = ("seconds", "eval_seconds")


def toy_config(out_dir: Path, *overrides: str):
    return load_config(
        None,
        ["method=toy", f"train.out_dir={out_dir}", "train.device=cpu", "train.batch_size=16",
         "train.progress=false", "train.epochs=2", *overrides],
    )


def make_trainer(config) -> Trainer:
    train_set = toy_method.ToyDataset(64, seed=0)
    method = build_method(config, train_set.info())
    return Trainer(config, method, train_set, toy_method.ToyDataset(16, seed=1), toy_method.ToyDataset(48, seed=2))


def everything(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor a run ends with: weights, buffers, method state, optimiser and scheduler state."""
    method = trainer.method
    out = {f"{n}.{k}": v for n, m in method.modules().items() for k, v in m.state_dict().items()}
    out.update({f"state/{k}": v for k, v in method.state_tensors().items()})
    for name, opt in method.optimizers().items():
        sd = opt.state_dict()
        for pid, state in sd["state"].items():
            out.update({f"optim/{name}/{pid}/{k}": v for k, v in state.items()})
        out[f"optim/{name}/lr"] = torch.tensor([g["lr"] for g in sd["param_groups"]], dtype=torch.float64)
    for name, sched in method.schedulers().items():
        out[f"sched/{name}/last_epoch"] = torch.tensor(sched.state_dict()["last_epoch"])
    return out


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def without_timing(history):
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in history]


# --------------------------------------------------------------------------- config


def test_yaml_config_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: toy\ndata: {root: /data/mir}\nmodel: {bits: 32}\ntrain: {epochs: 7, seed: 3}\n")
    config = load_config(path, ["train.epochs=3", "model.lr=1e-3", "data.root=/x", "data.split.query=2000", "eval.map_k=50"])
    assert config.method == "toy"
    assert config.model.bits == 32 and config.model.lr == 0.001  # "1e-3" is a YAML string; read as a number
    assert config.train.epochs == 3 and config.train.seed == 3
    assert config.data == {"root": "/x", "split": {"query": 2000}}
    assert config.eval.map_k == 50
    assert config.to_dict()["model"]["bits"] == 32


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.bitz=32", r"'model\.bitz'.*valid keys in 'model': bits, dropout, hidden"),
        ("train.epoch=3", r"'train\.epoch'.*valid keys in 'train': amp, amp_dtype, batch_size"),
        ("eval.mapk=3", r"valid keys in 'eval': batch_size, map_k"),
        ("trian.epochs=3", r"unknown section 'trian'; valid sections: method, data, model, train, eval"),
        ("train.epochs=three", r"train\.epochs must be an integer, got 'three'"),
        ("train.amp=1", r"train\.amp must be true or false"),
        ("train.device=tpu", r"train\.device must be"),
        ("data=[1, 2]", r"'data' must be a mapping"),
        ("train.epochs", r"must look like section\.key=value"),
    ],
)
def test_config_errors_name_the_key_and_the_valid_ones(tmp_path, override, expected):
    with pytest.raises(ConfigError, match=expected):
        toy_config(tmp_path, override)


@pytest.mark.parametrize("value, expected", [("12", "must be a positive multiple of 8"), ("0", "must be a positive multiple of 8"),
                                             ("-8", "must be a positive multiple of 8"), ("'32'", "must be an integer")])
def test_bits_must_be_a_positive_multiple_of_8(tmp_path, value, expected):
    with pytest.raises(ConfigError, match=f"model.bits {expected}"):
        toy_config(tmp_path, f"model.bits={value}")


def test_method_config_from_a_dict():
    config = toy_method.ToyConfig.from_dict({"bits": 32, "lr": "1e-3"})
    assert (config.bits, config.lr, config.hidden) == (32, 0.001, 32)
    assert toy_method.ToyConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"unknown key 'model.depth'; valid keys in 'model': bits, dropout"):
        toy_method.ToyConfig.from_dict({"depth": 3})


def test_unknown_method_lists_the_registered_ones(tmp_path):
    assert "toy" in list_methods()
    assert get_method("toy") is toy_method.ToyMethod
    with pytest.raises(ValueError, match=r"unknown method 'egath2'; registered methods: .*toy"):
        get_method("egath2")
    with pytest.raises(ConfigError, match="registered methods"):
        toy_config(tmp_path, "method=egath2")


def test_built_in_methods_are_listed_and_imported_on_first_use(tmp_path, monkeypatch):
    from cmhash.training import method as method_module

    package = tmp_path / "fake_models"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "lazy.py").write_text(
        "import toy_method\n"
        "from cmhash.training.method import register_method\n"
        "@register_method('lazy')\n"
        "class Lazy(toy_method.ToyMethod):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(method_module, "BUILTIN_PACKAGE", "fake_models")
    assert "lazy" in list_methods() and "fake_models.lazy" not in sys.modules
    try:
        assert get_method("lazy").__module__ == "fake_models.lazy"
    finally:
        method_module._REGISTRY.pop("lazy", None)
        for name in ("fake_models.lazy", "fake_models"):
            sys.modules.pop(name, None)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- determinism and resume


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path):
    a = make_trainer(toy_config(tmp_path / "a"))
    a.fit()
    b = make_trainer(toy_config(tmp_path / "b"))
    b.fit()
    assert_identical(everything(a), everything(b))
    c = make_trainer(toy_config(tmp_path / "c", "train.seed=1"))
    c.fit()
    assert not torch.equal(everything(a)["text_net.net.0.weight"], everything(c)["text_net.net.0.weight"])


def test_resume_reaches_bitwise_the_same_state_as_an_uninterrupted_run(tmp_path):
    straight = make_trainer(toy_config(tmp_path / "straight", "train.epochs=4"))
    straight_result = straight.fit()

    first = make_trainer(toy_config(tmp_path / "resumed", "train.epochs=2"))
    first.fit()
    assert ckpt_io.read_checkpoint(tmp_path / "resumed" / "last").meta["epoch"] == 2
    # A new process would build the method afresh; the checkpoint must restore everything.
    resumed = make_trainer(toy_config(tmp_path / "resumed", "train.epochs=4", "train.resume=true"))
    assert resumed.start_epoch == 2
    resumed_result = resumed.fit()

    assert_identical(everything(straight), everything(resumed))
    assert without_timing(resumed_result.history) == without_timing(straight_result.history)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_resume_from_an_explicit_path(tmp_path):
    make_trainer(toy_config(tmp_path / "a", "train.epochs=1")).fit()
    trainer = make_trainer(toy_config(tmp_path / "b", f"train.resume_from={tmp_path / 'a' / 'last'}"))
    assert trainer.start_epoch == 1 and trainer.ctx.global_step == 4
    with pytest.raises(ckpt_io.CheckpointError, match="no checkpoint at"):
        make_trainer(toy_config(tmp_path / "c", f"train.resume_from={tmp_path / 'missing'}"))


def test_resume_refuses_another_model_config(tmp_path):
    make_trainer(toy_config(tmp_path, "train.epochs=1")).fit()
    with pytest.raises(ConfigError, match=r"model.hidden \(32 -> 16\)"):
        make_trainer(toy_config(tmp_path, "train.resume=true", "model.hidden=16"))


# --------------------------------------------------------------------------- checkpoints


def read_safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def test_checkpoint_is_safetensors_and_json_only(tmp_path):
    trainer = make_trainer(toy_config(tmp_path))
    trainer.fit()
    last = tmp_path / "last"
    assert sorted(p.name for p in last.iterdir()) == ["checkpoint.json", "model.safetensors", "state.safetensors"]
    for name in ("model.safetensors", "state.safetensors"):
        header = read_safetensors_header(last / name)  # a safetensors file: 8-byte length + JSON header
        assert all(set(v) == {"dtype", "shape", "data_offsets"} for k, v in header.items() if k != "__metadata__")
    meta = json.loads((last / "checkpoint.json").read_text())
    assert meta["method"] == "toy" and meta["epoch"] == 2 and meta["global_step"] == 8
    assert meta["label_names"] == [f"class{i}" for i in range(4)] and Vocabulary.from_dict(meta["vocabulary"]).dim == 16
    assert meta["versions"]["torch"] == torch.__version__ and meta["config"]["model"]["bits"] == 16

    model = load_file(str(last / "model.safetensors"))
    state = load_file(str(last / "state.safetensors"))
    assert {k.split(".")[0] for k in model} == {"image_net", "text_net"}
    assert torch.equal(model["text_net.net.0.weight"], trainer.method.text_net.net[0].weight)
    assert torch.equal(state["method/B"], trainer.method.B)
    assert "optim/image/state/0/exp_avg" in state
    assert ckpt_io.read_checkpoint(last).restore("optimizers")["image"]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_flatten_round_trips_optimizer_like_state_and_refuses_objects():
    state = {"state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}}, "param_groups": [{"betas": (0.9, 0.99), "params": [0], "x": None}]}
    tensors: dict[str, torch.Tensor] = {}
    encoded = json.loads(json.dumps(ckpt_io.flatten(state, "opt", tensors)))
    decoded = ckpt_io.unflatten(encoded, tensors)
    assert decoded["param_groups"] == state["param_groups"]
    assert list(decoded["state"]) == [0] and torch.equal(decoded["state"][0]["m"], torch.ones(2))
    with pytest.raises(ckpt_io.CheckpointError, match="without pickle"):
        ckpt_io.flatten({"f": object()}, "opt", {})


def test_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    make_trainer(toy_config(tmp_path)).fit()
    last = tmp_path / "last"
    before = ckpt_io.read_checkpoint(last)
    # A meta-device tensor has no data: safetensors fails while writing state.safetensors,
    # after model.safetensors of the new checkpoint has already been written.
    with pytest.raises(Exception):
        ckpt_io.write_checkpoint(last, before.model, {"method/B": torch.empty(3, device="meta")}, {"epoch": 99})
    assert (tmp_path / "last.tmp" / "model.safetensors").exists()
    after = ckpt_io.read_checkpoint(last)
    assert after.meta["epoch"] == 2 and after.meta["sha256"] == before.meta["sha256"]

    # A crash between the two renames leaves only last.old: it is found and resumed from.
    os.rename(last, tmp_path / "last.old")
    trainer = make_trainer(toy_config(tmp_path, "train.resume=true", "train.epochs=3"))
    assert trainer.start_epoch == 2
    trainer.fit()
    assert ckpt_io.read_checkpoint(last).meta["epoch"] == 3
    assert not (tmp_path / "last.old").exists() and not (tmp_path / "last.tmp").exists()


def test_edited_checkpoint_fails_its_checksum(tmp_path):
    make_trainer(toy_config(tmp_path, "train.epochs=1")).fit()
    path = tmp_path / "last" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt_io.CheckpointError, match="sha256"):
        ckpt_io.read_checkpoint(tmp_path / "last")


# --------------------------------------------------------------------------- NaN, evaluation, logs


def test_nan_loss_stops_with_a_typed_error_and_keeps_the_last_good_checkpoint(tmp_path):
    # 64 items / batch 16 = 4 steps per epoch: global step 5 (0-based) is epoch 2, step 2.
    trainer = make_trainer(toy_config(tmp_path, "train.epochs=3", "model.nan_at_step=5"))
    with pytest.raises(NonFiniteLossError, match=r"loss term 'pairwise' of backward step 'image' is nan at epoch 2, step 2 \(global step 6\)") as err:
        trainer.fit()
    assert (err.value.epoch, err.value.step, err.value.term) == (2, 2, "pairwise")
    assert ckpt_io.read_checkpoint(tmp_path / "last").meta["epoch"] == 1


def test_evaluation_logs_and_best_checkpoint(tmp_path):
    result = make_trainer(toy_config(tmp_path, "train.epochs=6", "train.eval_every=2")).fit()
    evaluated = [row for row in result.history if "map_mean" in row]
    assert [row["epoch"] for row in evaluated] == [2, 4, 6]
    for row in evaluated:
        assert 0.0 <= row["map_i2t"] <= 1.0 and 0.0 <= row["map_t2i"] <= 1.0
        assert row["map_mean"] == pytest.approx((row["map_i2t"] + row["map_t2i"]) / 2)
    best_row = max(evaluated, key=lambda row: row["map_mean"])
    assert result.best["epoch"] == best_row["epoch"]
    assert ckpt_io.read_checkpoint(tmp_path / "best").meta["epoch"] == best_row["epoch"]
    assert ckpt_io.read_checkpoint(tmp_path / "last").meta["history"][-1]["map_mean"] == evaluated[-1]["map_mean"]

    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert jsonl == result.history
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and float(rows[1]["map_mean"]) == pytest.approx(evaluated[0]["map_mean"])
    assert rows[0]["map_mean"] == "" and float(rows[0]["loss/pairwise"]) > 0 and float(rows[0]["lr/image"]) == 0.03
    if importlib.util.find_spec("tensorboard") is not None:
        assert any((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_learning_improves_retrieval_over_chance(tmp_path):
    result = make_trainer(toy_config(tmp_path, "train.epochs=6")).fit()
    untrained = make_trainer(toy_config(tmp_path / "zero", "train.epochs=1", "model.lr=0")).fit()
    # the gap measured over train.seed 0-4 (one thread): 0.32 to 0.41; an untrained model's is 0
    assert result.best["map_mean"] > untrained.best["map_mean"] + 0.15


# --------------------------------------------------------------------------- torchrun


def test_torchrun_two_processes_over_gloo_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HERE / "toy_method.py"), str(out), "train.epochs=2", "train.batch_size=8", "train.progress=false"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [load_file(str(out / f"final-rank{r}.safetensors")) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and "image_net.features.1.running_mean" in ranks[0]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    ckpt = ckpt_io.read_checkpoint(out / "last")
    assert ckpt.meta["world_size"] == 2 and ckpt.meta["global_step"] == 8  # 64 items / 2 ranks / batch 8, x2 epochs
    assert torch.equal(ckpt.model["text_net.net.0.weight"], ranks[0]["text_net.net.0.weight"])
    assert torch.equal(ckpt.method_state()["B"], ranks[1]["state/B"])


# --------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_on_cuda(tmp_path, dtype):
    config = toy_config(tmp_path, "train.device=cuda", "train.amp=true", f"train.amp_dtype={dtype}", "train.epochs=3")
    result = make_trainer(config).fit()
    assert all(0 <= row["map_mean"] <= 1 for row in result.history if "map_mean" in row)
    resumed = make_trainer(toy_config(tmp_path, "train.device=cuda", "train.amp=true", f"train.amp_dtype={dtype}",
                                      "train.epochs=4", "train.resume=true"))
    assert resumed.start_epoch == 3
    resumed.fit()


def saved_epochs(path: Path) -> int:
    """Epochs in the checkpoint at ``path``, 0 while there is none (or it is being replaced)."""
    try:
        return json.loads((path / "checkpoint.json").read_text())["epoch"]
    except (OSError, ValueError):
        return 0


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL a training process at an arbitrary moment (maybe mid-checkpoint), resume, compare."""
    out = tmp_path / "killed"
    # CPU results are bitwise equal only at equal thread counts: the child gets this process's.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "toy_method.py"), str(out), "train.epochs=1000", "train.batch_size=16",
         "train.eval_every=0", "train.progress=false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while saved_epochs(out / "last") < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the training process made no progress"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    done = ckpt_io.read_checkpoint(out / "last").meta["epoch"]  # (or last.old, if killed mid-replace)
    assert done >= 3
    # Train both to the same end: the resumed run continues two epochs past the kill.
    resumed = make_trainer(toy_config(out, "train.resume=true", f"train.epochs={done + 2}"))
    assert resumed.start_epoch == done
    resumed.fit()
    straight = make_trainer(toy_config(tmp_path / "straight", f"train.epochs={done + 2}"))
    straight.fit()
    assert_identical(everything(straight), everything(resumed))


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch, caplog):
    """Under a log, nohup or a notebook's subprocess a long epoch still reports (step, rate, ETA)."""
    from cmhash.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "PLAIN_PROGRESS_SECONDS", 0.0)
    trainer = make_trainer(toy_config(tmp_path, "train.progress=true", "train.epochs=1"))
    assert trainer.plain_progress and not trainer.show_progress  # pytest's stderr is no terminal
    with caplog.at_level("INFO", logger="cmhash.training"):
        trainer.fit()
    lines = [r.getMessage() for r in caplog.records if "items/s" in r.getMessage()]
    assert lines and lines[0].startswith("epoch 1/1: 16/64 items") and "ETA" in lines[0], lines
    quiet = make_trainer(toy_config(tmp_path / "quiet", "train.epochs=1"))  # train.progress=false
    assert not quiet.plain_progress and not quiet.show_progress
