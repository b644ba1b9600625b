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
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops
from torchvision.ops.poolers import LevelMapper


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
    }
    with open(out_path, "w") as f:
        json.dump(cases, f)


if __name__ == "__main__":
    main(sys.argv[1])
