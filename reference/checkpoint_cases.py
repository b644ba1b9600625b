"""Write real `torch.save` files plus `expected.json` for the Rust checkpoint reader's tests.

Usage: python reference/checkpoint_cases.py <out_dir>

Every case is a file that torch itself wrote (or a deliberately damaged copy of one), and
`expected.json` records what `torch.load` returns for it after the unwrapping rules of
DESIGN.md section 1 (wrapper key `model_state_dict` / `state_dict` / `model`, `module.` /
`model.` prefix stripped when every tensor key carries it), or which error kind the reader
must report. Tensors are small except in the one real torchvision FasterRCNN case, whose
tensors are summarized by sum, absolute sum and first values.
"""

import argparse
import collections
import io
import json
import os
import sys
import zipfile

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
PREFIXES = ("module.", "model.")
# Tensors with more elements than this are summarized instead of listed in full.
FULL_VALUES_MAX = 64
FIRST_VALUES = 8


class SmallNet(torch.nn.Module):
    """A conv/bn/linear stack: its state dict has float weights, BN buffers and an int64 counter."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 3)


def small_state_dict(seed=0):
    torch.manual_seed(seed)
    net = SmallNet()
    # Non-default buffers so that a reader mixing up entries shows in the values.
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    net.bn.num_batches_tracked.fill_(17)
    return net, net.state_dict()


def save(obj, path, **kwargs):
    torch.save(obj, path, **kwargs)


def rewrite_zip(src, dst, transform, compression=zipfile.ZIP_STORED):
    """Copy zip `src` to `dst`, passing each (name, bytes) through `transform`.

    `transform` returns the new bytes, or None to drop the entry.
    """
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compression) as zout:
        for name in zin.namelist():
            data = transform(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)


def is_state_dict(obj):
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
    )


def unwrap(obj):
    """DESIGN.md section 1: find the state dict, return (wrapper, state_dict) or None."""
    if not isinstance(obj, dict):
        return None
    for key in WRAPPER_KEYS:
        if key in obj and is_state_dict(obj[key]):
            return key, obj[key]
    if is_state_dict(obj):
        return None, obj
    return None


def strip_prefixes(keys):
    stripped = ""
    keys = list(keys)
    changed = True
    while changed and keys:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) and len(k) > len(prefix) for k in keys):
                keys = [k[len(prefix):] for k in keys]
                stripped += prefix
                changed = True
                break
    return (stripped or None), keys


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def describe_tensor(key, t):
    t = t.detach()
    entry = {
        "key": key,
        "dtype": dtype_name(t.dtype),
        "shape": list(t.shape),
        "numel": t.numel(),
    }
    values = t.to(torch.float64).reshape(-1)
    if t.numel() <= FULL_VALUES_MAX:
        entry["values"] = values.tolist()
    else:
        entry["sum"] = values.sum().item()
        entry["abs_sum"] = values.abs().sum().item()
        entry["first"] = values[:FIRST_VALUES].tolist()
    return entry


def plain(value):
    """JSON form of the plain scalars the reader decodes (ints, floats, str, bool, numpy scalars)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and -(2**63) <= int(value) < 2**63:
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return value
    return None


def expect_ok(path, extra=None):
    """Load `path` with torch.load and describe what the reader must return."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    found = unwrap(obj)
    if found is None:
        raise SystemExit(f"{path}: no state dict in a case meant to load")
    wrapper, sd = found
    tensor_keys = [k for k, v in sd.items() if isinstance(v, torch.Tensor)]
    skipped = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    prefix, new_keys = strip_prefixes(tensor_keys)
    tensors = [describe_tensor(nk, sd[k]) for k, nk in zip(tensor_keys, new_keys)]
    others = [k for k in obj if k != wrapper] if wrapper is not None else []
    scalars = {}
    objects = {}
    bigints = {}
    blobs = {}
    nones = []
    if wrapper is not None:
        for k in others:
            v = obj[k]
            p = plain(v)
            if p is not None:
                scalars[k] = p
            elif isinstance(v, argparse.Namespace):
                objects[k] = "argparse.Namespace"
            elif isinstance(v, torch.device):
                objects[k] = "torch.device"
            elif isinstance(v, int):
                bigints[k] = str(v)
            elif isinstance(v, bytes):
                blobs[k] = list(v)
            elif v is None:
                nones.append(k)
    case = {
        "expect": "ok",
        "wrapper": wrapper,
        "stripped_prefix": prefix,
        "other_top_level_keys": others,
        "skipped_keys": skipped,
        "tensors": tensors,
        "scalars": scalars,
        "objects": objects,
        "bigints": bigints,
        "bytes": blobs,
        "nones": nones,
    }
    case.update(extra or {})
    return case


def expect_err(kind, contains=()):
    return {"expect": kind, "error_contains": list(contains)}


def byteswap_storages(name, data, itemsizes):
    if name.endswith("/byteorder"):
        return b"big"
    parts = name.split("/")
    if len(parts) == 3 and parts[1] == "data" and parts[2] in itemsizes:
        itemsize = itemsizes[parts[2]]
        if itemsize > 1:
            return np.frombuffer(data, dtype=f"<u{itemsize}").astype(f">u{itemsize}").tobytes()
    return data


def dtype_tensors():
    return collections.OrderedDict(
        f32=torch.tensor([1.5, -2.25, 3.0e-3, 1.0e6], dtype=torch.float32),
        f16=torch.tensor([0.5, -1.0, 65504.0, 6.1035e-05], dtype=torch.float16),
        bf16=torch.tensor([[1.0, -3.5], [1.0e30, 0.0078125]], dtype=torch.bfloat16),
        f64=torch.tensor([1.0 / 3.0, -1.0e-300, 2.0**60], dtype=torch.float64),
        i64=torch.tensor([-(2**40), 0, 7], dtype=torch.int64),
        i32=torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
        i16=torch.tensor([-300, 300], dtype=torch.int16),
        i8=torch.tensor([-128, 127], dtype=torch.int8),
        u8=torch.tensor([0, 200, 255], dtype=torch.uint8),
        # uint16 has no legacy Storage class: torch writes it with _rebuild_tensor_v3.
        u16=torch.tensor([1, 65535], dtype=torch.uint16),
        boolean=torch.tensor([True, False, True]),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
    )


def main():
    if len(sys.argv) != 2:
        raise SystemExit("usage: checkpoint_cases.py <out_dir>")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    cases = {}

    def p(name):
        return os.path.join(out, name)

    net, sd = small_state_dict()

    save(sd, p("bare_state_dict.pth"))
    cases["bare_state_dict.pth"] = expect_ok(p("bare_state_dict.pth"))

    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    loss = net.head(net.bn(net.conv(torch.randn(2, 3, 3, 3))).flatten(1)).sum()
    loss.backward()
    opt.step()
    sd_after = net.state_dict()
    wrapped = {
        "epoch": 7,
        "model_state_dict": sd_after,
        "optimizer_state_dict": opt.state_dict(),
        "metrics": {"mAP": 0.5, "history": [0.1, 0.3, 0.5]},
        "args": argparse.Namespace(lr=0.1, batch_size=4, name="run"),
        "best_map": np.float64(0.4375),
        "step": np.int64(1200),
        "np_f32": np.float32(1.5),
        "name": "run1",
        "flag": True,
        "device": torch.device("cpu"),
        "classes": ("background", "triangle"),
        "blob": b"\x00\x01\xff",
        "big": 2**80,
        "tags": {"a", "b"},
        "nothing": None,
    }
    save(wrapped, p("wrapped_model_state_dict.pth"))
    cases["wrapped_model_state_dict.pth"] = expect_ok(p("wrapped_model_state_dict.pth"))

    save({"state_dict": sd, "epoch": 1, "hyper_parameters": {"lr": 0.01}},
         p("wrapped_state_dict.pth"))
    cases["wrapped_state_dict.pth"] = expect_ok(p("wrapped_state_dict.pth"))

    save({"model": sd, "optimizer": opt.state_dict(), "epoch": 2}, p("wrapped_model.pth"))
    cases["wrapped_model.pth"] = expect_ok(p("wrapped_model.pth"))

    # A whole module saved under "model" is not a state dict: the reader must say so.
    save({"model": net, "epoch": 2}, p("whole_module.pth"))
    cases["whole_module.pth"] = expect_err(
        "no_state_dict", ["SmallNet object", "model.state_dict()"])

    dp = torch.nn.DataParallel(net)
    save(dp.state_dict(), p("prefix_module.pth"))
    cases["prefix_module.pth"] = expect_ok(p("prefix_module.pth"))

    lightning = collections.OrderedDict(("model." + k, v) for k, v in sd.items())
    save({"state_dict": lightning, "epoch": 4, "global_step": 40}, p("prefix_model.pth"))
    cases["prefix_model.pth"] = expect_ok(p("prefix_model.pth"))

    both = collections.OrderedDict(("module.model." + k, v) for k, v in sd.items())
    save({"model_state_dict": both}, p("prefix_module_model.pth"))
    cases["prefix_module_model.pth"] = expect_ok(p("prefix_module_model.pth"))

    mixed = collections.OrderedDict(sd)
    mixed["module.extra"] = torch.ones(2)
    save(mixed, p("prefix_mixed.pth"))
    cases["prefix_mixed.pth"] = expect_ok(p("prefix_mixed.pth"))

    dtypes = dtype_tensors()
    save(dtypes, p("dtypes.pth"))
    cases["dtypes.pth"] = expect_ok(p("dtypes.pth"))

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    views = collections.OrderedDict()
    views["base"] = base
    views["transposed"] = base.t()
    views["slice_rows"] = base[1:3]
    views["slice_cols"] = base[:, 2:5]
    views["step_cols"] = base[1:, ::2]
    views["flat_window"] = base.view(-1)[5:9]
    views["element"] = base[2, 3]
    views["tied"] = base
    views["expanded"] = torch.tensor([1.0, 2.0, 3.0]).expand(2, 3)
    views["permuted"] = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4).permute(2, 0, 1)
    views["half_t"] = torch.arange(6, dtype=torch.float16).reshape(2, 3).t()
    save(views, p("views.pth"))
    cases["views.pth"] = expect_ok(p("views.pth"))

    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    param_state = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    param_state.note = "extra attribute"
    tensor_attr = torch.tensor([5.0, 6.0])
    tensor_attr.note = "extra attribute"
    save({"param": param, "param_with_state": param_state, "tensor_with_attr": tensor_attr},
         p("params.pth"))
    cases["params.pth"] = expect_ok(p("params.pth"))

    save({"model_state_dict": sd, "epoch": 5}, p("protocol4.pth"), pickle_protocol=4)
    cases["protocol4.pth"] = expect_ok(p("protocol4.pth"))

    buf = io.BytesIO()
    torch.save(sd, buf)
    with open(p("renamed_archive.pth"), "wb") as f:
        f.write(buf.getvalue())
    cases["renamed_archive.pth"] = expect_ok(p("renamed_archive.pth"))

    rewrite_zip(p("bare_state_dict.pth"), p("deflated.pth"), lambda n, d: d,
                compression=zipfile.ZIP_DEFLATED)
    cases["deflated.pth"] = expect_ok(p("deflated.pth"))

    # Byte-swapped storages plus a "big" byteorder record: what a big-endian machine writes.
    # Each tensor owns one storage, numbered in dict order. uint16 is left out: torch stores
    # it as an untyped byte storage and so does not swap it back on load.
    swapped = collections.OrderedDict((k, v) for k, v in dtypes.items() if k != "u16")
    save(swapped, p("little_endian_source.pth"))
    sizes = {str(i): t.element_size() for i, t in enumerate(swapped.values())}
    rewrite_zip(p("little_endian_source.pth"), p("big_endian.pth"),
                lambda n, d: byteswap_storages(n, d, sizes))
    os.remove(p("little_endian_source.pth"))
    cases["big_endian.pth"] = expect_ok(p("big_endian.pth"))

    # A checkpoint saved from GPU tensors names "cuda:0" as the location; load maps it to CPU.
    def to_cuda_location(name, data):
        if name.endswith("data.pkl"):
            return data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
        return data

    rewrite_zip(p("bare_state_dict.pth"), p("cuda_location.pth"), to_cuda_location)
    cases["cuda_location.pth"] = expect_ok(p("cuda_location.pth"))

    # --- errors ---
    save(sd, p("legacy.pth"), _use_new_zipfile_serialization=False)
    cases["legacy.pth"] = expect_err("legacy_format", ["_use_new_zipfile_serialization=True"])

    with open(p("bare_state_dict.pth"), "rb") as f:
        whole = f.read()
    with open(p("truncated.pth"), "wb") as f:
        f.write(whole[: len(whole) // 2])
    cases["truncated.pth"] = expect_err("corrupt_zip")

    rng = np.random.default_rng(1234)
    with open(p("random_bytes.pth"), "wb") as f:
        f.write(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    cases["random_bytes.pth"] = expect_err("not_zip")

    save({"epoch": 1, "lr": 0.1, "model": {"name": "fasterrcnn"}}, p("no_tensors.pth"))
    cases["no_tensors.pth"] = expect_err("no_state_dict", ["epoch", "lr", "model"])

    save([torch.ones(2), torch.zeros(2)], p("top_level_list.pth"))
    cases["top_level_list.pth"] = expect_err("no_state_dict", ["list"])

    rewrite_zip(p("bare_state_dict.pth"), p("missing_storage.pth"),
                lambda n, d: None if n.endswith("/data/1") else d)
    cases["missing_storage.pth"] = expect_err("missing_storage", ["data/1"])

    rewrite_zip(p("bare_state_dict.pth"), p("storage_too_small.pth"),
                lambda n, d: d[: len(d) // 2] if n.endswith("/data/0") else d)
    cases["storage_too_small.pth"] = expect_err("storage_too_small", ["conv.weight"])

    rewrite_zip(p("bare_state_dict.pth"), p("missing_data_pkl.pth"),
                lambda n, d: None if n.endswith("data.pkl") else d)
    cases["missing_data_pkl.pth"] = expect_err("missing_data_pkl")

    # EXT1 (copyreg extension registry) is an opcode a checkpoint never needs.
    bad_pickle = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01\x82\x01s."
    rewrite_zip(p("bare_state_dict.pth"), p("bad_opcode.pth"),
                lambda n, d: bad_pickle if n.endswith("data.pkl") else d)
    cases["bad_opcode.pth"] = expect_err("unsupported_opcode", ["EXT1"])

    save({"dense": torch.ones(2), "sparse": torch.eye(3).to_sparse()}, p("sparse.pth"))
    cases["sparse.pth"] = expect_err("unsupported_global", ["_rebuild_sparse_tensor", "sparse"])

    cases["does_not_exist.pth"] = expect_err("not_found")

    # --- a real torchvision FasterRCNN state dict ---
    import torchvision

    torch.manual_seed(0)
    frcnn = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3)
    save({"model_state_dict": frcnn.state_dict(), "epoch": 3, "best_map": 0.25},
         p("fasterrcnn_mobilenet_v3_large_320_fpn.pth"))
    cases["fasterrcnn_mobilenet_v3_large_320_fpn.pth"] = expect_ok(
        p("fasterrcnn_mobilenet_v3_large_320_fpn.pth"))

    with open(p("expected.json"), "w") as f:
        json.dump({"format": 1, "cases": cases}, f, indent=1)
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
