"""Reference values of torchvision's CPU `nms`, `batched_nms`, `roi_align` and torch's CPU
descending `sort`, for mkonnx's own re-implementations (src/runtime/torch/ops.rs).

    python reference/ops_cases.py OUT_DIR

Writes OUT_DIR/sort.json, nms.json, batched_nms.json and roi_align.json: each a JSON object
{"torch": version, "torchvision": version, "cases": [...]}, every case holding its inputs
and torchvision's output (roi_align.json also has "input_shape" and "input": the feature
map [N, C, H, W] that all its cases pool from). Floats are float32 values printed as float64 (exact round trip);
NaN and infinities are written as the strings "nan", "inf", "-inf".

The inputs are drawn to hit what a detector meets and what breaks naive ports: tied scores
(the kernels sort unstably), NaN scores, zero-area and inverted boxes, boxes outside the
feature map, RoIs smaller than one bin, adaptive sampling, aligned=True, and sizes on both
sides of batched_nms's switch from the coordinate trick to a per-class loop (numel > 4000).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import torch
import torchvision
from torchvision.ops import batched_nms, nms, roi_align


def _f(values) -> list:
    """float32 values as JSON numbers, non-finite ones as strings."""
    out = []
    for v in np.asarray(values, dtype=np.float32).reshape(-1).tolist():
        if math.isnan(v):
            out.append("nan")
        elif math.isinf(v):
            out.append("inf" if v > 0 else "-inf")
        else:
            out.append(v)
    return out


def random_boxes(rng: np.random.Generator, n: int, extent: float, min_wh: float, max_wh: float) -> np.ndarray:
    x1 = rng.uniform(-0.1 * extent, extent, n)
    y1 = rng.uniform(-0.1 * extent, extent, n)
    w = rng.uniform(min_wh, max_wh, n)
    h = rng.uniform(min_wh, max_wh, n)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def tied_scores(rng: np.random.Generator, n: int, levels: int) -> np.ndarray:
    """Scores drawn from `levels` distinct values, so that many are equal."""
    values = rng.uniform(0.0, 1.0, levels).astype(np.float32)
    return values[rng.integers(0, levels, n)]


def degenerate(rng: np.random.Generator, boxes: np.ndarray, fraction: float) -> np.ndarray:
    """Turns a fraction of the boxes into zero-width, zero-height, inverted or duplicate ones."""
    boxes = boxes.copy()
    n = len(boxes)
    for i in rng.choice(n, size=int(n * fraction), replace=False):
        kind = rng.integers(0, 4)
        if kind == 0:
            boxes[i, 2] = boxes[i, 0]
        elif kind == 1:
            boxes[i, 3] = boxes[i, 1]
        elif kind == 2:
            boxes[i, [0, 2]] = boxes[i, [2, 0]]
        else:
            boxes[i] = boxes[rng.integers(0, n)]
    return boxes


def sort_cases(rng: np.random.Generator) -> list[dict]:
    cases = []
    for n in (1, 2, 5, 16, 17, 33, 100, 257, 1000, 4096, 6000):
        for levels in (2, 7, n):
            x = tied_scores(rng, n, levels)
            cases.append(x)
    special = np.array([1.0, np.nan, 2.0, np.nan, -np.inf, np.inf, 0.5, 0.5, -0.0, 0.0] * 5, dtype=np.float32)
    cases.append(special)
    # Long runs of one value, sorted and reverse-sorted input: the partition's worst cases.
    cases.append(np.full(500, 0.25, dtype=np.float32))
    cases.append(np.sort(tied_scores(rng, 800, 40)))
    cases.append(np.sort(tied_scores(rng, 800, 40))[::-1].copy())
    out = []
    for x in cases:
        order = torch.from_numpy(x).sort(0, descending=True)[1]
        out.append({"scores": _f(x), "order": order.tolist()})
    return out


def nms_cases(rng: np.random.Generator) -> list[dict]:
    out = []

    def add(boxes: np.ndarray, scores: np.ndarray, thr: float, note: str) -> None:
        keep = nms(torch.from_numpy(boxes).reshape(-1, 4), torch.from_numpy(scores), thr)
        out.append({"note": note, "boxes": _f(boxes), "scores": _f(scores), "iou_threshold": thr, "keep": keep.tolist()})

    add(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5, "empty")
    add(np.array([[1, 2, 3, 4]], np.float32), np.array([0.3], np.float32), 0.5, "single")
    for n, thr in ((10, 0.5), (60, 0.7), (300, 0.5), (300, 0.0), (300, 1.0), (1000, 0.7), (3000, 0.7)):
        boxes = random_boxes(rng, n, 200.0, 0.0, 80.0)
        add(boxes, rng.uniform(0, 1, n).astype(np.float32), thr, f"random n={n}")
        add(degenerate(rng, boxes, 0.2), tied_scores(rng, n, max(2, n // 20)), thr, f"ties+degenerate n={n}")
    # Clustered boxes: IoUs near the threshold, many equal scores.
    base = random_boxes(rng, 20, 100.0, 10.0, 40.0)
    boxes = (base[rng.integers(0, 20, 400)] + rng.normal(0, 2.0, (400, 4))).astype(np.float32)
    add(boxes, tied_scores(rng, 400, 5), 0.5, "clusters")
    scores = rng.uniform(0, 1, 400).astype(np.float32)
    scores[rng.choice(400, 30, replace=False)] = np.nan
    add(boxes, scores, 0.5, "nan scores")
    # Integer boxes (IoU exactly at the threshold happens).
    ib = np.floor(random_boxes(rng, 500, 50.0, 1.0, 20.0))
    add(ib.astype(np.float32), tied_scores(rng, 500, 10), 0.5, "integer boxes")
    return out


def batched_nms_cases(rng: np.random.Generator) -> list[dict]:
    out = []
    # n*4 > 4000 switches torchvision (on CPU) from the coordinate trick to a loop per class.
    for n, classes, thr in ((0, 3, 0.5), (50, 3, 0.5), (999, 5, 0.5), (1000, 5, 0.7), (1001, 5, 0.7), (2500, 4, 0.7), (2500, 80, 0.5)):
        boxes = degenerate(rng, random_boxes(rng, n, 300.0, 0.0, 100.0), 0.1) if n else np.zeros((0, 4), np.float32)
        for scores, note in ((rng.uniform(0, 1, n).astype(np.float32), "random"), (tied_scores(rng, n, max(2, n // 50)), "ties")):
            idxs = rng.integers(0, classes, n).astype(np.int64)
            keep = batched_nms(torch.from_numpy(boxes).reshape(-1, 4), torch.from_numpy(scores), torch.from_numpy(idxs), thr)
            out.append(
                {
                    "note": f"{note} n={n} classes={classes}",
                    "boxes": _f(boxes),
                    "scores": _f(scores),
                    "idxs": idxs.tolist(),
                    "iou_threshold": thr,
                    "keep": keep.tolist(),
                }
            )
    return out


def roi_align_cases(rng: np.random.Generator) -> list[dict]:
    out = []
    shape = (2, 3, 11, 15)
    feat = rng.normal(0, 1, shape).astype(np.float32)
    n = 60
    x1 = rng.uniform(-20, 70, n)
    y1 = rng.uniform(-20, 50, n)
    w = rng.uniform(0, 60, n)
    h = rng.uniform(0, 50, n)
    rois = np.stack([rng.integers(0, 2, n), x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)
    special = np.array(
        [
            [0, 0, 0, 0, 0],  # zero area at the origin
            [1, 10, 10, 10, 10],  # zero area inside
            [0, 30, 20, 10, 5],  # inverted
            [1, -50, -50, -30, -30],  # entirely outside, top-left
            [0, 100, 60, 200, 120],  # entirely outside, bottom-right
            [1, -5, -5, 200, 200],  # covers the whole map
            [0, 59.5, 43.5, 60.5, 44.5],  # at the last row/column (scale 0.25)
            [1, 3.3, 7.7, 3.4, 7.8],  # smaller than a bin
            [0, 0, 0, 59.999, 43.999],
        ],
        np.float32,
    )
    rois = np.concatenate([rois, special])
    combos = (((7, 7), 2, False), ((7, 7), 0, False), ((7, 7), 2, True), ((3, 5), 1, False), ((3, 5), -1, True), ((3, 5), 0, True))
    for scale in (1.0, 0.5, 0.25, 0.0625):
        for out_size, sampling_ratio, aligned in combos:
            y = roi_align(torch.from_numpy(feat), torch.from_numpy(rois), out_size, scale, sampling_ratio, aligned)
            out.append(
                {
                    "rois": _f(rois),
                    "spatial_scale": scale,
                    "output_size": list(out_size),
                    "sampling_ratio": sampling_ratio,
                    "aligned": aligned,
                    "output": _f(y.numpy()),
                }
            )
    # The feature map is shared by all cases, so it is written once, beside them.
    return {"input_shape": list(shape), "input": _f(feat), "cases": out}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = argv[0]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(20240611)
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    for name, make in (("sort", sort_cases), ("nms", nms_cases), ("batched_nms", batched_nms_cases), ("roi_align", roi_align_cases)):
        made = make(rng)
        doc = {**versions, **(made if isinstance(made, dict) else {"cases": made})}
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(doc, f)
        print(f"{name}: {len(doc['cases'])} cases", file=sys.stderr)
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
