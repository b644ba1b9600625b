"""Golden outputs of eager torchvision, per run and eval image, with the intermediates that
help debug a reimplementation.

    python reference/golden.py RUN_DIR DATASET_DIR OUT_DIR [--checkpoint best_model.pth]

Writes OUT_DIR/<image_stem>.json for every line of DATASET_DIR/dataset.jsonl:
  image              the line's image path ("data/0000.png")
  image_id           the line's id, else its 0-based line index
  rgb_sum            sum of the uint8 RGB pixels after PIL .convert("RGB") (decode check)
  orig_size          [h, w]
  resized_size       [h, w] after GeneralizedRCNNTransform's resize
  padded_size        [h, w] of the batch tensor (multiple of 32)
  feature_sizes      [[h, w], ...] per feature map fed to the RPN, in order
  anchors_per_level  [H*W*A, ...] per feature map
  proposals          [[x1, y1, x2, y2], ...] RPN output after NMS, resized frame
  boxes, scores, labels   final detections at the original image size
and OUT_DIR/batch/<stem0>_<stem1>.json: one batched forward of the first two images (padded together), as
{"images": [...], "padded_size": [h, w], "results": [{resized_size, boxes, scores, labels}]}.
Floats are float32 values printed as float64 (exact round trip). Every file is checked:
the intermediates, chained, reproduce `model(images)` bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _floats(t: torch.Tensor):
    return t.detach().to(torch.float64).tolist()


@torch.no_grad()
def staged_forward(model, images: list[torch.Tensor]):
    """model(images) in eval mode, spelled out as torchvision's GeneralizedRCNN.forward."""
    original_sizes = [tuple(img.shape[-2:]) for img in images]
    image_list, _ = model.transform(images)
    features = model.backbone(image_list.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    proposals, _ = model.rpn(image_list, features)
    detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    detections = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)
    per_loc = model.rpn.anchor_generator.num_anchors_per_location()
    feats = list(features.values())
    return {
        "image_sizes": [list(s) for s in image_list.image_sizes],
        "padded_size": list(image_list.tensors.shape[-2:]),
        "feature_sizes": [list(f.shape[-2:]) for f in feats],
        "anchors_per_level": [int(f.shape[-2] * f.shape[-1] * a) for f, a in zip(feats, per_loc)],
        "proposals": proposals,
        "detections": detections,
    }


def _check_same(staged: list[dict], direct: list[dict], what: str) -> None:
    for i, (a, b) in enumerate(zip(staged, direct)):
        for k in ("boxes", "scores", "labels"):
            if not torch.equal(a[k], b[k]):
                raise AssertionError(f"{what} image {i}: staged {k} differ from model(images)")


@torch.no_grad()
def write_golden(run_dir: str, dataset_dir: str, out_dir: str, checkpoint: str = "best_model.pth") -> int:
    model, _, _ = common.load_run_model(run_dir, checkpoint)
    records = common.load_dataset(dataset_dir)
    os.makedirs(out_dir, exist_ok=True)
    tensors = []
    for r in records:
        pil, t = common.load_image(r.path)
        tensors.append(t)
        s = staged_forward(model, [t])
        det = s["detections"][0]
        _check_same(s["detections"], model([t]), r.image)
        doc = {
            "image": r.image,
            "image_id": r.image_id,
            "rgb_sum": int(np.asarray(pil, dtype=np.uint64).sum()),
            "orig_size": list(t.shape[-2:]),
            "resized_size": s["image_sizes"][0],
            "padded_size": s["padded_size"],
            "feature_sizes": s["feature_sizes"],
            "anchors_per_level": s["anchors_per_level"],
            "proposals": _floats(s["proposals"][0]),
            "boxes": _floats(det["boxes"]),
            "scores": _floats(det["scores"]),
            "labels": det["labels"].tolist(),
        }
        stem = os.path.splitext(os.path.basename(r.image))[0]
        with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
            json.dump(doc, f)

    if len(tensors) >= 2:
        batch = tensors[:2]
        s = staged_forward(model, batch)
        _check_same(s["detections"], model(batch), "batch")
        doc = {
            "images": [r.image for r in records[:2]],
            "padded_size": s["padded_size"],
            "results": [
                {
                    "resized_size": s["image_sizes"][i],
                    "boxes": _floats(d["boxes"]),
                    "scores": _floats(d["scores"]),
                    "labels": d["labels"].tolist(),
                }
                for i, d in enumerate(s["detections"])
            ],
        }
        os.makedirs(os.path.join(out_dir, "batch"), exist_ok=True)
        stems = "_".join(os.path.splitext(os.path.basename(r.image))[0] for r in records[:2])
        with open(os.path.join(out_dir, "batch", f"{stems}.json"), "w") as f:
            json.dump(doc, f)
    return len(records)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Write eager torchvision golden outputs")
    ap.add_argument("run_dir")
    ap.add_argument("dataset_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--checkpoint", default="best_model.pth")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    n = write_golden(args.run_dir, args.dataset_dir, args.out_dir, args.checkpoint)
    print(f"wrote golden outputs for {n} images to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
