"""Checks an mkonnx INT8 model with the onnxruntime Python package (used by tests/int8.rs).

usage: int8_check.py MODEL.int8.onnx OUT.json IMAGE...

Loads the model with onnx.checker, then in ONNX Runtime with its default graph
optimizations (ORT_ENABLE_ALL, one intra-op thread), saves the optimized graph and counts
its operators (to see whether QuantizeLinear/DequantizeLinear were fused into integer
kernels), and runs the model on each image. Writes {"ops": {op: count}, "detections":
[{"image", "boxes" (pixels), "scores", "labels"}]} to OUT.json.
"""

import collections
import json
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image


def main():
    model_path, out_path, images = sys.argv[1], sys.argv[2], sys.argv[3:]
    onnx.checker.check_model(onnx.load(model_path))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        options.optimized_model_filepath = optimized
        session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(optimized, load_external_data=False).graph.node)
    detections = []
    for path in images:
        image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        height, width = image.shape[:2]
        location, score, category = session.run(None, {"input": image.transpose(2, 0, 1)[None]})
        keep = category[0] != 0
        boxes = location[0][keep] * np.array([width, height, width, height], dtype=np.float32)
        detections.append(
            {
                "image": os.path.basename(path),
                "boxes": boxes.tolist(),
                "scores": score[0][keep].tolist(),
                "labels": category[0][keep].tolist(),
            }
        )
    with open(out_path, "w") as f:
        json.dump({"ops": dict(ops), "detections": detections}, f)


if __name__ == "__main__":
    main()
