"""COCO bbox evaluation cases with pycocotools' answers, for tests/coco_eval.rs.

Writes constructed ground truth / results pairs and what pycocotools 2.0.x
`COCOeval(gt, gt.loadRes(dt), 'bbox')` makes of them: the 12 `stats` and the exact
text `summarize()` prints. Every case is deterministic (fixed seeds, no clocks in the
files), so the fixture hash stays stable.

Layout of OUT_DIR:
  expected.json             {"pycocotools", "numpy", "iou_thrs", "rec_thrs",
                             "cases": [{"name", "gt", "dt", "stats", "summary",
                                        "error", "note"}],
                             "bench": {...same keys..., "images", "detections"}}
}}
  cases/<name>/gt.json, cases/<name>/dt.json
  bench_gt.json, bench_dt.json   (~5,000 images, ~200k detections, 80 classes)

`gt`/`dt` paths in expected.json are relative to OUT_DIR. `error` is pycocotools'
exception message where it refuses the input (then `stats`/`summary` are null).

Where pycocotools cannot run at all, the case says so in `note` and the reference is
computed the nearest way pycocotools can: an empty results list makes `loadRes` fail
with IndexError (`anns[0]`), so those cases evaluate a results COCO object built
exactly as `loadRes` builds one, with no annotations.

Usage: python reference/coco_cases.py OUT_DIR
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import random
import sys
import time

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# The 80 category ids of COCO 2017 (1..90 with gaps), to exercise sparse ids.
COCO80_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
IMAGE_SIZES = [(640, 480), (1333, 800), (320, 200), (800, 800), (500, 375), (1024, 683)]


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))


def empty_results(coco_gt: COCO) -> COCO:
    """What `loadRes` would build for a list with no detections, had it not failed."""
    res = COCO()
    res.dataset["info"] = copy.deepcopy(coco_gt.dataset.get("info", {}))
    res.dataset["images"] = list(coco_gt.dataset["images"])
    res.dataset["categories"] = copy.deepcopy(coco_gt.dataset["categories"])
    res.dataset["annotations"] = []
    res.createIndex()
    return res


def run_cocoeval(gt_path: str, dt_path: str) -> dict:
    """pycocotools on the two files: stats and printed summary, or its error."""
    noise = io.StringIO()
    with contextlib.redirect_stdout(noise):
        coco_gt = COCO(gt_path)
        with open(dt_path) as f:
            dets = json.load(f)
        try:
            coco_dt = coco_gt.loadRes(dt_path) if dets else empty_results(coco_gt)
        except AssertionError as e:
            return {"stats": None, "summary": None, "error": str(e)}
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ev.summarize()
    return {"stats": [float(s) for s in ev.stats], "summary": printed.getvalue(), "error": None}


class Builder:
    """Accumulates a ground truth and a results list."""

    def __init__(self, cat_ids, names=None):
        self.images = []
        self.annotations = []
        self.dets = []
        self.categories = [
            {"id": c, "name": (names[i] if names else f"class_{c}"), "supercategory": "thing"}
            for i, c in enumerate(cat_ids)
        ]
        self.next_ann_id = 1

    def image(self, img_id, w=640, h=480):
        self.images.append({"id": img_id, "file_name": f"{img_id:08d}.jpg", "width": w, "height": h})
        return img_id

    def gt(self, img_id, cat, bbox, area=None, iscrowd=0, ann_id=None, **extra):
        if ann_id is None:
            ann_id = self.next_ann_id
            self.next_ann_id += 1
        ann = {
            "id": ann_id,
            "image_id": img_id,
            "category_id": cat,
            "bbox": list(bbox),
            "area": bbox[2] * bbox[3] if area is None else area,
            "iscrowd": iscrowd,
        }
        ann.update(extra)
        self.annotations.append(ann)
        return ann

    def det(self, img_id, cat, bbox, score):
        self.dets.append({"image_id": img_id, "category_id": cat, "bbox": list(bbox), "score": score})

    def gt_json(self):
        return {
            "info": {"description": "mkonnx COCO evaluation case"},
            "images": self.images,
            "annotations": self.annotations,
            "categories": self.categories,
        }


def _rounder(digits):
    if digits is None:
        return lambda v: float(v)
    if digits == "f32":
        # What a model's float32 output looks like once written as JSON.
        return lambda v: float(np.float32(v))
    return lambda v: round(float(v), digits)


def realistic(
    rng: random.Random,
    b: Builder,
    n_images: int,
    *,
    first_id=1,
    id_step=1,
    gt_max=12,
    empty_p=0.1,
    crowd_p=0.02,
    dup_max=2,
    fp_range=(0, 8),
    coord_digits=2,
    score_digits=4,
    seg_area_p=0.5,
    hit_p=0.85,
    wrong_cat_p=0.1,
    active_max=None,
):
    """Images with objects of all sizes, detections jittered from them, and clutter.

    With `active_max`, each image shows only a few classes (as real photos do) and
    most clutter is of those classes.
    """
    all_cats = [c["id"] for c in b.categories]
    cats = all_cats
    rc = _rounder(coord_digits)
    rs = _rounder(score_digits)
    for n in range(n_images):
        W, H = rng.choice(IMAGE_SIZES)
        img = b.image(first_id + n * id_step, W, H)
        if active_max is not None:
            cats = rng.sample(all_cats, rng.randint(1, active_max))
        n_gt = 0 if rng.random() < empty_p else rng.randint(1, gt_max)
        for _ in range(n_gt):
            # Log-uniform sizes: small, medium and large objects all occur.
            w = math.exp(rng.uniform(math.log(3.0), math.log(min(W, H) * 0.95)))
            h = min(H * 0.98, max(1.0, w * math.exp(rng.gauss(0.0, 0.4))))
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            cat = rng.choice(cats)
            crowd = 1 if rng.random() < crowd_p else 0
            box = [rc(x), rc(y), rc(w), rc(h)]
            # COCO's area is the segmentation's, smaller than the box.
            area = box[2] * box[3] * (rng.uniform(0.5, 0.95) if rng.random() < seg_area_p else 1.0)
            b.gt(img, cat, box, area=area, iscrowd=crowd)
            if rng.random() < hit_p:
                for k in range(rng.randint(1, dup_max)):
                    s = 0.06 if k == 0 else 0.25
                    dw = w * math.exp(rng.gauss(0.0, s))
                    dh = h * math.exp(rng.gauss(0.0, s))
                    dx = x + rng.gauss(0.0, s * w * 0.5)
                    dy = y + rng.gauss(0.0, s * h * 0.5)
                    dcat = cat if rng.random() > wrong_cat_p else rng.choice(cats)
                    score = rng.betavariate(6, 2) if k == 0 else rng.betavariate(2, 4)
                    b.det(img, dcat, [rc(dx), rc(dy), rc(dw), rc(dh)], rs(score))
        for _ in range(rng.randint(*fp_range)):
            w = math.exp(rng.uniform(math.log(4.0), math.log(min(W, H) * 0.8)))
            h = w * math.exp(rng.gauss(0.0, 0.5))
            x, y = rng.uniform(-5, W - w * 0.5), rng.uniform(-5, H - h * 0.5)
            cat = rng.choice(cats) if rng.random() < 0.8 else rng.choice(all_cats)
            b.det(img, cat, [rc(x), rc(y), rc(w), rc(h)], rs(rng.betavariate(1.5, 6)))


# --- the cases -------------------------------------------------------------------


def case_random(seed, n_images, cat_ids, shuffle=False, **kw):
    def build():
        rng = random.Random(seed)
        b = Builder(cat_ids)
        realistic(rng, b, n_images, **kw)
        if shuffle:
            # File order decides score ties and must not matter otherwise.
            rng.shuffle(b.images)
            rng.shuffle(b.annotations)
            rng.shuffle(b.categories)
            rng.shuffle(b.dets)
        return b.gt_json(), b.dets, None

    return build


def case_no_predictions():
    rng = random.Random(10)
    b = Builder([1, 2, 3])
    realistic(rng, b, 40)
    return b.gt_json(), [], "pycocotools' loadRes raises IndexError on an empty list; reference built as loadRes would"


def case_images_without_gt():
    rng = random.Random(11)
    b = Builder([1, 2])
    realistic(rng, b, 100, empty_p=0.7, fp_range=(1, 6), first_id=500, id_step=3)
    return b.gt_json(), b.dets, None


def case_score_ties():
    rng = random.Random(12)
    b = Builder([1, 2, 3])
    realistic(rng, b, 60, dup_max=3, fp_range=(2, 10))
    levels = [0.25, 0.5, 0.75, 1.0]
    for d in b.dets:
        d["score"] = rng.choice(levels)
    # Exact duplicates of detections, with the same score, inside and across images.
    for d in list(b.dets[::7]):
        b.dets.append(dict(d))
    rng.shuffle(b.dets)
    return b.gt_json(), b.dets, None


def case_many_classes():
    rng = random.Random(13)
    b = Builder(COCO80_IDS)
    realistic(rng, b, 150, gt_max=20, fp_range=(0, 15), coord_digits=None, score_digits=None)
    return b.gt_json(), b.dets, None


def case_tiny_and_huge():
    rng = random.Random(14)
    b = Builder([1, 2])
    img = b.image(1, 20000, 20000)
    # Exactly on the area bounds (inclusive at both ends), just off them, and the
    # box-versus-area distinction.
    for k, (w, h, area) in enumerate(
        [
            (32, 32, None),
            (32, 32.0001, None),
            (31.9999, 32, None),
            (96, 96, None),
            (96, 96.001, None),
            (95.999, 96, None),
            (40, 40, 1024),
            (100, 100, 9216),
            (100, 100, 9215.99),
            (20, 20, 1024.01),
        ]
    ):
        x, y = 200.0 * k, 100.0
        b.gt(img, 1, [x, y, w, h], area=area)
        b.det(img, 1, [x + 0.5, y, w, h], 0.9 - 0.01 * k)
        b.det(img, 1, [x, y + 300, w, h], 0.3 + 0.01 * k)  # a miss with the same area
    # Tiny objects and detections (down to degenerate ones).
    for k in range(30):
        w, h = rng.uniform(0.5, 6), rng.uniform(0.5, 6)
        x, y = 1000 + 20.0 * k, 1000.0
        b.gt(img, 2, [x, y, w, h])
        b.det(img, 2, [x + rng.uniform(-0.5, 0.5), y, w * rng.uniform(0.8, 1.2), h], rng.random())
    b.gt(img, 2, [5000, 5000, 0, 10])  # zero width: no detection can overlap it
    b.det(img, 2, [5000, 5000, 0, 10], 0.99)
    b.det(img, 2, [5100, 5000, 10, 0], 0.98)
    # Huge objects, one beyond the largest area range (1e5^2): ignored everywhere.
    img2 = b.image(2, 100000, 150000)
    b.gt(img2, 1, [0, 0, 3000, 4000])
    b.det(img2, 1, [10, 10, 3000, 3990], 0.95)
    b.gt(img2, 1, [0, 0, 100000, 150000])
    b.det(img2, 1, [0, 0, 100000, 149000], 0.97)
    b.det(img2, 2, [0, 0, 99000, 149000], 0.96)  # area > 1e10, nothing to match: ignored
    b.gt(img2, 2, [50000, 50000, 40000, 40000])
    b.det(img2, 2, [50000, 50000, 40000, 39000], 0.5)
    return b.gt_json(), b.dets, None


def case_crowd():
    rng = random.Random(15)
    b = Builder([1, 2])
    for n in range(25):
        img = b.image(n + 1, 800, 600)
        # A crowd region with several detections inside it (each IoU = 1 for a crowd).
        cx, cy = rng.uniform(0, 300), rng.uniform(0, 200)
        crowd = b.gt(img, 1, [cx, cy, 400, 300], iscrowd=(True if n % 2 else 1))
        for _ in range(rng.randint(1, 6)):
            w, h = rng.uniform(20, 150), rng.uniform(20, 150)
            x = crowd["bbox"][0] + rng.uniform(-30, 400 - w)
            y = crowd["bbox"][1] + rng.uniform(-30, 300 - h)
            b.det(img, 1, [x, y, w, h], round(rng.random(), 3))
        # Regular objects inside and beside the crowd, some detected.
        for _ in range(rng.randint(0, 4)):
            w, h = rng.uniform(15, 120), rng.uniform(15, 120)
            x, y = rng.uniform(0, 800 - w), rng.uniform(0, 600 - h)
            b.gt(img, rng.choice([1, 2]), [x, y, w, h], iscrowd=(False if n % 3 else 0))
            if rng.random() < 0.8:
                b.det(img, b.annotations[-1]["category_id"],
                      [x + rng.gauss(0, 4), y + rng.gauss(0, 4), w * rng.uniform(0.85, 1.15), h],
                      round(rng.random(), 3))
        if n % 5 == 0:
            # A crowd-only image and category: only crowd ground truth, so npig = 0.
            b.gt(img, 2, [500, 400, 200, 150], iscrowd=1)
            b.det(img, 2, [520, 410, 100, 100], 0.8)
    return b.gt_json(), b.dets, None


def case_ignore_flags():
    rng = random.Random(16)
    b = Builder([1, 2, 3])
    realistic(rng, b, 60)
    for i, a in enumerate(b.annotations):
        if i % 4 == 0:
            a["ignore"] = 1 if i % 8 == 0 else True
        elif i % 4 == 1:
            a["ignore"] = 0
    return b.gt_json(), b.dets, "pycocotools 2.0.x overwrites `ignore` with `iscrowd`"


def case_over_100_dets():
    rng = random.Random(17)
    b = Builder([1, 2])
    realistic(rng, b, 20, gt_max=40, empty_p=0.0, dup_max=4, fp_range=(150, 400), hit_p=0.95)
    return b.gt_json(), b.dets, None


def case_category_mismatch():
    rng = random.Random(18)
    b = Builder([1, 2, 3, 4, 5, 6])
    realistic(rng, b, 50)
    # Ground truth only in 1..4, detections only in 3..6 (and some unknown ids).
    b.annotations = [a for a in b.annotations if a["category_id"] <= 4]
    b.dets = [d for d in b.dets if d["category_id"] >= 3]
    for d in b.dets[::9]:
        b.det(d["image_id"], 99, d["bbox"], d["score"])  # not a category: skipped
    b.gt(1, 77, [10, 10, 50, 50])  # not a category: skipped
    b.gt(424242, 1, [10, 10, 50, 50])  # not an image: skipped
    return b.gt_json(), b.dets, None


def case_no_gt_annotations():
    rng = random.Random(19)
    b = Builder([1, 2])
    realistic(rng, b, 10)
    b.annotations = []
    return b.gt_json(), b.dets, None


def case_gt_id_zero():
    rng = random.Random(20)
    b = Builder([1, 2])
    realistic(rng, b, 30)
    for i, a in enumerate(b.annotations):
        a["id"] = i  # 0-based: a match to id 0 reads as no match in pycocotools
    return b.gt_json(), b.dets, "annotation ids start at 0"


def case_duplicate_gt_ids():
    rng = random.Random(21)
    b = Builder([1, 2])
    realistic(rng, b, 30)
    for i, a in enumerate(b.annotations):
        if i % 6 == 5:
            a["id"] = b.annotations[i - 3]["id"]
    return b.gt_json(), b.dets, "duplicate annotation ids resolve to the last one, as in pycocotools"


def case_exact_iou():
    b = Builder([1])
    # Integer boxes with IoU exactly on the thresholds; integer JSON numbers.
    for k, dw in enumerate([50, 55, 60, 65, 70, 75, 80, 85, 90, 95, 100, 49]):
        img = b.image(k + 1)
        b.gt(img, 1, [0, 0, 100, 10])
        b.det(img, 1, [0, 0, dw, 10], 1 if k % 2 else 0)
    # Equal IoU with two identical ground truths: the later one takes the match.
    img = b.image(100)
    b.gt(img, 1, [10, 10, 40, 40])
    b.gt(img, 1, [10, 10, 40, 40])
    for s in (0.9, 0.9, 0.9):
        b.det(img, 1, [10, 10, 40, 40], s)
    return b.gt_json(), b.dets, None


def case_single():
    b = Builder([1])
    img = b.image(1)
    b.gt(img, 1, [10.0, 20.0, 30.0, 40.0])
    b.det(img, 1, [10.0, 20.0, 30.0, 40.0], 0.5)
    return b.gt_json(), b.dets, None


def case_empty_everything():
    b = Builder([1, 2])
    return b.gt_json(), [], "no images: every stat is -1 (pycocotools' loadRes fails on the empty list)"


def case_unknown_image():
    rng = random.Random(22)
    b = Builder([1])
    realistic(rng, b, 5)
    b.det(999, 1, [0, 0, 10, 10], 0.5)
    return b.gt_json(), b.dets, "pycocotools refuses results for images it does not have"


CASES = {
    "random_seed0": case_random(0, 120, [1, 2, 3, 4, 5]),
    "random_seed1_shuffled": case_random(1, 200, [1, 2, 3], shuffle=True, coord_digits=None, score_digits=None),
    "random_seed2_sparse_ids": case_random(2, 80, [2, 5, 7, 11, 13, 17, 19, 23, 29, 31], first_id=10**9, id_step=7919, crowd_p=0.06, score_digits=2),
    "random_seed3_float32": case_random(3, 300, [1, 2], first_id=0, coord_digits="f32", score_digits="f32"),
    "random_seed4_dense": case_random(4, 60, [1, 2, 3], gt_max=40, dup_max=3, fp_range=(10, 60), shuffle=True),
    "no_predictions": case_no_predictions,
    "images_without_gt": case_images_without_gt,
    "score_ties": case_score_ties,
    "many_classes": case_many_classes,
    "tiny_and_huge": case_tiny_and_huge,
    "crowd": case_crowd,
    "ignore_flags": case_ignore_flags,
    "over_100_dets": case_over_100_dets,
    "category_mismatch": case_category_mismatch,
    "no_gt_annotations": case_no_gt_annotations,
    "gt_id_zero": case_gt_id_zero,
    "duplicate_gt_ids": case_duplicate_gt_ids,
    "exact_iou": case_exact_iou,
    "single": case_single,
    "empty_everything": case_empty_everything,
    "unknown_image": case_unknown_image,
}


def bench_case():
    """~5,000 images, ~200k detections, 80 classes: the speed comparison."""
    rng = random.Random(2024)
    b = Builder(COCO80_IDS)
    realistic(rng, b, 5000, gt_max=14, fp_range=(20, 50), coord_digits="f32", score_digits="f32",
              active_max=6)
    return b.gt_json(), b.dets


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[1]
    os.makedirs(out, exist_ok=True)
    thr = COCOeval(iouType="bbox").params
    expected = {
        "pycocotools": _version("pycocotools"),
        "numpy": np.__version__,
        "iou_thrs": [float(v) for v in thr.iouThrs],
        "rec_thrs": [float(v) for v in thr.recThrs],
        "cases": [],
    }
    for name, build in CASES.items():
        gt, dt, note = build()
        gt_rel, dt_rel = f"cases/{name}/gt.json", f"cases/{name}/dt.json"
        write_json(os.path.join(out, gt_rel), gt)
        write_json(os.path.join(out, dt_rel), dt)
        res = run_cocoeval(os.path.join(out, gt_rel), os.path.join(out, dt_rel))
        expected["cases"].append({"name": name, "gt": gt_rel, "dt": dt_rel, "note": note, **res})
        print(f"{name}: {len(gt['images'])} images, {len(gt['annotations'])} gt, {len(dt)} dt", file=sys.stderr)

    gt, dt = bench_case()
    write_json(os.path.join(out, "bench_gt.json"), gt)
    write_json(os.path.join(out, "bench_dt.json"), dt)
    t0 = time.perf_counter()
    res = run_cocoeval(os.path.join(out, "bench_gt.json"), os.path.join(out, "bench_dt.json"))
    seconds = time.perf_counter() - t0
    expected["bench"] = {
        "name": "bench",
        "gt": "bench_gt.json",
        "dt": "bench_dt.json",
        "note": None,
        "images": len(gt["images"]),
        "detections": len(dt),
        **res,
    }
    print(f"bench: {len(gt['images'])} images, {len(gt['annotations'])} gt, {len(dt)} dt, "
          f"pycocotools {seconds:.1f} s", file=sys.stderr)
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
