"""Checkpoints: atomic and finite when saved, nothing saved after a NaN loss, loaded without
running pickled code, and refused when they are for another backbone variant."""
import os
import pickle
import re
import stat

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from conftest import SHAPES_CONFIG, load_config
from hybrid_d2.checkpoint import CheckpointMismatchError, SafeCheckpointer
from hybrid_d2.engine import Trainer
from hybrid_d2.utils import atomic_output

TINY = [
    "SOLVER.IMS_PER_BATCH", 2,
    "INPUT.MIN_SIZE_TRAIN", (96,),
    "INPUT.MAX_SIZE_TRAIN", 160,
    "DATALOADER.NUM_WORKERS", 0,
    "SOLVER.CHECKPOINT_PERIOD", 1,
    "TEST.EVAL_PERIOD", 0,
    "DATASETS.TEST", (),
    "SEED", 11,
]


def _cfg(output_dir, *opts):
    return load_config(SHAPES_CONFIG, [*TINY, "OUTPUT_DIR", str(output_dir), *opts])


def _checkpoints(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".pth"))


def _visible_files(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def trained(shapes_datasets, tmp_path_factory):
    """A two-iteration run of the real Trainer, checkpointing after each iteration."""
    out = tmp_path_factory.mktemp("trained")
    trainer = Trainer(_cfg(out, "SOLVER.MAX_ITER", 2))
    trainer.resume_or_load(resume=False)
    trainer.train()
    return out


@pytest.fixture(scope="module")
def b1_state(trained):
    return torch.load(trained / "model_final.pth", weights_only=True)["model"]


# --- saving ----------------------------------------------------------------------------------


def test_training_checkpoints_load_with_weights_only(trained):
    assert _checkpoints(trained) == ["model_0000000.pth", "model_0000001.pth", "model_final.pth"]
    assert (trained / "last_checkpoint").read_text() == "model_final.pth"
    checkpoint = torch.load(trained / "model_0000001.pth", weights_only=True)
    assert checkpoint["iteration"] == 1
    state = checkpoint["trainer"]
    assert state["iteration"] == 1 and state["seed"] == 11
    assert state["_trainer"]["optimizer"]["state"]  # AdamW moments
    assert state["hooks"]["LRScheduler"]["last_epoch"] == 2


def test_save_refuses_non_finite_weights(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    checkpointer = SafeCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000000")
    with torch.no_grad():
        model[0].weight[0, 1] = float("nan")
        model[1].running_var[0] = float("inf")
    expected = r"model_0000001\.pth: 2 model tensors have NaN or Inf values: 0\.weight, 1\.running"
    with pytest.raises(FloatingPointError, match=expected):
        checkpointer.save("model_0000001")
    assert _visible_files(tmp_path) == ["last_checkpoint", "model_0000000.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"


def test_saving_can_be_disabled(tmp_path):
    checkpointer = SafeCheckpointer(nn.Linear(2, 2), str(tmp_path))
    checkpointer.disable_saving("training failed at iteration 3")
    checkpointer.save("model_final")
    assert _visible_files(tmp_path) == []


def test_stale_temp_files_of_checkpoints_are_removed(tmp_path):
    stale = [".model_0000009.pth.k2j4_9xz.pth", ".model_final.pth.abcdefgh.pth"]
    stale.append(".last_checkpoint.12345678")
    kept = ["model_final.pth", ".model_final.pth.short.pth", ".metrics.json.abcdefgh.json"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    removed = SafeCheckpointer(nn.Linear(2, 2), str(tmp_path)).remove_stale_temp_files()
    assert sorted(os.path.basename(p) for p in removed) == sorted(stale)
    assert _visible_files(tmp_path) == sorted(kept)


def test_atomic_output_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with atomic_output(str(tmp_path / "out.bin")) as tmp:
        open(tmp, "wb").write(b"data")
    assert synced == [False, True]  # the file, then the directory after the rename


# --- non-finite losses -----------------------------------------------------------------------


@pytest.mark.parametrize("nan_iter", [1, 2], ids=["middle", "last-iteration"])
def test_nan_loss_stops_training_without_a_checkpoint(
    shapes_datasets, tmp_path, monkeypatch, nan_iter
):
    cfg = _cfg(tmp_path, "SOLVER.MAX_ITER", 3, "DATASETS.TEST", ("shapes_val",))
    evaluated = []
    evaluate = classmethod(lambda cls, *args, **kwargs: evaluated.append(1))
    monkeypatch.setattr(Trainer, "test", evaluate)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)

    def poison(module, inputs, losses):  # the model's loss dict, NaN at one iteration
        if trainer.iter == nan_iter:
            return {**losses, "loss_mask": losses["loss_mask"] * float("nan")}

    trainer.model.register_forward_hook(poison)
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    assert f"iteration={nan_iter}" in str(error.value) and "'loss_mask': nan" in str(error.value)
    saved = [f"model_{i:07d}.pth" for i in range(nan_iter)]
    assert _checkpoints(tmp_path) == saved  # no model_final, nothing from the failed iteration
    assert (tmp_path / "last_checkpoint").read_text() == saved[-1]
    assert not evaluated  # Detectron2's EvalHook would evaluate after a failed last iteration


# --- loading ---------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def b1_model(shapes_datasets):
    return build_model(load_config(SHAPES_CONFIG))


def test_pth_that_runs_code_is_refused(b1_model, tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "ran"
    torch.save({"model": {}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match=rf"{path}: refusing to load.*would run code"):
        SafeCheckpointer(b1_model).load(str(path), checkpointables=[])
    assert not marker.exists()


def test_pkl_that_runs_code_is_refused(b1_model, tmp_path):
    path, marker = tmp_path / "evil.pkl", tmp_path / "ran"
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "__author__": "x", "payload": _RunsCode(marker)}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=rf"{path}: refusing to unpickle.*system"):
        SafeCheckpointer(b1_model).load(str(path), checkpointables=[])
    assert not marker.exists()


def test_model_zoo_pkl_loads_with_numpy_only(b1_model, b1_state, tmp_path):
    path = tmp_path / "model_zoo.pkl"
    arrays = {k: v.numpy() for k, v in b1_state.items()}
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f, protocol=2)
    SafeCheckpointer(b1_model).load(str(path), checkpointables=[])
    loaded = b1_model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in b1_state.items())


def test_shallower_variant_is_refused(b1_state, tmp_path):
    path = tmp_path / "b1.pth"
    torch.save({"model": b1_state}, path)
    b2 = build_model(load_config(SHAPES_CONFIG, ["MODEL.MIXFORMER.VARIANT", "b2"]))
    with pytest.raises(CheckpointMismatchError) as error:
        SafeCheckpointer(b2).load(str(path), checkpointables=[])
    message = str(error.value)
    assert message.startswith(f"{path}: the checkpoint does not fit the model")
    block = r"backbone\.bottom_up\.net\.layers\.0\.blocks\.1"
    assert re.search(rf"{block}: expected \d+ tensors, got none", message)
    assert "backbone.bottom_up.net.layers.3.blocks.7:" in message


def test_narrower_variant_is_refused(b1_state, tmp_path):
    path = tmp_path / "b1.pth"
    torch.save({"model": b1_state}, path)
    b0 = build_model(load_config(SHAPES_CONFIG, ["MODEL.MIXFORMER.VARIANT", "b0"]))
    with pytest.raises(CheckpointMismatchError) as error:
        SafeCheckpointer(b0).load(str(path), checkpointables=[])
    shapes = r"backbone\.bottom_up\.net\.\S+: expected shape \[24, .*\], got \[32, "
    assert str(error.value).startswith(f"{path}:") and re.search(shapes, str(error.value))


def test_other_class_count_fine_tunes_but_does_not_resume(b1_state, tmp_path):
    path = tmp_path / "b1.pth"
    torch.save({"model": b1_state}, path)
    model = build_model(load_config(SHAPES_CONFIG, ["MODEL.ROI_HEADS.NUM_CLASSES", 3]))
    SafeCheckpointer(model).load(str(path), checkpointables=[])  # Detectron2: skip the heads
    state = model.state_dict()
    stem = "backbone.bottom_up.net.patch_embed.stem.0.weight"
    assert torch.equal(state[stem], b1_state[stem])
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    head = r"roi_heads\.box_predictor\.cls_score\.weight: expected shape \[4, 256\], got \[6, 256\]"
    with pytest.raises(CheckpointMismatchError, match=head):
        SafeCheckpointer(model, optimizer=optimizer).load(str(path))  # resuming


@pytest.mark.parametrize("suffix", [".pth", ".pdparams", ".pkl"])
@pytest.mark.parametrize("content", ["text", "empty", "truncated"])
def test_files_that_are_not_checkpoints_fail_in_one_line(tmp_path, suffix, content):
    """No traceback from deep inside torch or pickle: one line naming the file and the reason."""
    from hybrid_d2.checkpoint import CheckpointLoadError, load_checkpoint_file

    path = tmp_path / f"weights{suffix}"
    whole = tmp_path / "whole.pth"
    torch.save({"model": {"w": torch.ones(100)}}, whole)
    data = {"text": b"this is a text file\n", "empty": b"", "truncated": whole.read_bytes()[:300]}
    path.write_bytes(data[content])
    with pytest.raises(CheckpointLoadError) as error:
        if suffix == ".pdparams":
            load_checkpoint_file(str(path))
        else:
            SafeCheckpointer(torch.nn.Linear(1, 1)).read(str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message


def _family_model(builder: str, key: str, variant: str) -> nn.Module:
    return build_model(
        load_config(SHAPES_CONFIG, ["MODEL.FPN.BOTTOM_UP", builder, key, variant])
    )


@pytest.mark.parametrize(
    "builder, key, smaller, larger",
    [
        ("build_dualformer_backbone", "MODEL.DUALFORMER.VARIANT", "tiny", "xsmall"),
        ("build_dmf_backbone", "MODEL.DMF.VARIANT", "xxs", "xs"),
        ("build_dmformer_backbone", "MODEL.DMFORMER.VARIANT", "s", "l"),
    ],
    ids=["dualformer", "dmf", "dmformer"],
)
def test_another_variant_of_every_family_is_refused(builder, key, smaller, larger, tmp_path):
    """A checkpoint of one variant into the other, either way, and into MixFormer-B1: refused by
    key, whichever the family."""
    small, large = _family_model(builder, key, smaller), _family_model(builder, key, larger)
    for source, target, name in [(small, large, smaller), (large, small, larger)]:
        path = tmp_path / f"{name}.pth"
        torch.save({"model": source.state_dict()}, path)
        with pytest.raises(CheckpointMismatchError, match=rf"^{re.escape(str(path))}: the checkpoint does not fit"):
            SafeCheckpointer(target).load(str(path), checkpointables=[])
    with pytest.raises(CheckpointMismatchError):
        SafeCheckpointer(build_model(load_config(SHAPES_CONFIG))).load(str(path), checkpointables=[])
