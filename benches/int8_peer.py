"""The `int8` section's peer (reference only, run by benches/bench.rs): ONNX Runtime's own
static quantization of mkonnx's float32 model, evaluated and timed like mkonnx's INT8 model.

usage: int8_peer.py MODEL.onnx DATASET_DIR GROUND_TRUTH.json CALIBRATION_IMAGES THREADS OUT_DIR [MODEL.int8.onnx]

1. `onnxruntime.quantization.quant_pre_process` (ONNX Runtime's recommended preparation: its
   basic optimizations, which fold BatchNorm into Conv), then `quantize_static` in QDQ
   format, per channel, on Conv and Gemm, with its default types and min-max calibration,
   calibrated on the first CALIBRATION_IMAGES distinct images of the dataset in index order
   (the images mkonnx calibrates on by default).
2. COCO AP of that model over the whole dataset with pycocotools.
3. Latency of the float32 model, that model and (if given) mkonnx's INT8 model in this one
   process, by mkonnx's protocol (src/eval/latency.rs: 3 warm-up images, then 20 single
   images, median and nearest-rank p95, ONNX Runtime's default optimizations, THREADS
   intra-op threads).
Prints one JSON line: {"ap": {...}, "ms": {"float32": [median, p95], "quantize_static": ..., "mkonnx_int8": ...}}.
"""

import contextlib
import io
import json
import math
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

WARMUP_IMAGES = 3
TIMED_IMAGES = 20


def load(path):
    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return image.transpose(2, 0, 1)[None].copy()


def dataset_images(dataset_dir):
    seen, images = set(), []
    with open(os.path.join(dataset_dir, "dataset.jsonl")) as f:
        for line in f:
            if line.strip():
                name = json.loads(line)["image"]
                if name not in seen:
                    seen.add(name)
                    images.append(os.path.join(dataset_dir, name))
    return images


class Reader(CalibrationDataReader):
    def __init__(self, paths):
        self.paths = iter(paths)

    def get_next(self):
        path = next(self.paths, None)
        return None if path is None else {"input": load(path)}


def session(model, threads):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def latency(model, images, threads):
    s = session(model, threads)
    for image in images[:WARMUP_IMAGES]:
        s.run(None, {"input": image})
    ms = []
    for image in images[:TIMED_IMAGES]:
        start = time.perf_counter()
        s.run(None, {"input": image})
        ms.append((time.perf_counter() - start) * 1e3)
    ms.sort()
    n = len(ms)
    median = ms[n // 2] if n % 2 else (ms[n // 2 - 1] + ms[n // 2]) / 2
    return [median, ms[max(1, math.ceil(0.95 * n)) - 1]]


def coco_ap(model, ground_truth, dataset_dir, threads):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with open(ground_truth) as f:
        gt_images = json.load(f)["images"]
    s = session(model, threads)
    detections = []
    for img in gt_images:
        image = load(os.path.join(dataset_dir, img["file_name"]))
        h, w = image.shape[2:]
        location, score, category = s.run(None, {"input": image})
        for box, sc, cat in zip(location[0], score[0], category[0]):
            if cat == 0:
                continue
            x1, y1, x2, y2 = (box * [w, h, w, h]).tolist()
            detections.append({"image_id": img["id"], "category_id": int(cat), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(sc)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ground_truth)
        e = COCOeval(gt, gt.loadRes(detections), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return dict(zip(["AP", "AP50", "AP75", "AR100"], [float(e.stats[i]) for i in (0, 1, 2, 8)]))


def main():
    model, dataset_dir, ground_truth, n, threads, out_dir = sys.argv[1:7]
    ours = sys.argv[7] if len(sys.argv) > 7 else None
    n, threads = int(n), int(threads)
    os.makedirs(out_dir, exist_ok=True)
    prepared = os.path.join(out_dir, "prepared.onnx")
    peer = os.path.join(out_dir, "quantize_static.onnx")
    quant_pre_process(model, prepared, skip_symbolic_shape=True)
    paths = dataset_images(dataset_dir)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            prepared,
            peer,
            Reader(paths[:n]),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            op_types_to_quantize=["Conv", "Gemm"],
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    quantize_seconds = time.perf_counter() - start
    images = [load(p) for p in paths[:TIMED_IMAGES]]
    ms = {"float32": latency(model, images, threads), "quantize_static": latency(peer, images, threads)}
    if ours:
        ms["mkonnx_int8"] = latency(ours, images, threads)
    ap = {"quantize_static": coco_ap(peer, ground_truth, dataset_dir, threads)}
    print(json.dumps({"ap": ap, "ms": ms, "quantize_seconds": quantize_seconds}))


if __name__ == "__main__":
    main()
