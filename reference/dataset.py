"""Deterministic synthetic "triangles" detection datasets.

Writes `<dir>/dataset.jsonl` and `<dir>/data/` in the layout of DESIGN.md section 1:
one JSON object per line, `{"image": "data/0000.png", "boxes": [[x1, y1, x2, y2], ...],
"labels": [1, ...], "width": W, "height": H, "id": N}`, pixel coordinates, labels
1-indexed (0 is background).

Two classes that a small detector learns quickly and that survive a grayscale image:
  1 `up`   - a triangle with its apex at the top, drawn in warm colours,
  2 `down` - a triangle with its apex at the bottom, drawn in cool colours.
Orientation alone separates the classes, so the grayscale image is still labelled
unambiguously; colour makes them easier to learn.

The eval split deliberately mixes what a reader must handle: PNG and JPEG, a grayscale
("L") image, an RGBA image whose alpha varies (PIL's `.convert("RGB")` drops alpha, it
does not composite), an image with no objects, odd and non-square sizes (e.g. 320x200,
which torchvision's own ONNX export resizes one pixel short), and one line without the
optional `width`/`height`/`id` keys.

Usage: python reference/dataset.py OUT_DIR [--split train|small] [--seed N] [--count N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

CLASS_NAMES = ["up", "down"]
TRAIN_NAME = "triangles_train"
SMALL_NAME = "triangles_dataset_small"
TRAIN_SEED = 1234
SMALL_SEED = 5678
TRAIN_COUNT = 200


@dataclass
class ImageSpec:
    """How one image of the dataset is to be written."""

    width: int
    height: int
    ext: str = "png"  # "png" or "jpg"
    mode: str = "RGB"  # "RGB", "L" or "RGBA"
    max_objects: int = 4
    min_objects: int = 1
    write_optional_keys: bool = True


# The eval split is listed explicitly so tests can rely on each special case being there.
SMALL_SPECS = [
    ImageSpec(320, 200),  # the size torchvision's ONNX export resizes to 511x319
    ImageSpec(200, 320, ext="jpg"),
    ImageSpec(257, 193),
    ImageSpec(160, 160, min_objects=0, max_objects=0),  # no objects
    ImageSpec(301, 227, mode="L"),  # grayscale
    ImageSpec(240, 180, mode="RGBA"),  # alpha varies across the image
    ImageSpec(179, 311, ext="jpg"),
    ImageSpec(320, 240, max_objects=5),
    ImageSpec(224, 288),
    ImageSpec(311, 171, ext="jpg"),
    ImageSpec(288, 224, write_optional_keys=False),  # no width/height/id keys
    ImageSpec(163, 250),
    ImageSpec(272, 208, ext="jpg"),
    ImageSpec(320, 320, max_objects=5),
]


def _triangle(rng: random.Random, label: int, cx: float, cy: float, size: float):
    """Vertices of a triangle of class `label` centred near (cx, cy), integer pixels."""
    half_w = size * rng.uniform(0.42, 0.58)
    half_h = size * rng.uniform(0.42, 0.58)
    apex_dx = size * rng.uniform(-0.15, 0.15)
    if label == 1:  # apex up
        pts = [(cx + apex_dx, cy - half_h), (cx - half_w, cy + half_h), (cx + half_w, cy + half_h)]
    else:  # apex down
        pts = [(cx + apex_dx, cy + half_h), (cx - half_w, cy - half_h), (cx + half_w, cy - half_h)]
    return [(int(round(x)), int(round(y))) for x, y in pts]


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _colour(rng: random.Random, label: int):
    if label == 1:  # warm: red / orange / magenta
        return (rng.randint(190, 255), rng.randint(0, 110), rng.randint(0, 90))
    return (rng.randint(0, 80), rng.randint(60, 170), rng.randint(190, 255))  # cool: blue


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    """A smooth light/dark gradient with noise, so objects are not on a flat colour."""
    base = [rng.randint(60, 200) for _ in range(3)]
    drift = [rng.randint(-50, 50) for _ in range(3)]
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):
        t = y / max(1, height - 1)
        c = tuple(max(0, min(255, int(b + d * t))) for b, d in zip(base, drift))
        draw.line([(0, y), (width, y)], fill=c)
    # A few soft distractor blobs (circles) so the detector must learn shape, not "any colour".
    for _ in range(rng.randint(0, 3)):
        r = rng.randint(6, 22)
        x, y = rng.randint(0, width - 1), rng.randint(0, height - 1)
        c = tuple(rng.randint(0, 255) for _ in range(3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=c)
    # Noise from the seeded generator (PIL's effect_noise uses C rand(), not reproducible).
    noise = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    return Image.blend(img, noise, 0.12)


def _render(rng: random.Random, spec: ImageSpec):
    img = _background(rng, spec.width, spec.height)
    draw = ImageDraw.Draw(img)
    boxes: list[list[float]] = []
    labels: list[int] = []
    n = rng.randint(spec.min_objects, spec.max_objects)
    short = min(spec.width, spec.height)
    tries = 0
    while len(boxes) < n and tries < 200:
        tries += 1
        label = rng.randint(1, len(CLASS_NAMES))
        size = rng.uniform(0.18, 0.45) * short
        cx = rng.uniform(size * 0.6, spec.width - size * 0.6)
        cy = rng.uniform(size * 0.6, spec.height - size * 0.6)
        pts = _triangle(rng, label, cx, cy, size)
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        # PIL fills the polygon's pixels inclusively, so the covered extent is max + 1.
        box = [float(min(xs)), float(min(ys)), float(max(xs) + 1), float(max(ys) + 1)]
        if box[0] < 0 or box[1] < 0 or box[2] > spec.width or box[3] > spec.height:
            continue
        if any(_iou(box, b) > 0.05 for b in boxes):
            continue
        draw.polygon(pts, fill=_colour(rng, label), outline=(20, 20, 20))
        boxes.append(box)
        labels.append(label)
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    if spec.mode == "L":
        img = img.convert("L")
    elif spec.mode == "RGBA":
        alpha = Image.linear_gradient("L").resize((spec.width, spec.height)).point(lambda v: 128 + v // 2)
        img = img.convert("RGBA")
        img.putalpha(alpha)
    return img, boxes, labels


def write_dataset(out_dir: str, specs: list[ImageSpec], seed: int) -> int:
    """Write `specs` as a dataset into `out_dir`; returns the number of images."""
    rng = random.Random(seed)
    data_dir = os.path.join(out_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    lines = []
    for idx, spec in enumerate(specs):
        img, boxes, labels = _render(rng, spec)
        rel = f"data/{idx:04d}.{spec.ext}"
        path = os.path.join(out_dir, rel)
        if spec.ext == "jpg":
            # 4:4:4 (no chroma subsampling) keeps decoders other than libjpeg (e.g. the Rust
            # `image` crate) close to PIL's pixels: chroma upsampling is where they differ most.
            img.save(path, format="JPEG", quality=95, subsampling=0)
        else:
            img.save(path, format="PNG")
        entry: dict = {"image": rel, "boxes": boxes, "labels": labels}
        if spec.write_optional_keys:
            entry.update({"width": spec.width, "height": spec.height, "id": idx})
        lines.append(json.dumps(entry))
    with open(os.path.join(out_dir, "dataset.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "class_names.json"), "w") as f:
        json.dump(CLASS_NAMES, f)
    return len(specs)


def train_specs(seed: int, count: int) -> list[ImageSpec]:
    """Random sizes 160..320 per side, mostly PNG, some JPEG, some grayscale."""
    rng = random.Random(seed ^ 0x5EED)
    specs = []
    for i in range(count):
        w, h = rng.randint(160, 320), rng.randint(160, 320)
        ext = "jpg" if i % 5 == 4 else "png"
        mode = "L" if i % 11 == 7 else "RGB"
        specs.append(ImageSpec(w, h, ext=ext, mode=mode, min_objects=0 if i % 23 == 0 else 1))
    return specs


def write_train(out_dir: str, seed: int = TRAIN_SEED, count: int = TRAIN_COUNT) -> int:
    return write_dataset(out_dir, train_specs(seed, count), seed)


def write_small(out_dir: str, seed: int = SMALL_SEED) -> int:
    return write_dataset(out_dir, SMALL_SPECS, seed)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--split", choices=["train", "small"], default="small")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--count", type=int, default=TRAIN_COUNT)
    args = ap.parse_args(argv)
    if args.split == "train":
        n = write_train(args.out_dir, args.seed if args.seed is not None else TRAIN_SEED, args.count)
    else:
        n = write_small(args.out_dir, args.seed if args.seed is not None else SMALL_SEED)
    print(f"wrote {n} images to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
