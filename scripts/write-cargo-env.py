"""Writes .cargo/config.toml so that plain `cargo build/test` finds libtorch and ONNX Runtime
in the project's Python environment (run by `make setup` with .venv/bin/python)."""
import glob
import os
import sys

import onnxruntime
import torch

torch_dir = os.path.dirname(torch.__file__)
capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
ort = sorted(glob.glob(os.path.join(capi, "libonnxruntime.so*")))
if not ort:
    sys.exit(f"no libonnxruntime.so in {capi}")
os.makedirs(".cargo", exist_ok=True)
with open(".cargo/config.toml.tmp", "w") as f:
    f.write("# Written by `make setup`: where libtorch and ONNX Runtime are. Not committed.\n")
    f.write("[env]\n")
    f.write(f'LIBTORCH = "{torch_dir}"\n')
    f.write(f'ORT_DYLIB_PATH = "{ort[-1]}"\n')
os.replace(".cargo/config.toml.tmp", ".cargo/config.toml")
