"""Seed corpora of the fuzz targets, written into fuzz/corpus/<target>/ (not committed).

checkpoint: small real torch.save files (bare state dict, wrapped with optimizer state and
extras, `module.` prefixes, views, several dtypes, pickle protocols 2 and 4);
checkpoint_pickle: their data.pkl records; dataset: dataset.jsonl texts; config: Hydra
configs. Needs torch (the project's .venv); `make fuzz` runs it.
"""

import io
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

CORPUS = Path(__file__).resolve().parent / "corpus"


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Under 1024 elements per tensor: the checkpoint_pickle target's storages hold 1024.
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16, 3)
    )


def checkpoints() -> dict[str, tuple[object, int]]:
    m = tiny_model()
    sd = m.state_dict()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(1, 3, 4, 4)).sum().backward()
    opt.step()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    views = OrderedDict(
        [
            ("t", base.t()),
            ("slice", base[1:3, ::2]),
            ("expand", torch.arange(3.0).expand(4, 3)),
            ("offset", base.view(-1)[5:11]),
        ]
    )
    dtypes = OrderedDict(
        (str(dt).removeprefix("torch."), torch.arange(6).to(dt))
        for dt in [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]
    )
    return {
        "bare": (sd, 2),
        "wrapped": ({"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": opt.state_dict(), "best_map": 0.5, "args": {"lr": 0.1}}, 2),
        "module_prefix": (OrderedDict(("module." + k, v) for k, v in sd.items()), 2),
        "views": (views, 2),
        "dtypes": (dtypes, 2),
        "protocol4": ({"state_dict": sd, "tag": "x" * 10, "big": 2**70}, 4),
    }


DATASET = [
    '{"image": "data/a.png", "boxes": [[1, 2, 30, 40]], "labels": [1], "width": 64, "height": 48, "id": 7}\n',
    '{"image": "data/a.png", "boxes": [], "labels": []}\n{"image": "data/b.jpg", "boxes": [[0.5, 0.5, 2.5, 9]], "labels": [2]}\n',
    '{"image": "data/b.jpg", "boxes": [[1, 2, 3]], "labels": [1]}\n',
    "\n\n{}\n",
]

CONFIGS = [
    "model:\n  name: fasterrcnn_mobilenet_v3_large_320_fpn\n",
    "model:\n  name: fasterrcnn_resnet50_fpn\n  num_classes: 3\n  min_size: 512\n  box_score_thresh: 0.3\n",
    "model:\n  arch: fasterrcnn_resnet50_fpn_v2\n  kwargs:\n    max_size: 800\n    image_mean: [0.5, 0.5, 0.5]\n"
    "dataset:\n  class_names: [background, a, b]\n",
    "detector:\n  _target_: torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn\n  rpn_pre_nms_top_n_test: 100\n",
    "class_names: null\nnetwork: {name: x, detections_per_img: 5}\n",
]


def write(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def main() -> int:
    for name, (obj, protocol) in checkpoints().items():
        buf = io.BytesIO()
        torch.save(obj, buf, pickle_protocol=protocol)
        data = buf.getvalue()
        write("checkpoint", name + ".pth", data)
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            write("checkpoint_pickle", name + ".pkl", z.read(pkl))
    for i, text in enumerate(DATASET):
        write("dataset", f"lines{i}.jsonl", text.encode())
    for i, text in enumerate(CONFIGS):
        write("config", f"config{i}.yaml", text.encode())
    print(f"seeds in {CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
