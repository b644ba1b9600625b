"""Runs ONNX models in OpenVINO (CPU) for tests/openvino.rs: a second test-time reference
runtime beside onnxruntime (which it can also run, for side-by-side checks). mkonnx itself
never needs either Python package.

    openvino_infer.py JOB.json OUT_DIR

JOB is {"models": [{"path": MODEL.onnx, "runtime": "openvino" | "onnxruntime",
"outputs": [OUTPUT, ...], "runs": [{NAME: {"file": FILE, "dtype": "float32" | "int64",
"shape": [...]}}, ...]}]}: each run feeds the named inputs from raw little-endian row-major
files (the Rust side decodes images, so every runtime sees the same pixels). Each named
output of run j of model i is written to OUT_DIR/m<i>_r<j>_<output>.bin, and OUT_DIR/index.json gets {"openvino": VERSION,
"results": [[{OUTPUT: {"file", "dtype", "shape"}}, ...], ...]}.

One process serves every model and input (each model compiled once). OpenVINO runs in
float32 (the CPU plugin would otherwise pick bf16 or f16 where the CPU has them) on one
thread, as the ONNX Runtime tests do; onnxruntime runs with graph optimizations off and one
thread, as mkonnx runs it. An import failure exits non-zero: the test fails, not skips, when
openvino is missing.
"""

import json
import os
import sys

import numpy as np
import openvino as ov

OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}


def openvino_runner(path: str, outputs: list):
    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", OPENVINO_CONFIG)
    request = compiled.create_infer_request()
    # An output port has several tensor names (the ONNX graph output's among them); look the
    # wanted ones up rather than trusting get_any_name().
    ports = {name: compiled.output(name) for name in outputs}

    def run(feeds):
        out = request.infer(feeds)
        return {name: np.asarray(out[port]) for name, port in ports.items()}

    return run


def onnxruntime_runner(path: str, outputs: list):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda feeds: dict(zip(outputs, session.run(outputs, feeds)))


def main(job_path: str, out_dir: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    results = []
    for i, model in enumerate(job["models"]):
        runtime = model.get("runtime", "openvino")
        run = {"openvino": openvino_runner, "onnxruntime": onnxruntime_runner}[runtime](model["path"], model["outputs"])
        per_run = []
        for j, inputs in enumerate(model["runs"]):
            feeds = {
                name: np.fromfile(spec["file"], dtype=np.dtype(spec["dtype"]).newbyteorder("<")).reshape(spec["shape"])
                for name, spec in inputs.items()
            }
            outputs = {}
            for name, value in run(feeds).items():
                file = os.path.join(out_dir, f"m{i}_r{j}_{name}.bin")
                value = np.ascontiguousarray(value)
                value.astype(value.dtype.newbyteorder("<")).tofile(file)
                outputs[name] = {"file": file, "dtype": str(value.dtype), "shape": list(value.shape)}
            per_run.append(outputs)
        results.append(per_run)
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump({"openvino": ov.__version__, "results": results}, f)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
