"""torchvision's results for the detection formulas of src/model/detection/, on inputs made
here with a fixed seed, for tests/detection_formulas.rs (the ONNX writer's graph of each
formula in ONNX Runtime) and torch/src/backend.rs (the libtorch runner's ATen calls).

    detection_formulas.py OUT.json

Every input and output is float32 (or int64 level indices), written as JSON numbers (exact:
each float32 is a double). Inputs include the edge cases each formula has: deltas beyond
BBOX_XFORM_CLIP, boxes outside the image, sides at the small-box threshold, RoI sizes at the
LevelMapper's level boundaries, and non-integral resize ratios.
"""

import json
import sys

import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import batched_nms
from torchvision.ops import boxes as box_ops
from torchvision.ops.poolers import LevelMapper, MultiScaleRoIAlign


def flat(t: torch.Tensor) -> list:
    return [float(v) for v in t.reshape(-1).tolist()]


def random_boxes(g: torch.Generator, n: int, extent: float) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * extent
    wh = torch.rand(n, 2, generator=g) * extent / 4
    return torch.cat([xy, xy + wh], dim=1)


def decode_cases(g: torch.Generator) -> list:
    cases = []
    for weights, k in [((1.0, 1.0, 1.0, 1.0), 1), ((10.0, 10.0, 5.0, 5.0), 5)]:
        coder = det_utils.BoxCoder(weights)
        boxes = random_boxes(g, 300, 800.0)
        boxes[0] = torch.tensor([10.0, 10.0, 10.0, 30.0])  # zero width
        deltas = torch.randn(300, 4 * k, generator=g) * 2
        deltas[1, 2] = 40.0  # dw far beyond the clamp
        deltas[2, 3] = -40.0
        out = coder.decode_single(deltas, boxes)
        cases.append({"weights": list(weights), "rois": 300, "k": k, "deltas": flat(deltas), "boxes": flat(boxes), "out": flat(out)})
    return cases


def clip_case(g: torch.Generator) -> dict:
    boxes = random_boxes(g, 400, 700.0) - 100.0
    size = (427, 640)  # height, width
    return {"boxes": flat(boxes), "size": list(size), "out": flat(box_ops.clip_boxes_to_image(boxes, size))}


def small_box_case(g: torch.Generator) -> dict:
    base = random_boxes(g, 200, 100.0)
    side = torch.tensor([1e-3], dtype=torch.float32)
    near = torch.stack([side, torch.nextafter(side, torch.zeros(1)), torch.nextafter(side, torch.ones(1)), side * 10]).reshape(-1)
    edge = torch.zeros(len(near) * 2, 4)
    for i, s in enumerate(near):
        edge[2 * i] = torch.tensor([5.0, 5.0, 5.0 + s, 8.0])
        edge[2 * i + 1] = torch.tensor([5.0, 5.0, 8.0, 5.0 + s])
    boxes = torch.cat([base, edge])
    cases = []
    for min_size in (1e-3, 1e-2):
        keep = torch.zeros(len(boxes), dtype=torch.bool)
        keep[box_ops.remove_small_boxes(boxes, min_size)] = True
        cases.append({"min_size": min_size, "boxes": flat(boxes), "keep": [bool(v) for v in keep.tolist()]})
    return cases


def resize_case(g: torch.Generator) -> dict:
    boxes = random_boxes(g, 100, 320.0)
    resized, original = (320, 426), (481, 641)
    return {"boxes": flat(boxes), "resized": list(resized), "original": list(original), "out": flat(resize_boxes(boxes, resized, original))}


def level_case(g: torch.Generator) -> dict:
    boxes = random_boxes(g, 500, 1200.0)
    # Squares whose side is at, and one float32 step around, the level boundaries 112, 224, 448.
    sides = []
    for b in (56.0, 112.0, 224.0, 448.0):
        t = torch.tensor([b])
        sides += [t, torch.nextafter(t, torch.zeros(1)), torch.nextafter(t, t * 2)]
    squares = torch.stack([torch.cat([torch.zeros(2), s.repeat(2)]) for s in sides])
    boxes = torch.cat([boxes, squares])
    k_min, k_max = 2, 5
    levels = LevelMapper(k_min, k_max)([boxes])
    return {"boxes": flat(boxes), "k_min": k_min, "k_max": k_max, "out": [int(v) for v in levels.tolist()]}


def grid_anchor_cases() -> list:
    """AnchorGenerator on the detectors' level layouts: ResNet-50 FPN (five levels, one size
    each) at 224x288 (the stride-64 map is 4x5, so its strides are 224 // 4 = 56 and
    288 // 5 = 57), MobileNetV3 FPN (three levels, five sizes each) at 320x448."""
    cases = []
    layouts = [
        (((32,), (64,), (128,), (256,), (512,)), (224, 288), (4, 8, 16, 32, 64)),
        (((32, 64, 128, 256, 512),) * 3, (320, 448), (16, 32, 64)),
    ]
    for sizes, padded, strides in layouts:
        ratios = ((0.5, 1.0, 2.0),) * len(sizes)
        images = ImageList(torch.zeros(1, 3, *padded), [padded])
        features = [torch.zeros(1, 1, -(-padded[0] // s), -(-padded[1] // s)) for s in strides]
        anchors = AnchorGenerator(sizes, ratios)(images, features)[0]
        cases.append({
            "sizes": [list(s) for s in sizes],
            "ratios": [list(r) for r in ratios],
            "padded": list(padded),
            "features": [list(f.shape[-2:]) for f in features],
            "out": flat(anchors),
        })
    return cases


def roi_pool_case(g: torch.Generator) -> dict:
    """MultiScaleRoIAlign over a batch of two images (resized 200x300 and 256x320, padded
    256x320), 48 RoIs each, from small ones to ones past the image (every level), on random
    feature maps named as BackboneWithFPN names them."""
    shapes = {"0": (64, 80), "1": (32, 40), "2": (16, 20), "3": (8, 10), "pool": (4, 5)}
    features = {name: torch.randn(2, 3, *shape, generator=g) for name, shape in shapes.items()}
    boxes = []
    for _ in range(2):
        xy = torch.rand(44, 2, generator=g) * 150
        wh = 4 + torch.rand(44, 2, generator=g) * 300
        big = torch.tensor([[0.0, 0.0, 460.0, 460.0], [10.0, 20.0, 250.0, 244.0], [5.0, 5.0, 117.0, 117.0], [1.0, 2.0, 3.0, 4.0]])
        boxes.append(torch.cat([torch.cat([xy, xy + wh], dim=1), big]))
    image_sizes = [(200, 300), (256, 320)]
    out = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(features, boxes, image_sizes)
    return {
        "names": list(shapes),
        "features": [{"shape": list(f.shape), "values": flat(f)} for f in features.values()],
        "boxes": [flat(b) for b in boxes],
        "image_sizes": [list(s) for s in image_sizes],
        "out": flat(out),
    }


def batched_nms_cases(g: torch.Generator) -> list:
    """batched_nms on candidates as the pipeline gives it them (at least 1e-2 wide and tall):
    clustered boxes with some duplicates, on both sides of its switch from the
    coordinate trick (at most 1000 candidates on the CPU) to a loop over the classes."""
    cases = []
    for n, classes, iou in ((50, 3, 0.5), (1000, 5, 0.7), (1001, 5, 0.7), (2500, 80, 0.5)):
        # Clusters around 60 objects, so that many candidates overlap above the threshold.
        centres = torch.rand(60, 2, generator=g) * 300
        sides = 10 + torch.rand(60, 2, generator=g) * 80
        member = torch.randint(0, 60, (n,), generator=g)
        xy = centres[member] + torch.randn(n, 2, generator=g) * 4
        wh = (sides[member] + torch.randn(n, 2, generator=g) * 4).clamp(min=0.01)
        boxes = torch.cat([xy, xy + wh], dim=1)
        boxes[n // 10 : n // 10 + n // 20] = boxes[: n // 20]
        scores = torch.rand(n, generator=g)
        idxs = torch.randint(0, classes, (n,), generator=g)
        keep = batched_nms(boxes, scores, idxs, iou)
        cases.append({
            "boxes": flat(boxes), "scores": flat(scores), "classes": [int(c) for c in idxs.tolist()],
            "class_count": classes, "iou_threshold": iou, "keep": [int(k) for k in keep.tolist()],
        })
    return cases


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(20261202)
    cases = {
        "torch": torch.__version__,
        "decode": decode_cases(g),
        "clip": clip_case(g),
        "small_boxes": small_box_case(g),
        "resize_boxes": resize_case(g),
        "level_mapper": level_case(g),
        "grid_anchors": grid_anchor_cases(),
        "multi_scale_roi_align": roi_pool_case(g),
        "batched_nms": batched_nms_cases(g),
    }
    with open(out_path, "w") as f:
        json.dump(cases, f)


if __name__ == "__main__":
    main(sys.argv[1])
