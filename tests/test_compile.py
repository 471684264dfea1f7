"""The ops together under torch.compile(fullgraph=True) and torch.export: no graph breaks, same results."""
import torch

from fastbb.ops import batched_nms, decode_boxes, retinanet_postprocess
from fastbb.ops.reference import retinanet_postprocess_reference


def _detection_inputs(num_images=2, sizes=((6, 8), (3, 4)), num_anchors=3, num_classes=5):
    total = sum(h * w for h, w in sizes) * num_anchors
    ctr = torch.rand(total, 2) * 200
    wh = torch.rand(total, 2) * 60 + 8
    anchors = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1)
    logits = torch.randn(num_images, total, num_classes) * 2 - 3
    deltas = torch.randn(num_images, total, 4) * 0.3
    per_level = [h * w * num_anchors for h, w in sizes]
    image_sizes = torch.tensor([[180, 200], [200, 150]])[:num_images]
    return logits, deltas, anchors, per_level, image_sizes


def test_decode_then_batched_nms_compiles_without_graph_breaks():
    logits, deltas, anchors, _, _ = _detection_inputs(num_images=1)
    scores, labels = logits[0].sigmoid().max(dim=1)

    def detect(deltas, anchors, scores, labels):
        boxes = decode_boxes(anchors, deltas, max_shape=(200, 200))
        keep = batched_nms(boxes, scores, labels, 0.5)
        return boxes[keep], scores[keep], labels[keep]

    compiled = torch.compile(detect, fullgraph=True, backend="aot_eager")
    expected = detect(deltas[0], anchors, scores, labels)
    for got, want in zip(compiled(deltas[0], anchors, scores, labels), expected):
        torch.testing.assert_close(got, want)


def test_padded_postprocess_exports():
    logits, deltas, anchors, per_level, image_sizes = _detection_inputs()
    batch_anchors = anchors.expand(logits.shape[0], -1, -1)

    class PostProcess(torch.nn.Module):
        def forward(self, logits, deltas, anchors, image_sizes):
            return retinanet_postprocess(logits, deltas, anchors, per_level, image_sizes, detections_per_img=20,
                                         padded=True)

    module = PostProcess()
    exported = torch.export.export(module, (logits, deltas, batch_anchors, image_sizes))
    called = {node.target for node in exported.graph.nodes if node.op == "call_function"}
    assert torch.ops.fastbb.retinanet_postprocess_padded.default in called
    for got, want in zip(exported.module()(logits, deltas, batch_anchors, image_sizes),
                         module(logits, deltas, batch_anchors, image_sizes)):
        torch.testing.assert_close(got, want)
    expected = retinanet_postprocess_reference(logits, deltas, list(batch_anchors), per_level, image_sizes.tolist(),
                                               detections_per_img=20, padded=True)
    for got, want in zip(exported.module()(logits, deltas, batch_anchors, image_sizes), expected):
        torch.testing.assert_close(got, want)
