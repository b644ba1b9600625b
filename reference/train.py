"""A user's `src/train.py`: trains a torchvision FasterRCNN on a dataset.jsonl dataset.

Hydra app: `python reference/train.py model=resnet50_fpn dataset.path=... training.epochs=3`
writes Hydra's default run dir `outputs/YYYY-MM-DD/HH-MM-SS/` (relative to the cwd) with
`.hydra/{config,hydra,overrides}.yaml`, `train.log` and `best_model.pth`.

The model comes from torchvision's own constructor with weights=None and
weights_backbone=None (nothing is downloaded), on CPU. The config's `model:` section names
the constructor (`name`, `arch` or `_target_`, the last one through
`hydra.utils.instantiate`) and carries torchvision keyword overrides.

`training.frozen_bn_from_epoch` switches the backbone's BatchNorm2d to FrozenBatchNorm2d
from that epoch on: the module tree (and state_dict keys) torchvision builds when users
pass a pretrained backbone, which cannot be downloaded here.
`training.init_from` starts from another run's checkpoint, loading every tensor whose name
and shape match (a stand-in for a pretrained backbone).
`training.checkpoint_format` picks how best_model.pth is laid out, as users differ:
`model_state_dict` (dict with epoch, metrics, config and, with
`training.save_optimizer`, the optimizer state), `bare` (the state_dict
itself), `state_dict_module` (under `state_dict`, saved from nn.DataParallel, so every key
starts with `module.`) or `model` (under `model`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

log = logging.getLogger(__name__)


def build_from_config(cfg: DictConfig, spec: common.ModelSpec, num_classes: int):
    if spec.style == "_target_":
        # What a user with `_target_: torchvision.models.detection.fasterrcnn_...` does.
        overrides = {"weights": None, "weights_backbone": None}
        if "num_classes" not in cfg.model:
            overrides["num_classes"] = num_classes
        return hydra.utils.instantiate(cfg.model, **overrides)
    return common.build_model(spec, num_classes)


def load_train_set(path: str):
    records = common.load_dataset(path)
    items = []
    for r in records:
        _, t = common.load_image(r.path)
        boxes = torch.tensor(r.boxes, dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(r.labels, dtype=torch.int64)
        items.append((t, boxes, labels))
    return items


def freeze_backbone_layers(model, trainable: int) -> None:
    """torchvision's `trainable_backbone_layers` rule for a ResNet body (it applies it only
    with pretrained weights): parameters outside the last `trainable` stages stop training.
    Saves the backward pass through the high-resolution stem on CPU."""
    body = model.backbone.body
    if not hasattr(body, "layer1"):
        raise ValueError("training.trainable_backbone_layers applies to ResNet backbones only")
    layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
    if trainable == 5:
        layers.append("bn1")
    for name, p in body.named_parameters():
        if not any(name.startswith(l) for l in layers):
            p.requires_grad_(False)


def make_optimizer(model, tc: DictConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)


def lr_at(step: int, total: int, tc: DictConfig) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (0.02 + 0.98 * step / tc.warmup_steps)
    t = (step - tc.warmup_steps) / max(1, total - tc.warmup_steps)
    return tc.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def init_from(model, path: str) -> None:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    src = common.unwrap_state_dict(ckpt)
    own = model.state_dict()
    take = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(take, strict=False)
    log.info("init_from %s: %d of %d tensors", path, len(take), len(own))


def save_checkpoint(path: str, model, optimizer, epoch: int, metrics: dict, cfg: DictConfig, fmt: str):
    sd = model.state_dict()
    if fmt == "bare":
        obj = sd
    elif fmt == "state_dict_module":
        obj = {"state_dict": torch.nn.DataParallel(model).state_dict(), "epoch": epoch, "metrics": metrics}
    elif fmt == "model":
        obj = {"model": sd, "epoch": epoch, "metrics": metrics, "args": OmegaConf.to_container(cfg, resolve=True)}
    elif fmt == "model_state_dict":
        obj = {"epoch": epoch, "model_state_dict": sd}
        if cfg.training.save_optimizer:
            obj["optimizer_state_dict"] = optimizer.state_dict()
        obj["metrics"] = metrics
        obj["config"] = OmegaConf.to_container(cfg, resolve=True)
    else:
        raise ValueError(f"unknown training.checkpoint_format {fmt!r}")
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    tc = cfg.training
    common.set_threads(tc.num_threads)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    out_dir = HydraConfig.get().runtime.output_dir

    plain = OmegaConf.to_container(cfg, resolve=True)
    spec = common.model_spec(plain)
    num_classes = common.effective_num_classes(spec)
    model = build_from_config(cfg, spec, num_classes)
    if tc.trainable_backbone_layers is not None:
        freeze_backbone_layers(model, tc.trainable_backbone_layers)
    if tc.init_from:
        init_from(model, hydra.utils.to_absolute_path(tc.init_from))
    log.info("model %s (%s style), num_classes=%d, kwargs=%s", spec.arch, spec.style, num_classes, spec.kwargs)

    train = load_train_set(hydra.utils.to_absolute_path(cfg.dataset.path))
    if tc.max_images:
        train = train[: tc.max_images]
    val_records = common.load_dataset(hydra.utils.to_absolute_path(cfg.dataset.val_path)) if cfg.dataset.val_path else None
    names = common.class_names_for(spec, num_classes)
    steps_per_epoch = math.ceil(len(train) / tc.batch_size)
    total = steps_per_epoch * tc.epochs
    log.info("%d training images, %d steps per epoch, %d steps", len(train), steps_per_epoch, total)

    optimizer = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    best = -1.0
    step = 0
    t0 = time.time()
    for epoch in range(1, tc.epochs + 1):
        if tc.frozen_bn_from_epoch is not None and epoch == tc.frozen_bn_from_epoch:
            n = common.freeze_backbone_bn(model)
            # The BN affine parameters became buffers; keep the optimizer state of the rest.
            old = optimizer
            optimizer = make_optimizer(model, tc)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p in old.state:
                        optimizer.state[p] = old.state[p]
            log.info("epoch %d: %d backbone BatchNorm2d -> FrozenBatchNorm2d", epoch, n)
        model.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        loss_sum = 0.0
        for b in range(steps_per_epoch):
            images, targets = [], []
            for i in order[b * tc.batch_size : (b + 1) * tc.batch_size]:
                img, boxes, labels = train[i]
                if tc.hflip and torch.rand((), generator=gen).item() < 0.5:
                    w = img.shape[-1]
                    img = img.flip(-1)
                    boxes = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor([w, 0.0, w, 0.0])
                images.append(img)
                targets.append({"boxes": boxes, "labels": labels})
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, total, tc)
            losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad)
            optimizer.step()
            loss_sum += loss.item()
            step += 1
            if step % tc.log_every == 0:
                parts = " ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
                log.info("epoch %d step %d/%d loss %.3f %s (%.0fs)", epoch, step, total, loss.item(), parts, time.time() - t0)
        metrics = {"train_loss": loss_sum / steps_per_epoch, "epoch": float(epoch)}
        if val_records is not None and epoch >= tc.eval_from_epoch:
            model.eval()
            m, _, _ = common.evaluate_model(model, val_records, names)
            metrics.update({"val_AP": m["AP"], "val_AP50": m["AP50"], "val_AP75": m["AP75"], "val_AR100": m["AR100"]})
        score = metrics.get("val_AP50", -float(metrics["train_loss"]))
        log.info("epoch %d metrics %s (%.0fs)", epoch, {k: round(v, 4) for k, v in metrics.items()}, time.time() - t0)
        if score > best or (val_records is None and epoch == tc.epochs):
            best = score
            save_checkpoint(os.path.join(out_dir, "best_model.pth"), model, optimizer, epoch, metrics, cfg, tc.checkpoint_format)
            log.info("saved best_model.pth (epoch %d)", epoch)
    log.info("done in %.0fs, best %.4f", time.time() - t0, best)
    return best


if __name__ == "__main__":
    main()
