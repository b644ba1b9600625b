"""Shared pieces of the reference world: dataset reading, model construction from a Hydra
config, checkpoint unwrapping, COCO ground truth and COCOeval.

Everything here is plain torchvision / pycocotools so the fixtures are what a user's own
`src/train.py` / `src/eval.py` would produce.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field

import torch
import torchvision
from PIL import Image
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms.functional import to_tensor

ARCHITECTURES = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
)

# Keys of a `model:` config section that are not torchvision keyword arguments.
NON_KWARG_KEYS = {"name", "arch", "class_names", "_target_", "_partial_", "_convert_", "_recursive_"}

COCO_STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def set_threads(n: int = 1) -> None:
    """The build machine has 2 cores shared with compilers; stay on few threads."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


# ----------------------------------------------------------------------------- dataset


@dataclass
class Record:
    """One line of dataset.jsonl."""

    line: int  # 0-based line index
    image: str  # path relative to the dataset dir, as written in the line
    path: str  # absolute path
    boxes: list[list[float]]
    labels: list[int]
    image_id: int  # the line's `id`, else its 0-based index
    width: int | None = None
    height: int | None = None
    extra: dict = field(default_factory=dict)


def load_dataset(dataset_dir: str) -> list[Record]:
    """Parse `<dataset_dir>/dataset.jsonl` (one JSON object per non-empty line)."""
    path = os.path.join(dataset_dir, "dataset.jsonl")
    out = []
    with open(path) as f:
        for idx, raw in enumerate(l for l in f if l.strip()):
            obj = json.loads(raw)
            boxes = [[float(v) for v in b] for b in obj.get("boxes", [])]
            labels = [int(v) for v in obj.get("labels", [])]
            if len(boxes) != len(labels):
                raise ValueError(f"{path}:{idx + 1}: {len(boxes)} boxes but {len(labels)} labels")
            out.append(
                Record(
                    line=idx,
                    image=obj["image"],
                    path=os.path.join(dataset_dir, obj["image"]),
                    boxes=boxes,
                    labels=labels,
                    image_id=int(obj["id"]) if "id" in obj else idx,
                    width=obj.get("width"),
                    height=obj.get("height"),
                )
            )
    return out


def load_image(path: str) -> tuple[Image.Image, torch.Tensor]:
    """PIL image converted to RGB (alpha dropped, gray replicated) and its [3,H,W] tensor."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    return rgb, to_tensor(rgb)


# ----------------------------------------------------------------------------- model


@dataclass
class ModelSpec:
    """What a run's config says about the model."""

    arch: str
    kwargs: dict  # torchvision keyword overrides from the config (num_classes excluded)
    num_classes: int | None  # as written in the config, None when absent
    class_names: list[str] | None
    style: str  # "name", "arch" or "_target_"


def model_spec(cfg: dict) -> ModelSpec:
    """Read the architecture, torchvision kwargs and class names from a (plain dict) config."""
    m = dict(cfg.get("model") or {})
    if "_target_" in m:
        style, arch = "_target_", str(m["_target_"]).rsplit(".", 1)[-1]
    elif "name" in m:
        style, arch = "name", m["name"]
    elif "arch" in m:
        style, arch = "arch", m["arch"]
    else:
        raise ValueError("config has no model.name, model.arch or model._target_")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}")
    class_names = m.get("class_names") or (cfg.get("dataset") or {}).get("class_names")
    kwargs = {k: v for k, v in m.items() if k not in NON_KWARG_KEYS}
    num_classes = kwargs.pop("num_classes", None)
    return ModelSpec(arch, kwargs, num_classes, list(class_names) if class_names else None, style)


def effective_num_classes(spec: ModelSpec) -> int:
    """num_classes from the config, else one per class name plus background."""
    if spec.num_classes is not None:
        return int(spec.num_classes)
    if spec.class_names:
        return len(spec.class_names) + 1
    raise ValueError("config has neither model.num_classes nor class names")


def build_model(spec: ModelSpec, num_classes: int | None = None) -> torchvision.models.detection.FasterRCNN:
    """torchvision's constructor, never downloading weights."""
    fn = getattr(torchvision.models.detection, spec.arch)
    nc = num_classes if num_classes is not None else effective_num_classes(spec)
    return fn(weights=None, weights_backbone=None, num_classes=nc, **spec.kwargs)


def freeze_backbone_bn(model: torch.nn.Module) -> int:
    """Replace every BatchNorm2d of `model.backbone.body` by a FrozenBatchNorm2d holding the
    same statistics and affine parameters: the module tree torchvision builds when a
    pretrained backbone is given (`norm_layer=FrozenBatchNorm2d`). Returns how many."""
    count = 0

    def convert(parent: torch.nn.Module) -> None:
        nonlocal count
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
                setattr(parent, name, frozen)
                count += 1
            else:
                convert(child)

    with torch.no_grad():
        convert(model.backbone.body)
    return count


def unwrap_state_dict(ckpt) -> dict:
    """The state_dict inside a checkpoint (bare, or under model_state_dict/state_dict/model),
    with a DataParallel `module.` or wrapper `model.` prefix removed."""
    sd = ckpt
    if isinstance(ckpt, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if key in ckpt and isinstance(ckpt[key], dict):
                sd = ckpt[key]
                break
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    return out


def num_classes_from_state_dict(sd: dict) -> int:
    return int(sd["roi_heads.box_predictor.cls_score.weight"].shape[0])


def uses_frozen_bn(sd: dict) -> bool:
    """FrozenBatchNorm2d has no num_batches_tracked buffer; BatchNorm2d has one."""
    bn_keys = [k for k in sd if k.startswith("backbone.body.") and k.endswith(".running_var")]
    tracked = [k for k in sd if k.startswith("backbone.body.") and k.endswith(".num_batches_tracked")]
    return bool(bn_keys) and not tracked


def read_run_config(run_dir: str) -> dict:
    import yaml

    with open(os.path.join(run_dir, ".hydra", "config.yaml")) as f:
        return yaml.safe_load(f)


def load_run_model(run_dir: str, checkpoint: str = "best_model.pth"):
    """(model in eval mode, ModelSpec, config dict) of a Hydra run dir."""
    cfg = read_run_config(run_dir)
    spec = model_spec(cfg)
    ckpt = torch.load(os.path.join(run_dir, checkpoint), map_location="cpu", weights_only=True)
    sd = unwrap_state_dict(ckpt)
    model = build_model(spec, num_classes_from_state_dict(sd))
    if uses_frozen_bn(sd):
        freeze_backbone_bn(model)
    model.load_state_dict(sd, strict=True)
    model.eval()
    return model, spec, cfg


def class_names_for(spec: ModelSpec, num_classes: int) -> list[str]:
    """Names of categories 1..num_classes-1: the config's names, then `class_<i>`."""
    names = list(spec.class_names or [])
    return [names[i - 1] if i - 1 < len(names) else f"class_{i}" for i in range(1, num_classes)]


# ----------------------------------------------------------------------------- COCO


def coco_ground_truth(records: list[Record], category_names: list[str]) -> dict:
    """COCO ground truth: xywh boxes, area w*h, iscrowd 0, annotation ids from 1."""
    images, anns = [], []
    ann_id = 1
    for r in records:
        w, h = r.width, r.height
        if w is None or h is None:
            with Image.open(r.path) as im:
                w, h = im.size
        images.append({"id": r.image_id, "file_name": r.image, "width": int(w), "height": int(h)})
        for box, label in zip(r.boxes, r.labels):
            x1, y1, x2, y2 = box
            bw, bh = x2 - x1, y2 - y1
            anns.append(
                {
                    "id": ann_id,
                    "image_id": r.image_id,
                    "category_id": int(label),
                    "bbox": [x1, y1, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(category_names)]
    return {"images": images, "annotations": anns, "categories": cats}


def to_coco_results(image_id: int, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    out = []
    for b, s, l in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        out.append(
            {
                "image_id": image_id,
                "category_id": int(l),
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                "score": float(s),
            }
        )
    return out


def coco_eval(gt: dict, results: list[dict]) -> dict:
    """pycocotools COCOeval (bbox); an empty result list gives all-zero stats."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(gt))
        coco_gt.createIndex()
        if not results:
            stats = [0.0] * 12
        else:
            coco_dt = coco_gt.loadRes(json.loads(json.dumps(results)))
            ev = COCOeval(coco_gt, coco_dt, "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            stats = [float(v) for v in ev.stats]
    metrics = {name: stats[i] for i, name in enumerate(COCO_STAT_NAMES)}
    metrics["stats"] = stats
    return metrics


@torch.no_grad()
def evaluate_model(model, records: list[Record], category_names: list[str]) -> tuple[dict, list[dict], dict]:
    """(metrics, COCO results, COCO ground truth) of an eval-mode model on `records`."""
    results = []
    for r in records:
        _, t = load_image(r.path)
        det = model([t])[0]
        results.extend(to_coco_results(r.image_id, det["boxes"], det["scores"], det["labels"]))
    gt = coco_ground_truth(records, category_names)
    return coco_eval(gt, results), results, gt
