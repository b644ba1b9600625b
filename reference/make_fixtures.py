"""Build the test fixtures of mkonnx: datasets, trained Hydra runs of the four torchvision
FasterRCNN architectures, their eager evaluations and golden outputs.

    .venv/bin/python reference/make_fixtures.py            # build (or find) the fixtures
    .venv/bin/python reference/make_fixtures.py --demo DIR # a demo run + dataset into DIR/run,
                                                           # DIR/triangles_dataset_small

The fixtures live in `${MKONNX_FIXTURES_ROOT:-~/.cache/mkonnx/fixtures}/<hash>/`, where
<hash> covers every reference/**/*.py and *.yaml file (but bench_peers.py) and the
torch/torchvision versions.
They are built in a temp dir next to it, then renamed, `COMPLETE` written last; a second
call finds them and does nothing. Progress goes to stderr; the last (only) stdout line is
the fixtures directory.

Layout (see `runs.json` in it for the per-run facts):
  datasets/triangles_dataset_small/   eval split, 14 images (dataset.jsonl + data/)
  datasets/triangles_train/           training split
  runs/<name>/outputs/<date>/<time>/  a Hydra run: best_model.pth, .hydra/, train.log,
                                      eval_triangles_dataset_small_best_model_pth/
  golden/<name>/<stem>.json           eager outputs + intermediates per eval image
  golden/<name>/batch/<a>_<b>.json    one batched forward of the first two images
  checkpoints/  coco/  ops/           from checkpoint_cases.py / coco_cases.py / ops_cases.py
                                      when present
  runs.json  logs/  COMPLETE
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PY = sys.executable
FORMAT_VERSION = 1
SMALL = "triangles_dataset_small"
TRAIN = "triangles_train"

# One entry per trained run. `after` makes a run start from another run's weights (a
# stand-in for a pretrained backbone), so it runs in the same lane after that one.
# Epoch counts are sized for a 2-core machine; see the report in runs.json for the APs.
RUNS = [
    {
        "name": "mobilenet_v3_large_320_fpn",
        "lane": 0,
        "architecture": "fasterrcnn_mobilenet_v3_large_320_fpn",
        "config_style": "name",
        "class_names_key": "dataset.class_names",
        "checkpoint_format": "model_state_dict",
        "frozen_bn": False,
        "overrides": ["model=mobilenet_v3_large_320_fpn", "training.epochs=2", "training.warmup_steps=20"],
    },
    {
        "name": "mobilenet_v3_large_fpn",
        "lane": 0,
        "after": "mobilenet_v3_large_320_fpn",
        "architecture": "fasterrcnn_mobilenet_v3_large_fpn",
        "config_style": "arch",
        "class_names_key": "model.class_names",
        "checkpoint_format": "bare",
        "frozen_bn": False,
        "overrides": [
            "model=mobilenet_v3_large_fpn",
            "dataset.class_names=null",
            "training.epochs=1",
            "training.warmup_steps=10",
            "training.checkpoint_format=bare",
        ],
    },
    {
        "name": "resnet50_fpn",
        "lane": 1,
        "architecture": "fasterrcnn_resnet50_fpn",
        "config_style": "_target_",
        "class_names_key": "dataset.class_names",
        "checkpoint_format": "state_dict_module",
        "frozen_bn": True,
        "overrides": [
            "model=resnet50_fpn",
            "training.epochs=2",
            "training.max_images=140",
            "training.warmup_steps=15",
            "training.trainable_backbone_layers=3",
            "training.frozen_bn_from_epoch=2",
            "training.checkpoint_format=state_dict_module",
        ],
    },
    {
        "name": "resnet50_fpn_v2",
        "lane": 1,
        "after": "resnet50_fpn",
        "architecture": "fasterrcnn_resnet50_fpn_v2",
        "config_style": "name",
        "class_names_key": "dataset.class_names",
        "checkpoint_format": "model_state_dict",
        "frozen_bn": False,
        "overrides": [
            "model=resnet50_fpn_v2",
            "training.epochs=1",
            "training.max_images=160",
            "training.warmup_steps=8",
            # The body comes trained from resnet50_fpn: fine-tune layer4 and the new parts.
            "training.trainable_backbone_layers=1",
            "training.save_optimizer=false",
        ],
    },
]

# Case generators written by other helpers: script -> output subdirectory.
CASE_SCRIPTS = [("checkpoint_cases.py", "checkpoints"), ("coco_cases.py", "coco"), ("ops_cases.py", "ops")]

T0 = time.time()
_print_lock = threading.Lock()


def progress(msg: str) -> None:
    with _print_lock:
        print(f"[make_fixtures {time.time() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


# Files under reference/ that no fixture depends on.
NOT_FIXTURE_INPUTS = {"bench_peers.py"}


def source_hash() -> str:
    """blake2b of every reference/**/*.py and *.yaml (path and content) plus versions;
    bench_peers.py, which only `make bench` runs, is left out."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"mkonnx-fixtures-v{FORMAT_VERSION}\0".encode())
    files = []
    for pattern in ("**/*.py", "**/*.yaml"):
        files += glob.glob(os.path.join(HERE, pattern), recursive=True)
    for path in sorted(set(files)):
        rel = os.path.relpath(path, HERE)
        if "__pycache__" in rel or rel in NOT_FIXTURE_INPUTS:
            continue
        with open(path, "rb") as f:
            data = f.read()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    for pkg in ("torch", "torchvision", "pycocotools", "hydra-core", "pillow"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            h.update(f"{pkg}={importlib.metadata.version(pkg)}\0".encode())
    return h.hexdigest()


def fixtures_root() -> str:
    root = os.environ.get("MKONNX_FIXTURES_ROOT") or os.path.join(os.path.expanduser("~"), ".cache", "mkonnx", "fixtures")
    return os.path.abspath(root)


def run_logged(cmd: list[str], cwd: str, log_path: str, tag: str) -> None:
    """Run `cmd`, teeing its output to `log_path` and its progress lines to stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log:
        log.write(f"$ (cd {cwd} && {' '.join(cmd)})\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if any(w in line for w in ("metrics", "saved", "done in", "Error", "error", "wrote", "steps per epoch")):
                progress(f"{tag}: {line.rstrip()[-200:]}")
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{tag}: {' '.join(cmd)} exited with {rc}; see {log_path}")


def find_run_dir(build: str, name: str) -> str:
    found = sorted(glob.glob(os.path.join(build, "runs", name, "outputs", "*", "*", "best_model.pth")))
    if len(found) != 1:
        raise RuntimeError(f"{name}: expected one outputs/<date>/<time>/best_model.pth, found {found}")
    return os.path.dirname(found[0])


def build_run(build: str, run: dict, info: dict) -> None:
    name = run["name"]
    cwd = os.path.join(build, "runs", name)
    os.makedirs(cwd, exist_ok=True)
    log = os.path.join(build, "logs", f"{name}.log")
    # Paths relative to the Hydra job's cwd (runs/<name>), so the configs stay valid
    # after the temp build dir is renamed.
    overrides = list(run["overrides"]) + [
        f"dataset.path=../../datasets/{TRAIN}",
        f"dataset.val_path=../../datasets/{SMALL}",
    ]
    if "after" in run:
        base = os.path.relpath(info[run["after"]]["abs_run_dir"], cwd)
        overrides.append(f"training.init_from={base}/best_model.pth")
    t = time.time()
    progress(f"{name}: training ({' '.join(overrides)})")
    run_logged([PY, os.path.join(HERE, "train.py"), *overrides], cwd, log, name)
    train_s = time.time() - t
    run_dir = find_run_dir(build, name)
    progress(f"{name}: trained in {train_s:.0f}s; evaluating")
    # eval.py and golden.py in one process: one torch import instead of two.
    small = os.path.join(build, "datasets", SMALL)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import eval as e, golden as g; "
        "e.main(sys.argv[2:4]); g.main(sys.argv[2:5])"
    )
    run_logged([PY, "-c", code, HERE, run_dir, small, os.path.join(build, "golden", name)], cwd, log, name)
    with open(os.path.join(run_dir, f"eval_{SMALL}_best_model_pth", "pytorch_metrics.json")) as f:
        metrics = json.load(f)
    progress(f"{name}: AP={metrics['AP']:.3f} AP50={metrics['AP50']:.3f} ({time.time() - t:.0f}s)")
    info[name] = {
        "abs_run_dir": run_dir,
        "overrides": overrides,
        "metrics": metrics,
        "train_seconds": round(train_s, 1),
    }


def describe_run(build: str, run: dict, got: dict) -> dict:
    import yaml

    run_dir = got["abs_run_dir"]
    with open(os.path.join(run_dir, ".hydra", "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    model = cfg["model"]
    num_classes_cfg = model.get("num_classes")
    class_names = model.get("class_names") or cfg["dataset"].get("class_names")
    m = got["metrics"]
    return {
        "name": run["name"],
        "run_dir": os.path.relpath(run_dir, build),
        "checkpoint": os.path.relpath(os.path.join(run_dir, "best_model.pth"), build),
        "architecture": run["architecture"],
        "config_style": run["config_style"],
        "class_names_key": run["class_names_key"],
        "class_names": class_names,
        "num_classes": num_classes_cfg if num_classes_cfg is not None else len(class_names) + 1,
        "num_classes_in_config": num_classes_cfg is not None,
        "checkpoint_format": run["checkpoint_format"],
        "frozen_bn": run["frozen_bn"],
        "init_from": run.get("after"),
        "overrides": got["overrides"],
        "model_config": model,
        "eval_dir": os.path.relpath(os.path.join(run_dir, f"eval_{SMALL}_best_model_pth"), build),
        "golden_dir": f"golden/{run['name']}",
        "AP": m["AP"],
        "AP50": m["AP50"],
        "AP75": m["AP75"],
        "AR100": m["AR100"],
        "train_seconds": got["train_seconds"],
    }


def build_all(build: str, digest: str) -> None:
    sys.path.insert(0, HERE)
    import dataset

    for sub in ("datasets", "runs", "golden", "logs"):
        os.makedirs(os.path.join(build, sub), exist_ok=True)
    n_small = dataset.write_small(os.path.join(build, "datasets", SMALL))
    n_train = dataset.write_train(os.path.join(build, "datasets", TRAIN))
    progress(f"datasets: {SMALL} ({n_small} images), {TRAIN} ({n_train} images)")

    info: dict = {}
    errors: list[str] = []

    def train_job(run: dict):
        return run["name"], lambda: build_run(build, run, info)

    def cases_job(script: str, sub: str):
        path = os.path.join(HERE, script)
        log = os.path.join(build, "logs", f"{sub}.log")

        def job():
            progress(f"{script} -> {sub}/")
            run_logged([PY, path, os.path.join(build, sub)], REPO, log, script)

        return script, job

    # Each lane runs its chain of trainings, then takes independent jobs (other helpers'
    # case generators) from a shared queue, so whichever lane finishes first does them.
    chains: list[list] = [[], []]
    for run in RUNS:
        chains[run["lane"]].append(train_job(run))
    shared = [cases_job(script, sub) for script, sub in CASE_SCRIPTS if os.path.exists(os.path.join(HERE, script))]
    queue_lock = threading.Lock()

    def next_shared():
        with queue_lock:
            return shared.pop(0) if shared and not errors else None

    def lane(chain: list) -> None:
        jobs = iter(chain)
        while True:
            item = next(jobs, None) or next_shared()
            if item is None:
                return
            name, job = item
            try:
                job()
            except Exception as e:  # noqa: BLE001 - reported after both lanes finish
                errors.append(f"{name}: {e}")
                progress(f"FAILED {name}: {e}")
                return

    threads = [threading.Thread(target=lane, args=(chain,)) for chain in chains]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))

    doc = {
        "format_version": FORMAT_VERSION,
        "hash": digest,
        "class_names": dataset.CLASS_NAMES,
        "datasets": {"eval": f"datasets/{SMALL}", "train": f"datasets/{TRAIN}"},
        "runs": [describe_run(build, r, info[r["name"]]) for r in RUNS],
        "build_seconds": round(time.time() - T0, 1),
    }
    with open(os.path.join(build, "runs.json"), "w") as f:
        json.dump(doc, f, indent=2)


def build_once(name: str, digest: str, what: str, build_fn) -> str:
    """`<root>/<name>/`, made by `build_fn(build_dir)` once: one builder per name (a second
    caller waits on the lock, then finds the result), built in a temp dir that is renamed into
    place with `COMPLETE` written last, so a half-built directory is never taken for done."""
    root = fixtures_root()
    final = os.path.join(root, name)
    if os.path.exists(os.path.join(final, "COMPLETE")):
        return final
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(final, "COMPLETE")):
            return final
        shutil.rmtree(final, ignore_errors=True)  # incomplete (an older layout): never trust it
        build = os.path.join(root, f"{name}.tmp-{os.getpid()}")
        shutil.rmtree(build, ignore_errors=True)
        progress(f"building {what} in {build}")
        try:
            build_fn(build)
            with open(os.path.join(build, "COMPLETE"), "w") as f:
                f.write(f"{digest}\n")
            os.rename(build, final)
        except BaseException:
            progress(f"build failed; partial output kept in {build} for inspection")
            raise
        progress(f"done in {time.time() - T0:.0f}s")
    return final


def ensure_fixtures() -> str:
    digest = source_hash()
    return build_once(digest, digest, "fixtures", lambda build: build_all(build, digest))


DEMO_RUN = "mobilenet_v3_large_320_fpn"


def build_demo_only(build: str) -> None:
    """The datasets and the demo run alone (same seeds, so the same weights as the full
    fixtures' run): what `make demo` needs on a machine without fixtures yet."""
    sys.path.insert(0, HERE)
    import dataset

    for sub in ("datasets", "runs", "golden", "logs"):
        os.makedirs(os.path.join(build, sub), exist_ok=True)
    dataset.write_small(os.path.join(build, "datasets", SMALL))
    dataset.write_train(os.path.join(build, "datasets", TRAIN))
    run = next(r for r in RUNS if r["name"] == DEMO_RUN)
    info: dict = {}
    build_run(build, run, info)
    with open(os.path.join(build, "runs.json"), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "runs": [describe_run(build, run, info[DEMO_RUN])]}, f, indent=2)


def demo_source() -> str:
    """A directory holding runs.json with the demo run: the full fixtures when they are
    built, else `<root>/<hash>-demo/`, built (atomically, once) with just that run."""
    digest = source_hash()
    full = os.path.join(fixtures_root(), digest)
    if os.path.exists(os.path.join(full, "COMPLETE")):
        return full
    return build_once(f"{digest}-demo", digest, "the demo run alone (no fixtures yet)", build_demo_only)


def make_demo(dest: str) -> str:
    """Copy the mobilenet_v3_large_320_fpn run (with its user-side eval) to `dest/run/` and
    the eval dataset to `dest/triangles_dataset_small/`. Returns the run dir."""
    src = demo_source()
    with open(os.path.join(src, "runs.json")) as f:
        run = next(r for r in json.load(f)["runs"] if r["name"] == DEMO_RUN)
    dst_run = os.path.join(dest, "run")
    dst_data = os.path.join(dest, SMALL)
    for path in (dst_run, dst_data):
        if os.path.exists(path):
            shutil.rmtree(path)
    shutil.copytree(os.path.join(src, run["run_dir"]), dst_run)
    shutil.copytree(os.path.join(src, "datasets", SMALL), dst_data)
    progress(f"demo run: {dst_run} (a copy of {run['run_dir']})")
    progress(f"demo dataset: {dst_data}")
    progress(f"try: mkonnx build {dst_run} --dataset-dir {dst_data} --evaluate-converted-model")
    return dst_run


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Build mkonnx's reference fixtures")
    ap.add_argument("--demo", metavar="DIR", help="write a demo run and dataset into DIR/run and DIR/triangles_dataset_small")
    ap.add_argument("--print-hash", action="store_true", help="print the source hash and exit")
    args = ap.parse_args(argv)
    if args.print_hash:
        print(source_hash())
        return 0
    if args.demo:
        # The demo does not wait for the full fixtures: it reuses them when built, else
        # trains its one run alone (a few minutes).
        print(make_demo(os.path.abspath(args.demo)))
        return 0
    print(ensure_fixtures())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
