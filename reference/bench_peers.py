"""The Python peers that `make bench` measures mkonnx against (one process per measurement).

    python reference/bench_peers.py export RUN_DIR OUT.onnx IMAGE  # torch.onnx.export of the run, traced on IMAGE (whole process is timed)
    python reference/bench_peers.py ort MODEL.onnx DATASET N    # ONNX Runtime ms per image, each of the first N images (1 thread)
    python reference/bench_peers.py eager RUN_DIR DATASET N     # eager torchvision images/s (1 thread)
    python reference/bench_peers.py coco GT.json DT.json        # pycocotools evaluate+accumulate+summarize
Timings are printed as one JSON line.
"""

import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def load_images(dataset, n):
    import numpy as np
    from PIL import Image

    lines = [json.loads(l) for l in open(os.path.join(dataset, "dataset.jsonl")) if l.strip()][:n]
    return [np.asarray(Image.open(os.path.join(dataset, l["image"])).convert("RGB"), dtype=np.float32) / 255.0 for l in lines]


def build_model(run_dir):
    """The run's model as a user's script would load it (the reference world's logic)."""
    import torch
    import yaml
    import common

    cfg = yaml.safe_load(open(os.path.join(run_dir, ".hydra", "config.yaml")))
    ckpt = torch.load(os.path.join(run_dir, "best_model.pth"), map_location="cpu", weights_only=False)
    sd = common.unwrap_state_dict(ckpt)
    model = common.build_model(common.model_spec(cfg), common.num_classes_from_state_dict(sd))
    if common.uses_frozen_bn(sd):
        common.freeze_backbone_bn(model)
    model.load_state_dict(sd)
    return model.eval()


def main():
    cmd = sys.argv[1]
    import torch

    torch.set_num_threads(1)
    if cmd == "export":
        import numpy as np
        from PIL import Image

        model = build_model(sys.argv[2])
        # Traced on a real image, as convert_model.sh did with its sample image (traced on
        # random input, the graph fails on every image of a trained model in ONNX Runtime).
        x = [torch.from_numpy(np.asarray(Image.open(sys.argv[4]).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()]
        # torchvision's documented export: one image, dynamic height and width (no batch axis).
        torch.onnx.export(
            model, (x,), sys.argv[3], opset_version=17, dynamo=False, input_names=["input"],
            output_names=["boxes", "scores", "labels"], dynamic_axes={"input": {1: "height", 2: "width"}},
        )
        print(json.dumps({"ok": True}))
    elif cmd == "ort":
        import numpy as np
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        s = ort.InferenceSession(sys.argv[2], so, providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        rank = len(s.get_inputs()[0].shape)
        imgs = load_images(sys.argv[3], int(sys.argv[4]))
        feed = [{name: (im.transpose(2, 0, 1)[None] if rank == 4 else im.transpose(2, 0, 1)).astype(np.float32)} for im in imgs]
        # torchvision's graph can fail on some images: those get null, the others their best
        # of three runs after a warm-up.
        ms = []
        for f in feed:
            try:
                s.run(None, f)
            except Exception:
                ms.append(None)
                continue
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                s.run(None, f)
                best = min(best, (time.perf_counter() - t) * 1000)
            ms.append(best)
        print(json.dumps({"ms": ms}))
    elif cmd == "eager":
        model = build_model(sys.argv[2])
        imgs = [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in load_images(sys.argv[3], int(sys.argv[4]))]
        with torch.no_grad():
            model([imgs[0]])
            t = time.perf_counter()
            for im in imgs:
                model([im])
        print(json.dumps({"images_per_s": len(imgs) / (time.perf_counter() - t)}))
    elif cmd == "coco":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        import contextlib, io

        with contextlib.redirect_stdout(io.StringIO()):
            g = COCO(sys.argv[2])
            d = g.loadRes(sys.argv[3])
            e = COCOeval(g, d, "bbox")
            e.evaluate()
            e.accumulate()
            e.summarize()
        print(json.dumps({"stats": list(e.stats)}))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
