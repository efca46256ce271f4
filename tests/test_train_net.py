"""train_net.py end to end on the shapes data: training, evaluation, multi-process, bad input."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SHAPES_CONFIG, run_script
from hybrid_d2.engine import launch_checked, parse_train_args

# A tiny but complete run: one iteration, then COCOEvaluator over shapes_val at a small size.
TINY = [
    "SOLVER.IMS_PER_BATCH", 2,
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MIN_SIZE_TEST", 128,
    "DATALOADER.NUM_WORKERS", 0,
]


def _copypaste_metrics(log: str) -> dict:
    """The AP rows Detectron2 prints as 'copypaste' lines, by task."""
    metrics, task = {}, None
    for line in log.splitlines():
        if "copypaste: Task: " in line:
            task = line.split("copypaste: Task: ")[1].strip()
        elif "copypaste: " in line and task and not line.rstrip().endswith("APl"):
            metrics[task] = line.split("copypaste: ")[1].strip()
    return metrics


def _check(result) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def one_step_run(datasets_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_step")
    log = _check(run_script(
        "train_net.py",
        ["--config-file", SHAPES_CONFIG, *TINY, "SOLVER.MAX_ITER", 1, "OUTPUT_DIR", out],
        datasets_root,
    ))
    return out, log


def test_one_training_step_then_coco_evaluation(one_step_run):
    out, log = one_step_run
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    metrics = _copypaste_metrics(log)
    assert set(metrics) == {"bbox", "segm"}, log[-3000:]
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("total_loss" in r for r in records)
    assert any("bbox/AP" in r and "segm/AP" in r for r in records)


def test_eval_only_reproduces_the_final_evaluation(one_step_run, datasets_root, tmp_path):
    out, train_log = one_step_run
    log = _check(run_script(
        "train_net.py",
        ["--config-file", SHAPES_CONFIG, "--eval-only", *TINY,
         "MODEL.WEIGHTS", out / "model_final.pth", "OUTPUT_DIR", tmp_path],
        datasets_root,
    ))
    assert _copypaste_metrics(log) == _copypaste_metrics(train_log)


def test_eval_only_without_weights_says_the_model_is_untrained(datasets_root, tmp_path):
    """One line on stderr says so and the evaluation goes on; none of the torch.jit
    FutureWarnings that Detectron2's dependencies raise at import time is printed."""
    result = run_script(
        "train_net.py",
        ["--config-file", SHAPES_CONFIG, "--eval-only", "MODEL.WEIGHTS", "", "DATASETS.TEST", "()",
         "OUTPUT_DIR", tmp_path],
        datasets_root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    untrained = [line for line in result.stderr.splitlines() if "model is untrained" in line]
    assert untrained == [
        "warning: MODEL.WEIGHTS is empty: the model is untrained (random weights) and its "
        "predictions are meaningless; add MODEL.WEIGHTS <checkpoint>"
    ], result.stderr[-3000:]
    assert "FutureWarning" not in result.stderr, result.stderr[-3000:]


def test_entry_points_hide_only_the_torch_jit_deprecations(tmp_path):
    """After train_net.py's imports, another FutureWarning and the same message raised by another
    module still show; torch.jit.script's own deprecation does not."""
    script = tmp_path / "user.py"
    script.write_text(
        "import runpy, warnings\n"
        f"runpy.run_path({str(REPO_ROOT / 'train_net.py')!r}, run_name='train_net')\n"
        "import torch\n"
        "warnings.warn('another FutureWarning', FutureWarning)\n"
        "warnings.warn('`torch.jit.script` is deprecated (raised by user.py)', FutureWarning)\n"
        "@torch.jit.script\n"
        "def f(x: torch.Tensor) -> torch.Tensor:\n"
        "    return x + 1\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "always", str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "Warning: " in line]
    assert len(warnings) == 2, result.stderr
    assert "FutureWarning: another FutureWarning" in warnings[0]
    assert "(raised by user.py)" in warnings[1]


def test_two_cpu_processes_with_gloo(datasets_root, tmp_path, monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the user sets no thread count
        monkeypatch.delenv(name, raising=False)
    log = _check(run_script(
        "train_net.py",
        ["--config-file", SHAPES_CONFIG, "--num-gpus", 2, *TINY,
         "SOLVER.MAX_ITER", 2, "DATASETS.TEST", "()", "OUTPUT_DIR", tmp_path],
        datasets_root,
    ))
    assert "World size: 2" in log
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"{threads} threads per process: 2 CPU processes share this machine's cores" in log
    assert (tmp_path / "model_final.pth").is_file()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["MODEL.MIXFORMER.VARIANT", "b9"], "unknown MixFormer variant 'b9'"),
        (["MODEL.MIXFORMER.VARAINT", "b1"], "unknown config key MODEL.MIXFORMER.VARAINT; did you mean MODEL.MIXFORMER.VARIANT"),
        (["DATASETS.TRAIN", "('coco_2017_train',)"], "instances_train2017.json"),
    ],
    ids=["unknown-variant", "unknown-config-key", "missing-dataset-files"],
)
def test_bad_input_is_named_in_the_error(datasets_root, tmp_path, overrides, message):
    result = run_script(
        "train_net.py",
        ["--config-file", SHAPES_CONFIG, *TINY, "SOLVER.MAX_ITER", 1, "OUTPUT_DIR", tmp_path, *overrides],
        datasets_root,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "model_final.pth").exists()


def test_unknown_key_in_a_config_file_names_the_file(tmp_path, capfd):
    config = tmp_path / "bad.yaml"
    config.write_text(f'_BASE_: "{SHAPES_CONFIG}"\nMODEL:\n  MIXFORMER:\n    DROP_PATH: 0.1\n')
    status = launch_checked(_not_reached, parse_train_args(["--config-file", str(config)]))
    assert status == 2
    stderr = capfd.readouterr().err
    assert re.search(rf"{re.escape(str(config))}: unknown config key MODEL.MIXFORMER.DROP_PATH", stderr)


def test_corrupt_image_in_a_dataset_is_named(datasets_root, tmp_path):
    root = tmp_path / "datasets"
    shutil.copytree(datasets_root / "shapes", root / "shapes")
    for image in (root / "shapes" / "train").glob("*.png"):
        image.write_bytes(b"not a png")
    result = run_script(
        "train_net.py",
        ["--config-file", SHAPES_CONFIG, *TINY, "SOLVER.MAX_ITER", 1, "OUTPUT_DIR", tmp_path / "out"],
        root,
    )
    assert result.returncode != 0
    assert re.search(r"Image \S+/shapes/train/\S+\.png of dataset record image_id=\d+ cannot be decoded", result.stderr), result.stderr[-3000:]


# --- one-line errors before any work --------------------------------------------------------


def _error_line(result) -> str:
    """The run's error, which must be one line on stderr starting with "error: "."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def test_bad_weights_config_and_output_dir_fail_in_one_line(tmp_path, capfd):
    text = tmp_path / "weights.txt"
    text.write_text("not a checkpoint\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text(f'_BASE_: "{SHAPES_CONFIG}"\nSOLVER:\n  MAX_ITER: [1\n')
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["--config-file", SHAPES_CONFIG, "MODEL.WEIGHTS", text],
         f"error: {text}: not a PyTorch checkpoint"),
        (["--config-file", broken], f"error: {broken}:4:1: invalid YAML"),
        (["--config-file", SHAPES_CONFIG, "SOLVER.MAX_ITER", 0],
         "error: SOLVER.MAX_ITER=0: training needs at least 1 iteration"),
        (["--config-file", SHAPES_CONFIG, "SOLVER.MAX_ITER", -5],
         "error: SOLVER.MAX_ITER=-5: training needs at least 1 iteration"),
        (["--config-file", SHAPES_CONFIG, "OUTPUT_DIR", blocker / "out"],
         f"error: OUTPUT_DIR '{blocker / 'out'}' cannot be written: Not a directory"),
    ]
    # train_net.py's entry, `launch_checked(main, parse_train_args())`, in this process: these
    # checks run before any process starts (a subprocess per case would add only its start-up;
    # test_bad_input_is_named_in_the_error runs the script itself)
    for args, message in cases:
        out = tmp_path / "out"
        opts = [] if "OUTPUT_DIR" in args else ["OUTPUT_DIR", out]
        argv = [str(a) for a in [*args, *opts]]
        status = launch_checked(_not_reached, parse_train_args(argv))
        result = subprocess.CompletedProcess(argv, status, *capfd.readouterr())
        assert result.returncode == 2, (args, result.stderr[-3000:])
        assert _error_line(result).startswith(message), (message, result.stderr[-2000:])
        assert not (out / "log.txt").exists()  # refused before any work


def _not_reached(args):
    raise AssertionError(f"a refused run started its processes: {args}")


def test_checkpoint_of_another_family_is_refused_in_one_line(datasets_root, tmp_path):
    """A DilateFormer checkpoint into the MixFormer config: refused with exit status 2."""
    import torch

    from conftest import load_config
    from detectron2.modeling import build_model

    config = "configs/shapes/mixformer_b1_mask_rcnn_shapes.yaml"
    other = load_config(
        SHAPES_CONFIG,
        ["MODEL.FPN.BOTTOM_UP", "build_dilateformer_backbone", "MODEL.DILATEFORMER.VARIANT", "tiny"],
    )
    weights = tmp_path / "dilateformer.pth"
    torch.save({"model": build_model(other).state_dict()}, weights)
    result = run_script(
        "train_net.py",
        ["--config-file", config, "--eval-only", *TINY, "MODEL.WEIGHTS", weights,
         "OUTPUT_DIR", tmp_path / "out"],
        datasets_root,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the checkpoint does not fit the model" in _error_line(result)


# --- processes: ranks die with the launcher, one run per OUTPUT_DIR, CPU threads ------------


def _children(pid: int) -> list:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_killed_launcher_takes_its_ranks_along_and_frees_the_output_dir(datasets_root, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), PYTHONUNBUFFERED="1")
    log = tmp_path / "launcher.log"
    with open(log, "w") as f:
        launcher = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "train_net.py"), "--config-file", str(SHAPES_CONFIG),
             "--num-gpus", "2", *map(str, TINY), "SOLVER.MAX_ITER", "10000",
             "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)],
            cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while "Starting training from iteration 0" not in log.read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        ranks = _children(launcher.pid)
        assert len([p for p in ranks if _alive(p)]) >= 2

        second = run_script("train_net.py", ["--config-file", SHAPES_CONFIG, "OUTPUT_DIR", out], datasets_root)
        assert second.returncode == 2
        assert f"is in use by another run (pid {launcher.pid})" in _error_line(second)

        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in ranks if _alive(p)], "rank processes outlived their launcher"
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
    assert not (out / "model_final.pth").exists()

    # the directory is free again; --resume may also follow the KEY VALUE overrides
    third = run_script(
        "train_net.py",
        ["--config-file", SHAPES_CONFIG, *TINY, "SOLVER.MAX_ITER", 1, "DATASETS.TEST", "()",
         "OUTPUT_DIR", out, "--resume"],
        datasets_root,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert (out / "model_final.pth").is_file()


def test_flags_after_the_overrides(datasets_root, tmp_path):
    result = run_script(
        "train_net.py",
        ["--config-file", SHAPES_CONFIG, "OUTPUT_DIR", tmp_path, "--num-gpus", 2],
        datasets_root,
    )
    assert result.returncode == 2
    assert "--num-gpus after the KEY VALUE overrides: put it before them" in result.stderr


def test_dist_url_defaults_to_a_free_port_on_one_machine():
    """Two multi-process runs on one machine must not both take Detectron2's per-user port."""
    from hybrid_d2.engine import parse_train_args

    assert parse_train_args(["--num-gpus", "2"]).dist_url == "auto"
    url = "tcp://10.0.0.1:29500"
    assert parse_train_args(["--num-gpus", "2", "--dist-url", url]).dist_url == url
    several = parse_train_args(["--num-machines", "2", "--machine-rank", "1", "--dist-url", url])
    assert several.dist_url == url
    assert parse_train_args(["--num-machines", "2"]).dist_url.startswith("tcp://127.0.0.1:")
