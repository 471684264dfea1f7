"""NMS on random detections: fastbb nms / batched_nms / nms_sorted_padded vs torchvision, same inputs.

Boxes: centres uniform in a 1333x800 image, width and height uniform in [16, 256) px, scores uniform in
[0, 1) (distinct); classes uniform over 80. torchvision's CPU nms is O(N * kept) (about 10 s at 100,000
boxes here), so on CPU the 100,000-box case times fastbb alone.
"""
import torch
import torchvision

from fastbb.benchmarks.runner import backend_providers
from fastbb.ops.nms import batched_nms, nms, nms_sorted_padded

IMAGE_W, IMAGE_H, MIN_SIZE, MAX_SIZE, NUM_CLASSES = 1333, 800, 16, 256, 80


def _detections(n, device, seed):
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=gen) * torch.tensor([IMAGE_W, IMAGE_H])
    size = torch.rand(n, 2, generator=gen) * (MAX_SIZE - MIN_SIZE) + MIN_SIZE
    boxes = torch.cat((centre - size / 2, centre + size / 2), -1)
    scores = torch.rand(n, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    return boxes.to(device), scores.to(device), labels.to(device)


def _fastbb_providers(op, device, call):
    """'fastbb' (the backend fastbb picks) and 'fastbb[backend]' for every other usable one."""
    return {"fastbb": call, **backend_providers(op, device, call)}


def cases(device):
    threshold = 0.5
    result = []
    for n in (5_000, 20_000, 100_000):
        boxes, scores, _ = _detections(n, device, seed=n)
        providers, note = {}, None
        if n <= 20_000 or device == "cuda":
            providers["torchvision"] = lambda b=boxes, s=scores: torchvision.ops.nms(b, s, threshold)
        else:
            note = "torchvision's CPU nms takes about 13 s per call at this size: fastbb is timed alone"
        providers.update(_fastbb_providers("nms", device, lambda b=boxes, s=scores: nms(b, s, threshold)))
        result.append({"name": f"nms {n} boxes", "providers": providers, "baseline": "torchvision",
                       "representative": n == 20_000, "note": note})
    for n in (5_000, 50_000):
        boxes, scores, labels = _detections(n, device, seed=n + 1)
        providers = {"torchvision": lambda b=boxes, s=scores, l=labels: torchvision.ops.batched_nms(b, s, l, threshold)}
        providers.update(_fastbb_providers(
            "batched_nms", device, lambda b=boxes, s=scores, l=labels: batched_nms(b, s, l, threshold)))
        result.append({"name": f"batched_nms {NUM_CLASSES} classes {n} boxes", "providers": providers,
                       "baseline": "torchvision", "representative": n == 50_000})

    # RetinaNet post-processing shape: 2 images x up to 5,000 candidates already ranked per image.
    images, rows = 2, 5_000
    per_image = [_detections(rows, device, seed=7 + i) for i in range(images)]
    ranked = [s.sort(descending=True).indices for _, s, _ in per_image]
    boxes = torch.stack([b[r] for (b, _, _), r in zip(per_image, ranked)])
    scores = torch.stack([s[r] for (_, s, _), r in zip(per_image, ranked)])
    labels = torch.stack([l[r] for (_, _, l), r in zip(per_image, ranked)])
    counts = torch.tensor([rows, rows - 1234], device=device)

    def torchvision_per_image():
        return [torchvision.ops.batched_nms(boxes[i, :c], scores[i, :c], labels[i, :c], threshold)
                for i, c in enumerate(counts.tolist())]

    providers = {"torchvision": torchvision_per_image}
    providers.update(_fastbb_providers("nms_sorted_padded", device,
                                       lambda: nms_sorted_padded(boxes, labels, counts, threshold)))
    result.append({"name": f"nms_sorted_padded {images}x{rows} boxes {NUM_CLASSES} classes",
                   "providers": providers, "baseline": "torchvision"})
    return result
