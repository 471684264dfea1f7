"""examples/train_shapes.py: its data set, its models, a short single-process run (every output written), and
two processes under torchrun training the same weights as one process on the whole batch."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_shapes.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_shapes = _load_script()

TINY = ["--image-size", "64", "--steps", "3", "--warmup-steps", "2", "--threads", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_images_repeat_from_their_seed_and_boxes_are_tight():
    image, target = train_shapes.make_image(7, 3, 64)
    again, target_again = train_shapes.make_image(7, 3, 64)
    other, _ = train_shapes.make_image(8, 3, 64)
    assert torch.equal(image, again) and torch.equal(target["boxes"], target_again["boxes"])
    assert not torch.equal(image, other)
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    sizes = set()
    for index in range(40):
        _, target = train_shapes.make_image(0, index, 64)
        boxes, labels = target["boxes"], target["labels"]
        assert 1 <= len(boxes) <= train_shapes.SHAPES_PER_IMAGE[1] and len(labels) == len(boxes)
        assert ((labels >= 1) & (labels < train_shapes.NUM_CLASSES)).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        sizes.update(int(size) for size in (boxes[:, 2:] - boxes[:, :2]).max(1).values)
    assert min(sizes) <= 10 and max(sizes) >= 28  # many sizes, 0.1 to 0.5 of the image


def test_rank_shares_make_up_the_batch():
    whole_images, whole_targets = train_shapes.make_batch(0, 5, 4, 32)
    shares = [train_shapes.make_batch(0, 5, 4, 32, rank, 2) for rank in range(2)]
    images = shares[0][0] + shares[1][0]
    targets = shares[0][1] + shares[1][1]
    assert all(torch.equal(a, b) for a, b in zip(images, whole_images))
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, whole_targets))


@pytest.mark.parametrize("head", [dict(), dict(head_norm="group"), dict(head_init="kaiming")])
def test_fastbb_and_torchvision_models_start_from_the_same_weights(head):
    fused = train_shapes.build_model("fastbb", 3, 64, **head).state_dict()
    reference = train_shapes.build_model("torchvision", 3, 64, **head).state_dict()
    other_seed = train_shapes.build_model("torchvision", 4, 64, **head).state_dict()
    assert fused.keys() == reference.keys()
    assert all(torch.equal(fused[key], reference[key]) for key in fused)
    assert not all(torch.equal(other_seed[key], reference[key]) for key in reference)


def test_single_process_run_writes_its_outputs(tmp_path):
    json_path = tmp_path / "summary.json"
    summary = train_shapes.main(TINY + ["--batch-size", "2", "--eval-images", "4", "--eval-batch-size", "4",
                                        "--baseline-seeds", "2", "--out", str(tmp_path / "out"),
                                        "--json", str(json_path)])
    for name in ("loss_curves.png", "heldout_predictions.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC
    written = json.loads(json_path.read_text())
    assert written["comparison"] == pytest.approx(summary["comparison"])
    assert [run["name"] for run in written["runs"]] == ["fastbb", "torchvision", "torchvision-seed2"]
    for run in written["runs"]:
        assert len(run["losses"]) == 3 and all(math.isfinite(loss) and loss > 0 for loss in run["losses"])
        assert run["ms_per_step"] > 0
        assert 0.0 <= run["eval"]["map50_95"] <= run["eval"]["map50"] <= 1.0
    assert 0.0 <= written["untrained"]["map50"] <= 1.0
    # Same weights, same batches: the fused model's losses are torchvision's up to rounding.
    assert written["comparison"]["max_rel_loss_diff"] < 1e-3
    assert "baseline_map50_diff" in written["comparison"]


def test_two_processes_train_what_one_process_trains_on_the_whole_batch(tmp_path):
    """torchrun, 2 processes x 2 images with SyncBatchNorm, against 1 process x 4 images. SyncBatchNorm
    makes the BN statistics those of the whole batch, and torchvision's RetinaNet loss is the mean of
    per-image losses, so DDP's mean of the two ranks' gradients is the whole batch's gradient: the weights
    agree up to float32 rounding, which differs because the sums (BN statistics, gradients) are added in
    another order. After one step the largest difference is about 5e-7; each later step amplifies it, the
    more the larger the step (the stem conv's gradient, behind a BN, is a difference of large sums): with
    the GroupNorm head, three steps of lr 0.005 / 0.01 / 0.05 leave about 4e-6 / 3e-5 / 1e-3. At lr 0.002
    it stays near 1e-7, far inside rtol 1e-4 / atol 1e-5, while the weights move by over 1000x the
    difference (checked, so that untrained weights cannot pass); without --sync-bn the running statistics
    alone differ by about 0.5."""
    # SGD: Adam's steps are about lr for every weight whatever its gradient's size, so gradients that are
    # rounding noise would move the two runs' weights apart by lr.
    options = TINY + ["--optimizer", "sgd", "--batch-size", "4", "--lr", "0.002", "--warmup-steps", "1", "--sync-bn",
                      "--eval-images", "0"]
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
    command += options + ["--out", str(tmp_path / "ddp"), "--save-weights", str(tmp_path / "ddp.pt")]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    train_shapes.main(options + ["--out", str(tmp_path / "single"), "--save-weights", str(tmp_path / "single.pt")])
    distributed, single = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "single.pt")
    assert distributed.keys() == single.keys() == {"fastbb", "torchvision"}
    for name in single:
        assert distributed[name].keys() == single[name].keys()
        for key, value in single[name].items():
            torch.testing.assert_close(distributed[name][key], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda message: f"{name} {key}: {message}")
        initial = train_shapes.build_model(name, 0, 64)
        change = torch.cat([(single[name][key] - value.detach()).flatten()
                            for key, value in initial.named_parameters()])
        difference = torch.cat([(single[name][key] - distributed[name][key]).flatten()
                                for key, _ in initial.named_parameters()])
        assert change.norm() > 1000 * difference.norm(), (name, change.norm(), difference.norm())
