"""Train a ResNet-18 FPN RetinaNet on synthetic shapes, fastbb and torchvision side by side, and compare.

Both models are built from the same seed (identical weights, checked), see the same batches in the same
order and the same optimizer; the script prints how far their loss curves drift apart, their speed per
training step, and the COCO mAP of each on a held-out set (pycocotools), next to an untrained model's.

The data are generated on the fly: coloured squares, discs and triangles of many sizes on noisy
backgrounds, every image a function of (seed, index), so runs repeat exactly and need no download.

    python examples/train_shapes.py                       # defaults: about 10 minutes on 2 CPU cores
    python examples/train_shapes.py --baseline-seeds 2    # + a torchvision model from another seed
    torchrun --nproc_per_node=2 examples/train_shapes.py --sync-bn   # DistributedDataParallel

Under torchrun every rank trains on its share of each batch (gloo on the CPU, NCCL on GPUs) and only rank
0 prints, evaluates and plots. Outputs go to --out (default shapes_out/): loss_curves.png,
heldout_predictions.png, and summary.json (or --json PATH).
"""
import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7 as TorchvisionLastLevelP6P7
from tqdm import tqdm

import fastbb
import fastbb.models.detection as fastbb_detection
from fastbb.nn.conv_bn_relu import _synchronizes
from fastbb.nn.sync_batch_norm import _sync_batch_norm_train

CLASS_NAMES = ("square", "disc", "triangle")
# Labels 1..3; 0 stays unused as the background label of torchvision's detection models.
NUM_CLASSES = len(CLASS_NAMES) + 1
SHAPES_PER_IMAGE = (1, 4)
LOSS_AGREEMENT_STEPS = 50


# ----------------------------------------------------------------------------------------------------------
# The data set


def _draw_shape(rng, size, kind, occupied):
    """A shape's mask and tight box (x1, y1, x2, y2), placed where its box overlaps no occupied box, or None
    when no such place was found (boxes of hidden shapes would be wrong targets)."""
    for _ in range(20):
        extent = rng.uniform(0.1, 0.5) * size
        width = extent * (rng.uniform(0.75, 1.3) if kind == "triangle" else 1.0)
        height = extent
        x1, y1 = rng.uniform(0, size - width), rng.uniform(0, size - height)
        x2, y2 = x1 + width, y1 + height
        if any(x1 < ox2 + 1 and ox1 < x2 + 1 and y1 < oy2 + 1 and oy1 < y2 + 1 for ox1, oy1, ox2, oy2 in occupied):
            continue
        # Pixel centres, so a mask and its box agree on which pixels a shape covers.
        ys, xs = np.mgrid[0:size, 0:size] + 0.5
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        if kind == "square":
            mask = (xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)
        elif kind == "disc":
            mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= (width / 2) ** 2
        else:  # apex up, base at the bottom: the half-width grows linearly from the apex
            mask = (ys >= y1) & (ys <= y2) & (np.abs(xs - cx) <= (ys - y1) / height * width / 2)
        rows, cols = np.nonzero(mask)
        if rows.size < 16:
            continue
        box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
        return mask, box
    return None


def make_image(seed, index, size):
    """Image ``index`` of the data set drawn from ``seed``.

    Returns:
        image (Tensor[3, size, size]): float32 in [0, 1].
        target (Dict[str, Tensor]): ``boxes`` (G, 4) float32 (x1, y1, x2, y2 in pixels), ``labels`` (G,) int64.
    """
    rng = np.random.default_rng([seed, index])
    background = rng.uniform(0.0, 1.0, 3)
    # A gentle colour gradient plus pixel noise, so a shape is never found by a constant-colour test.
    ramp = np.linspace(-0.5, 0.5, size)
    gradient = rng.uniform(-0.3, 0.3, (3, 1, 1)) * (ramp[None, :, None] if rng.random() < 0.5 else ramp[None, None, :])
    image = np.broadcast_to(background[:, None, None] + gradient, (3, size, size)).copy()
    boxes, labels, occupied = [], [], []
    for _ in range(rng.integers(SHAPES_PER_IMAGE[0], SHAPES_PER_IMAGE[1] + 1)):
        label = int(rng.integers(1, NUM_CLASSES))
        drawn = _draw_shape(rng, size, CLASS_NAMES[label - 1], occupied)
        if drawn is None:
            continue
        mask, box = drawn
        colour = rng.uniform(0.0, 1.0, 3)
        while np.abs(colour - background).max() < 0.35:  # visible against the background
            colour = rng.uniform(0.0, 1.0, 3)
        image[:, mask] = colour[:, None]
        occupied.append(box)
        boxes.append(box)
        labels.append(label)
    image = image + rng.normal(0.0, 0.08, image.shape)
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor(labels, dtype=torch.int64)}
    return torch.from_numpy(np.clip(image, 0.0, 1.0).astype(np.float32)), target


def make_batch(seed, step, batch_size, size, rank=0, world_size=1):
    """This rank's share of training batch ``step``: images step * batch_size + [rank * share, (rank + 1) * share).

    Returns:
        images (List[Tensor[3, size, size]]), targets (List[Dict[str, Tensor]]).
    """
    share = batch_size // world_size
    first = step * batch_size + rank * share
    samples = [make_image(seed, index, size) for index in range(first, first + share)]
    return [image for image, _ in samples], [target for _, target in samples]


# ----------------------------------------------------------------------------------------------------------
# The models


def anchor_sizes(image_size):
    """Three sizes per octave, one octave per level P3..P7, starting at an eighth of the image (torchvision's
    RetinaNet starts at 32 for 800-pixel images; the shapes here are 0.1 to 0.5 of the image)."""
    base = image_size / 8
    return tuple(tuple(int(round(base * 2 ** level * 2 ** (step / 3))) for step in range(3)) for level in range(5))


def build_model(kind, seed, image_size, score_thresh=0.001, head_norm="none", head_init="torchvision"):
    """A ResNet-18 FPN RetinaNet (P3-P5 from C3-C5, P6/P7 from P5 as torchvision's v1), randomly initialised
    from ``seed``: fastbb's fused modules (``kind="fastbb"``) or torchvision's (``kind="torchvision"``),
    built in the same order, so the same seed gives the same weights.

    The images are neither resized nor rescaled (min_size = max_size = image_size). ``score_thresh`` is
    low so that even an untrained model (scores near the 0.01 prior) returns ranked detections for COCO
    evaluation; at most 100 detections per image, as COCO counts.
    """
    sizes = anchor_sizes(image_size)
    ratios = ((0.5, 1.0, 2.0),) * len(sizes)
    options = dict(min_size=image_size, max_size=image_size, score_thresh=score_thresh, detections_per_img=100)
    torch.manual_seed(seed)
    if kind == "fastbb":
        backbone = fastbb.models.resnet18(weights=None)
        backbone = fastbb_detection.resnet_fpn_extractor(backbone, 5, returned_layers=[2, 3, 4],
                                                         extra_blocks=fastbb.nn.LastLevelP6P7(256, 256))
        anchor_generator = fastbb_detection.AnchorGenerator(sizes, ratios)
        detector = fastbb_detection.RetinaNet
    elif kind == "torchvision":
        backbone = torchvision.models.resnet18(weights=None)
        backbone = _resnet_fpn_extractor(backbone, 5, returned_layers=[2, 3, 4],
                                         extra_blocks=TorchvisionLastLevelP6P7(256, 256))
        anchor_generator = TorchvisionAnchorGenerator(sizes, ratios)
        detector = TorchvisionRetinaNet
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    head = None
    if head_norm == "group":
        # The head's convs start as N(0, 0.01): without a norm each of its four layers shrinks the signal
        # about 3x, and the random backbone gets ~40x less gradient than behind GroupNorm (torchvision's
        # RetinaNet v2). But GroupNorm divides by the tiny std of those outputs, which makes training chaotic:
        # rounding differences between two identical runs grow ~10x per step (1e-2 of the loss by step 8),
        # so the default is torchvision's v1 head, on which they stay below 1% for 50 steps.
        head = RetinaNetHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0], NUM_CLASSES,
                             norm_layer=partial(nn.GroupNorm, 32))
    elif head_norm != "none":
        raise ValueError(f"unknown head norm {head_norm!r}")
    model = detector(backbone, NUM_CLASSES, anchor_generator=anchor_generator, head=head, **options)
    if head_init == "kaiming":
        # He initialisation of the head's hidden convs keeps the signal's scale through their ReLUs, so the
        # random backbone gets gradient from the first step without a norm layer (whose division by the tiny
        # std of N(0, 0.01) conv outputs makes training chaotic). The output convs keep their prior init.
        for branch in (model.head.classification_head, model.head.regression_head):
            for module in branch.conv.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                    nn.init.zeros_(module.bias)
    elif head_init != "torchvision":
        raise ValueError(f"unknown head init {head_init!r}")
    return model


class CPUSyncBatchNorm(nn.SyncBatchNorm):
    """nn.SyncBatchNorm that also synchronizes CPU tensors: torch's raises for a CPU input spanning several
    processes. Across processes it computes the statistics of the whole process group with fastbb's
    all-reduce batch norm (the same one fastbb's fused conv + BN calls for a SyncBatchNorm, unfused here);
    otherwise it is nn.SyncBatchNorm. Used for the torchvision model under gloo."""

    def forward(self, input):
        if input.device.type != "cpu" or not _synchronizes(self):
            return super().forward(input)
        momentum = self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # a cumulative average, as nn.BatchNorm2d's momentum=None
                momentum = 1.0 / float(self.num_batches_tracked)
        return _sync_batch_norm_train(input, self.weight, self.bias, self.running_mean, self.running_var, momentum,
                                      self.eps, self.process_group)


def convert_sync_batchnorm(model, device):
    """model with every BatchNorm as a SyncBatchNorm (torch.nn.SyncBatchNorm.convert_sync_batchnorm); on the
    CPU, where torch's cannot synchronize, as CPUSyncBatchNorm (same parameters, buffers and keys). fastbb's
    fused modules synchronize a SyncBatchNorm on any device themselves."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type == "cpu":
        for module in model.modules():
            if type(module) is nn.SyncBatchNorm:
                module.__class__ = CPUSyncBatchNorm
    return model


class DistributedDataParallel(nn.parallel.DistributedDataParallel):
    """DDP that accepts SyncBatchNorm layers in a CPU model. torch's refuses them at construction ("SyncBatchNorm
    layers only work with GPU modules") because its own SyncBatchNorm cannot synchronize CPU tensors; fastbb's
    fused layers and CPUSyncBatchNorm can, and nothing else in DDP depends on the check."""

    def _passing_sync_batchnorm_handle(self, module):
        if self.device_type != "cpu":
            super()._passing_sync_batchnorm_handle(module)


def total_loss(losses):
    return losses["classification"] + losses["bbox_regression"]


# ----------------------------------------------------------------------------------------------------------
# Distributed set-up


def distributed_context():
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when run as a plain script."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(name, local_rank):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------
# Training


def learning_rate(step, args):
    """Linear warm-up over the first --warmup-steps, then a cosine decay to zero at the last step. The long
    warm-up keeps the first steps small: at lr 0.02 after 30 steps, the loss spikes and rounding differences
    between two identical models grow ~2x per step (1% by step 22); ramping 1e-4 per step keeps them below
    0.5% over the first 50 steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, args):
    parameters = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(parameters, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)


def train(runs, args, rank, world_size, device, show_progress):
    """Trains every run's model for args.steps steps on the same batches, one model after the other within
    each step, and records per step the loss (the mean over all ranks) and the step's time.

    Args:
        runs (List[Dict]): each with ``name``, ``model`` (DDP-wrapped under torchrun) and ``optimizer``; gets
            ``losses`` (List[Dict[str, float]]) and ``step_seconds`` (List[float]).
    """
    for run in runs:
        run["model"].train()
        run["losses"], run["step_seconds"] = [], []
    progress = tqdm(range(args.steps), desc="train", disable=not show_progress, dynamic_ncols=True)
    for step in progress:
        images, targets = make_batch(args.data_seed, step, args.batch_size, args.image_size, rank, world_size)
        images = [image.to(device) for image in images]
        targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
        # Alternate which model goes first, so that neither always runs right after the data generation.
        order = runs if step % 2 == 0 else runs[::-1]
        for run in order:
            for group in run["optimizer"].param_groups:
                group["lr"] = learning_rate(step, args)
            _synchronize(device)
            start = time.perf_counter()
            losses = run["model"](images, targets)
            loss = total_loss(losses)
            run["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad_norm > 0:
                nn.utils.clip_grad_norm_(run["model"].parameters(), args.clip_grad_norm)
            run["optimizer"].step()
            _synchronize(device)
            run["step_seconds"].append(time.perf_counter() - start)
            values = torch.stack([losses["classification"].detach(), losses["bbox_regression"].detach()]).float()
            if world_size > 1:  # every rank's share has the same size: the mean of the means is the batch's
                dist.all_reduce(values)
                values /= world_size
            classification, regression = values.tolist()
            run["losses"].append({"classification": classification, "bbox_regression": regression,
                                  "total": classification + regression})
        if not all(math.isfinite(run["losses"][-1]["total"]) for run in runs):
            raise FloatingPointError(f"step {step + 1}: a loss is not finite: "
                                     + ", ".join(f"{run['name']} {run['losses'][-1]}" for run in runs))
        progress.set_postfix({run["name"]: f"{run['losses'][-1]['total']:.3f}" for run in runs})


def max_relative_loss_difference(losses_a, losses_b, steps):
    """max over steps 1..steps of |a - b| / |b| of the total loss."""
    steps = min(steps, len(losses_a), len(losses_b))
    return max(abs(a["total"] - b["total"]) / abs(b["total"]) for a, b in zip(losses_a[:steps], losses_b[:steps]))


def median_step_ms(step_seconds, warmup):
    """The median step time in ms, after the first ``warmup`` steps (all steps if there are no more)."""
    timed = step_seconds[warmup:] or step_seconds
    return 1000.0 * statistics.median(timed)


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def heldout_set(args):
    return [make_image(args.heldout_seed, index, args.image_size) for index in range(args.eval_images)]


def coco_ground_truth(heldout):
    """The held-out set as a pycocotools COCO object."""
    from pycocotools.coco import COCO

    images, annotations = [], []
    for image_id, (image, target) in enumerate(heldout):
        images.append({"id": image_id, "height": image.shape[1], "width": image.shape[2]})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": label, "name": name} for label, name in enumerate(CLASS_NAMES, 1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@torch.inference_mode()
def predict(model, heldout, batch_size, device, desc, show_progress):
    """Detections of every held-out image (on the CPU) and the mean time per image in ms."""
    model.eval()
    detections, seconds = [], 0.0
    for first in tqdm(range(0, len(heldout), batch_size), desc=desc, disable=not show_progress, dynamic_ncols=True,
                      leave=False):
        images = [image.to(device) for image, _ in heldout[first:first + batch_size]]
        _synchronize(device)
        start = time.perf_counter()
        outputs = model(images)
        _synchronize(device)
        seconds += time.perf_counter() - start
        detections += [{key: value.cpu() for key, value in output.items()} for output in outputs]
    return detections, 1000.0 * seconds / max(1, len(heldout))


def coco_map(ground_truth, detections):
    """(mAP@0.5, mAP@[.5:.95]) of the detections, by pycocotools' COCOeval (0 for no detections at all)."""
    from pycocotools.cocoeval import COCOeval

    results = [{"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(score)}
               for image_id, output in enumerate(detections)
               for (x1, y1, x2, y2), score, label in zip(output["boxes"].tolist(), output["scores"].tolist(),
                                                         output["labels"].tolist())]
    if not results:  # loadRes cannot take an empty list
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return max(0.0, float(evaluation.stats[1])), max(0.0, float(evaluation.stats[0]))


def evaluate(model, heldout, ground_truth, args, device, desc, show_progress):
    start = time.perf_counter()
    detections, ms_per_image = predict(model, heldout, args.eval_batch_size, device, desc, show_progress)
    map50, map50_95 = coco_map(ground_truth, detections)
    return {"map50": map50, "map50_95": map50_95, "eval_ms_per_image": ms_per_image,
            "eval_seconds": time.perf_counter() - start}, detections


# ----------------------------------------------------------------------------------------------------------
# Plots and the summary


def plot_losses(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    for run, style in zip(runs, ("-", "--", ":")):
        steps = range(1, len(run["losses"]) + 1)
        axis.plot(steps, [loss["total"] for loss in run["losses"]], style, linewidth=1, label=run["name"])
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (classification + box regression)")
    axis.set_yscale("log")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_predictions(heldout, detections, path, count=8, min_score=0.3):
    """A grid of held-out images with their ground truth (dashed white) and the detections scoring at least
    min_score (coloured by class, with the score)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    count = min(count, len(heldout))
    columns = min(4, count)
    rows = max(1, math.ceil(count / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.4 * rows), dpi=80, squeeze=False)
    colours = {1: "tab:red", 2: "tab:cyan", 3: "tab:orange"}
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index >= count:
            continue
        image, target = heldout[index]
        axis.imshow(image.permute(1, 2, 0).numpy())
        for x1, y1, x2, y2 in target["boxes"].tolist():
            axis.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linestyle="--",
                                     linewidth=1))
        output = detections[index]
        for (x1, y1, x2, y2), score, label in zip(output["boxes"].tolist(), output["scores"].tolist(),
                                                  output["labels"].tolist()):
            if score < min_score:
                continue
            colour = colours.get(label, "black")
            axis.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5))
            axis.text(x1, y1, f"{CLASS_NAMES[label - 1] if 0 < label <= len(CLASS_NAMES) else label} {score:.2f}",
                      color="white", fontsize=6, va="bottom", bbox={"facecolor": colour, "pad": 1, "linewidth": 0})
    figure.suptitle(f"held-out images: ground truth dashed, detections with score >= {min_score}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def format_table(summary):
    header = ("model", "ms/step", "final loss", "mAP@0.5", "mAP@[.5:.95]", "eval ms/img")
    rows = []
    untrained = summary.get("untrained")
    if untrained:
        rows.append(("untrained", "", "", f"{untrained['map50']:.4f}", f"{untrained['map50_95']:.4f}",
                     f"{untrained['eval_ms_per_image']:.1f}"))
    for run in summary["runs"]:
        evaluation = run.get("eval") or {}
        rows.append((run["name"], f"{run['ms_per_step']:.1f}", f"{run['final_loss']:.4f}",
                     f"{evaluation['map50']:.4f}" if evaluation else "-",
                     f"{evaluation['map50_95']:.4f}" if evaluation else "-",
                     f"{evaluation['eval_ms_per_image']:.1f}" if evaluation else "-"))
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(cell).rjust(width) if i else str(cell).ljust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))) for row in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    comparison = summary["comparison"]
    lines.append("")
    lines.append(f"speed-up of fastbb per training step: {comparison['speedup_per_step']:.2f}x")
    lines.append(f"max relative difference of the total loss, steps 1..{comparison['loss_steps_compared']}: "
                 f"{comparison['max_rel_loss_diff']:.2e} (bound 1e-2: "
                 f"{'ok' if comparison['loss_curves_agree'] else 'EXCEEDED'})")
    if "map50_diff" in comparison:
        line = f"|mAP@0.5 fastbb - torchvision| = {comparison['map50_diff']:.4f}"
        if "baseline_map50_diff" in comparison:
            line += (f"; two torchvision seeds differ by {comparison['baseline_map50_diff']:.4f}; "
                     f"bound {comparison['map50_bound']:.4f}: {'ok' if comparison['map_within_bound'] else 'EXCEEDED'}")
        else:
            line += f" (bound without --baseline-seeds 2: {comparison['map50_bound']:.2f})"
        lines.append(line)
    line = f"wall time {summary['wall_seconds']:.0f} s"
    if "baseline_seconds" in summary:
        line += (f", of which the second torchvision seed {summary['baseline_seconds']:.0f} s (training and "
                 f"evaluation; {summary['wall_seconds_without_baseline']:.0f} s without it)")
    lines.append(line)
    return "\n".join(lines)


def summarize(runs, untrained, args, wall_seconds, world_size, load_before):
    summary = {
        "config": {key: value for key, value in vars(args).items() if key not in ("json",)},
        "environment": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                        "fastbb": getattr(fastbb, "__version__", "?"), "python": platform.python_version(),
                        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "world_size": world_size,
                        "loadavg_before": load_before, "loadavg_after": list(os.getloadavg())},
        "untrained": untrained,
        "runs": [],
        "wall_seconds": wall_seconds,
    }
    for run in runs:
        summary["runs"].append({
            "name": run["name"], "seed": run["seed"], "ms_per_step": median_step_ms(run["step_seconds"],
                                                                                 args.timing_warmup),
            "final_loss": run["losses"][-1]["total"], "eval": run.get("eval"),
            "losses": [round(loss["total"], 6) for loss in run["losses"]],
            "train_seconds": sum(run["step_seconds"])})
    by_name = {run["name"]: run for run in runs}
    fused, reference = by_name["fastbb"], by_name["torchvision"]
    steps = min(LOSS_AGREEMENT_STEPS, args.steps)
    comparison = {
        "speedup_per_step": (median_step_ms(reference["step_seconds"], args.timing_warmup)
                             / median_step_ms(fused["step_seconds"], args.timing_warmup)),
        "loss_steps_compared": steps,
        "max_rel_loss_diff": max_relative_loss_difference(fused["losses"], reference["losses"], steps),
    }
    comparison["loss_curves_agree"] = comparison["max_rel_loss_diff"] <= 0.01
    if fused.get("eval") and reference.get("eval"):
        comparison["map50_diff"] = abs(fused["eval"]["map50"] - reference["eval"]["map50"])
        comparison["map50_95_diff"] = abs(fused["eval"]["map50_95"] - reference["eval"]["map50_95"])
        comparison["map50_bound"] = 0.02
        baseline = by_name.get("torchvision-seed2")
        if baseline and baseline.get("eval"):
            comparison["baseline_map50_diff"] = abs(baseline["eval"]["map50"] - reference["eval"]["map50"])
            comparison["baseline_map50_95_diff"] = abs(baseline["eval"]["map50_95"] - reference["eval"]["map50_95"])
            comparison["map50_bound"] = max(0.02, 2 * comparison["baseline_map50_diff"])
            comparison["map50_95_bound"] = max(0.02, 2 * comparison["baseline_map50_95_diff"])
            comparison["map_within_bound"] = (comparison["map50_diff"] <= comparison["map50_bound"]
                                              and comparison["map50_95_diff"] <= comparison["map50_95_bound"])
    summary["comparison"] = comparison
    baseline = by_name.get("torchvision-seed2")
    if baseline:  # what the run would have taken without the extra model
        evaluation = baseline.get("eval") or {}
        summary["baseline_seconds"] = sum(baseline["step_seconds"]) + evaluation.get("eval_seconds", 0.0)
        summary["wall_seconds_without_baseline"] = wall_seconds - summary["baseline_seconds"]
    return summary


# ----------------------------------------------------------------------------------------------------------
# The script


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128, help="square images of this many pixels")
    parser.add_argument("--steps", type=int, default=500, help="training steps")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step, over all processes")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 for adamw, 0.01 "
                                                                 "for sgd)")
    parser.add_argument("--warmup-steps", type=int, default=100, help="steps of linear learning-rate warm-up")
    parser.add_argument("--head-norm", default="none", choices=("none", "group"),
                        help="the head's norm: none (torchvision's RetinaNet v1) or GroupNorm (v2)")
    parser.add_argument("--head-init", default="torchvision", choices=("torchvision", "kaiming"),
                        help="the head's hidden convs: N(0, 0.01) as torchvision, or He's normal init")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"),
                        help="sgd with momentum 0.9 (torchvision's detection recipe), or adamw, which learns far "
                             "more in the same steps but parts two identical models' loss curves by 1%% within "
                             "16 steps (its steps of about lr for every weight, whatever the size of its gradient, "
                             "amplify rounding differences)")
    parser.add_argument("--weight-decay", type=float, default=None, help="default: 0.05 for adamw, 1e-4 for sgd")
    parser.add_argument("--clip-grad-norm", type=float, default=10.0, help="0: no clipping")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed of both models")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the training images")
    parser.add_argument("--heldout-seed", type=int, default=1000, help="seed of the held-out images")
    parser.add_argument("--eval-images", type=int, default=200, help="held-out images (0: no evaluation)")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--baseline-seeds", type=int, default=1, choices=(1, 2),
                        help="2: also train a torchvision model from --seed + 1, to measure the mAP spread "
                             "between two seeds")
    parser.add_argument("--sync-bn", action="store_true",
                        help="BatchNorm statistics over all processes (SyncBatchNorm) under torchrun")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per process (0: the cores divided among the local processes)")
    parser.add_argument("--timing-warmup", type=int, default=5, help="steps left out of the median step time")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", default="shapes_out", help="directory for the PNGs and summary.json")
    parser.add_argument("--json", default=None, help="where to write the summary (default: OUT/summary.json)")
    parser.add_argument("--save-weights", default=None,
                        help="save the trained models' state_dicts ({name: state_dict}) to this file")
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-3 if args.optimizer == "adamw" else 0.01
    if args.weight_decay is None:
        args.weight_decay = 0.05 if args.optimizer == "adamw" else 1e-4
    if args.steps < 1 or args.batch_size < 1 or args.image_size < 32:
        parser.error("--steps and --batch-size must be positive and --image-size at least 32")
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, local_rank = distributed_context()
    if args.batch_size % world_size:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world_size} processes")
    device = pick_device(args.device, local_rank)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_world_size))
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0
    load_before = list(os.getloadavg())
    wall_start = time.perf_counter()

    names = [("fastbb", "fastbb", args.seed), ("torchvision", "torchvision", args.seed)]
    if args.baseline_seeds == 2:
        names.append(("torchvision-seed2", "torchvision", args.seed + 1))
    runs = [{"name": name, "kind": kind, "seed": seed,
             "model": build_model(kind, seed, args.image_size, head_norm=args.head_norm, head_init=args.head_init)}
            for name, kind, seed in names]
    fused_state, reference_state = runs[0]["model"].state_dict(), runs[1]["model"].state_dict()
    if fused_state.keys() != reference_state.keys() or not all(
            torch.equal(fused_state[key], reference_state[key]) for key in fused_state):
        raise RuntimeError("the fastbb and torchvision models were not initialised with the same weights")

    heldout = heldout_set(args) if is_main and args.eval_images > 0 else []
    ground_truth = coco_ground_truth(heldout) if heldout else None
    untrained = None
    if heldout:  # both models hold these weights now; the fused one is the quicker to evaluate
        untrained, _ = evaluate(runs[0]["model"].to(device), heldout, ground_truth, args, device, "eval untrained",
                                is_main)

    for run in runs:
        model = run["model"].to(device)
        if args.sync_bn:
            model = convert_sync_batchnorm(model, device)
        run["module"] = model
        if world_size > 1:
            model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
        run["model"] = model
        run["optimizer"] = make_optimizer(model, args)

    train(runs, args, rank, world_size, device, show_progress=is_main)

    if is_main and args.save_weights:
        torch.save({run["name"]: run["module"].state_dict() for run in runs}, args.save_weights)
    if world_size > 1:
        dist.destroy_process_group()  # evaluation runs on rank 0 alone, without collectives
    if not is_main:
        return None

    os.makedirs(args.out, exist_ok=True)
    for run in runs:
        if heldout:
            run["eval"], run["detections"] = evaluate(run["module"], heldout, ground_truth, args, device,
                                                      f"eval {run['name']}", True)
    plot_losses(runs, os.path.join(args.out, "loss_curves.png"))
    if heldout:
        plot_predictions(heldout, runs[0]["detections"], os.path.join(args.out, "heldout_predictions.png"))
    summary = summarize(runs, untrained, args, time.perf_counter() - wall_start, world_size, load_before)
    json_path = args.json or os.path.join(args.out, "summary.json")
    if os.path.dirname(json_path):
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w") as file:
        json.dump(summary, file, indent=1)
    print(format_table(summary), flush=True)
    written = ["loss_curves.png"] + (["heldout_predictions.png"] if heldout else [])
    print(f"wrote {', '.join(os.path.join(args.out, name) for name in written)} and {json_path}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
