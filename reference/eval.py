"""A user's `src/eval.py`: evaluates a run's checkpoint with eager torchvision + pycocotools.

    python reference/eval.py RUN_DIR DATASET_DIR [--checkpoint best_model.pth] [--vis 4]

Writes `RUN_DIR/eval_<dataset_name>_<checkpoint_name>/` (`best_model.pth` ->
`best_model_pth`), with
  pytorch_metrics.json      {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10",
                             "AR100", "ARs", "ARm", "ARl", "stats": [12 floats]}
  pytorch_predictions.json  COCO results: image_id, category_id, bbox [x, y, w, h], score
  ground_truth_coco.json    COCO ground truth built from dataset.jsonl
  visualizations/NNNN_detected.png   the first --vis images with detections drawn
Image ids are the line's `id`, else its 0-based line index. Categories are 1..num_classes-1
named by the config's class names (`class_<i>` past them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from PIL import ImageDraw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

VIS_SCORE_THRESH = 0.5
PALETTE = [(255, 255, 0), (0, 255, 0), (255, 0, 255), (0, 255, 255), (255, 128, 0)]


def eval_dir_name(dataset_dir: str, checkpoint: str) -> str:
    dataset_name = os.path.basename(os.path.normpath(dataset_dir))
    return f"eval_{dataset_name}_{os.path.basename(checkpoint).replace('.', '_')}"


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(run_dir: str, dataset_dir: str, checkpoint: str = "best_model.pth", vis: int = 4) -> dict:
    model, spec, _ = common.load_run_model(run_dir, checkpoint)
    num_classes = model.roi_heads.box_predictor.cls_score.out_features
    names = common.class_names_for(spec, num_classes)
    records = common.load_dataset(dataset_dir)
    out_dir = os.path.join(run_dir, eval_dir_name(dataset_dir, checkpoint))
    vis_dir = os.path.join(out_dir, "visualizations")
    os.makedirs(vis_dir, exist_ok=True)

    results = []
    for idx, r in enumerate(records):
        pil, t = common.load_image(r.path)
        det = model([t])[0]
        results.extend(common.to_coco_results(r.image_id, det["boxes"], det["scores"], det["labels"]))
        if idx < vis:
            draw = ImageDraw.Draw(pil)
            for b, s, l in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
                if s < VIS_SCORE_THRESH:
                    continue
                colour = PALETTE[(l - 1) % len(PALETTE)]
                draw.rectangle(b, outline=colour, width=2)
                draw.text((b[0] + 2, b[1] + 1), f"{names[l - 1]} {s:.2f}", fill=colour)
            pil.save(os.path.join(vis_dir, f"{idx:04d}_detected.png"))

    gt = common.coco_ground_truth(records, names)
    metrics = common.coco_eval(gt, results)
    write_json(os.path.join(out_dir, "ground_truth_coco.json"), gt)
    write_json(os.path.join(out_dir, "pytorch_predictions.json"), results)
    write_json(os.path.join(out_dir, "pytorch_metrics.json"), metrics)
    return metrics


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Evaluate a run's checkpoint with eager torchvision")
    ap.add_argument("run_dir")
    ap.add_argument("dataset_dir")
    ap.add_argument("--checkpoint", default="best_model.pth")
    ap.add_argument("--vis", type=int, default=4, help="how many images to draw")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    m = evaluate(args.run_dir, args.dataset_dir, args.checkpoint, args.vis)
    print(json.dumps({k: round(v, 4) for k, v in m.items() if k != "stats"}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
