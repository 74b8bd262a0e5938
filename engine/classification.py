"""train_classifier.py's task on the shared loop (engine/loop.py): a timm classifier with the
project's token mixers (models/classifier.py), trained with DeiT's recipe from timm's pieces
(AdamW without decay on norms and biases, cosine schedule with warm-up, label smoothing,
Mixup/CutMix, RandAugment, random erasing, optional EMA) and scored by top-1/top-5 accuracy.

Exact resume: each training image's augmentation draws from RNGs seeded by (seed, epoch,
index), Mixup/CutMix from the global RNGs the loop reseeds every step, and the learning rate is
a function of the step; so a resumed run repeats the same steps."""

import json
import math
import os
import pickle
import random
from dataclasses import asdict, dataclass, replace

import numpy as np
import timm.data
import torch
from PIL import Image
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from common import atomic_write, one_line
from data import ImageFolderDataset, SyntheticShapes, SyntheticSpec, synthetic_spec
from data.images import read_rgb
from models.classifier import (
    CLASSIFIER_ATTENTIONS,
    create_classifier,
    family_of,
)

from . import dist
from .checkpoint import stored_config
from .ema import create_ema
from .errors import UsageError
from .loop import TrainingLoop
from .step import TrainStep
from .train_config import RunConfig, check_rules

SYNTHETIC_VALIDATION = 2000  # held-out renders (seed 1) scoring a run on the built-in shapes


@dataclass(frozen=True)
class ClassifierConfig(RunConfig):
    """A classification run as train_classifier.py's flags describe it (defaults: DeiT's recipe
    for a batch of 1024, but the steps)."""

    model: str = "deit_tiny_patch16_224"
    attention: str = "native"
    contrast_grid: int = 7
    stage2_softmax: str = "separate"
    dwc: bool = True
    image_size: int = 224
    patch_size: int | None = None  # None: the timm model's
    num_classes: int | None = None  # None: the dataset's
    pretrained: str | None = None  # "hub" or a timm state dict file
    val_path: str | None = None  # None: held-out renders for synthetic data, else no evaluation
    epochs: int = 300
    global_batch_size: int = 1024
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.05
    ema_decay: float = 0.0  # 0: no EMA (evaluated weights are the model's)
    label_smoothing: float = 0.1
    crop_scale: float = 0.08  # RandomResizedCrop's smallest area fraction
    mixup: float = 0.8
    cutmix: float = 1.0
    randaugment: str | None = "rand-m9-mstd0.5-inc1-mmax9"
    reprob: float = 0.25
    drop_path: float = 0.1
    eval_every: int = 0  # 0: at the end only
    eval_batch_size: int = 256

    def __post_init__(self):
        finite = math.isfinite
        check_rules(
            self,
            [
                *self.run_rules(),
                ("--image-size", self.image_size > 0, "positive"),
                ("--patch-size", self.patch_size is None or self.patch_size > 0, "positive"),
                ("--num-classes", self.num_classes is None or self.num_classes > 1, "2 or more"),
                ("--contrast-grid", self.contrast_grid > 0, "positive"),
                ("--min-lr", finite(self.min_lr) and 0 <= self.min_lr <= self.lr, "in [0, --lr]"),
                ("--warmup-steps", self.warmup_steps >= 0, "0 or more"),
                ("--label-smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
                ("--crop-scale", 0 < self.crop_scale <= 1, "in (0, 1]"),
                ("--mixup", finite(self.mixup) and self.mixup >= 0, "0 (off) or more"),
                ("--cutmix", finite(self.cutmix) and self.cutmix >= 0, "0 (off) or more"),
                ("--reprob", 0 <= self.reprob <= 1, "in [0, 1]"),
                ("--drop-path", 0 <= self.drop_path < 1, "in [0, 1)"),
                ("--eval-every", self.eval_every >= 0, "0 (at the end) or more"),
                ("--eval-batch-size", self.eval_batch_size > 0, "positive"),
            ],
        )
        if self.attention not in CLASSIFIER_ATTENTIONS:
            raise UsageError(f"--attention must be one of {', '.join(CLASSIFIER_ATTENTIONS)}")
        try:
            family_of(self.model)
        except ValueError as err:
            raise UsageError(f"--model: {err}") from None
        if (self.mixup or self.cutmix) and self.global_batch_size % 2:
            raise UsageError("Mixup/CutMix pair the images of a batch: use an even batch size")

    def model_dict(self, num_classes: int) -> dict:
        """What fixes the network: compared when resuming."""
        keys = (
            "model",
            "attention",
            "contrast_grid",
            "stage2_softmax",
            "dwc",
            "image_size",
            "patch_size",
            "drop_path",
        )
        return {**{key: getattr(self, key) for key in keys}, "num_classes": num_classes}


def build_network(config: ClassifierConfig, num_classes: int, report_to=None) -> torch.nn.Module:
    """The timm classifier of `config` with its token mixer: freshly initialised, or from
    --pretrained (timm's loader; `report_to` gets the line naming the new and unused keys)."""
    options = {"drop_path_rate": config.drop_path}
    if config.patch_size:
        options["patch_size"] = config.patch_size
    pretrained = {None: False, "hub": True}.get(config.pretrained, config.pretrained)
    try:
        return create_classifier(
            config.model,
            config.attention,
            num_classes=num_classes,
            img_size=config.image_size,
            pretrained=pretrained,
            report_to=report_to,
            contrast_grid=config.contrast_grid,
            stage2_softmax=config.stage2_softmax,
            dwc=config.dwc,
            **options,
        )
    except (ValueError, TypeError, AssertionError) as err:
        raise UsageError(f"cannot build {config.model} with these settings: {err}") from None
    except (RuntimeError, OSError, pickle.UnpicklingError) as err:
        raise UsageError(f"cannot load --pretrained {config.pretrained}: {one_line(err)}") from None


def check_network(config: ClassifierConfig, num_classes: int) -> None:
    """Build the network on the meta device (no memory, no weights, no random draws) and pass
    one image through it, so that settings timm cannot honour (an image size the patches or
    stages do not divide) fail before the run folder exists."""
    with torch.device("meta"):
        network = build_network(replace(config, pretrained=None), num_classes).eval()
        image = torch.zeros(1, 3, config.image_size, config.image_size)
    if family_of(config.model) == "vit":  # timm would silently drop the pixels left over
        patch = network.patch_embed.patch_size[0]
        if config.image_size % patch:
            raise UsageError(
                f"{config.model} cannot take {config.image_size} px images: not a multiple of "
                f"its {patch} px patches"
            )
    try:
        with torch.no_grad():
            network(image)
    except (RuntimeError, ValueError, AssertionError) as err:
        raise UsageError(
            f"{config.model} cannot take {config.image_size} px images with these settings: "
            f"{one_line(err)}"
        ) from None


class AugmentedImages(torch.utils.data.Dataset):
    """(PIL image, label) pairs through a torchvision/timm transform. With `seed`, item i of
    epoch e draws its augmentation from RNGs seeded by (seed, e, i) and restores the callers'
    RNGs afterwards."""

    def __init__(self, images, transform, seed: int | None = None):
        self.images, self.transform, self.seed = images, transform, seed
        self.epoch = 0
        self.num_classes = images.num_classes

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        image, label = self.images.pil(index)
        if self.seed is None:
            return self.transform(image), label
        key = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        states = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(int(key))
            np.random.seed(int(key))
            torch.manual_seed(int(key))
            out = self.transform(image)
        random.setstate(states[0])
        np.random.set_state(states[1])
        return out, label


class SyntheticPIL:
    """The built-in shapes as PIL images (classes: shape x colour, or shape, see data.synthetic)."""

    def __init__(self, image_size: int, num_classes: int, spec: SyntheticSpec, seed: int):
        self.shapes = SyntheticShapes(image_size, num_classes, spec.length, seed, spec.shape_only)
        self.num_classes = num_classes

    @property
    def shape_only(self) -> bool:
        return self.shapes.shape_only

    def __len__(self) -> int:
        return len(self.shapes)

    def pil(self, index: int):
        label = index % self.num_classes
        return Image.fromarray(self.shapes.render(index, label)), label


class FolderPIL:
    """An ImageFolder's files (data.ImageFolderDataset's listing and errors) as PIL images."""

    def __init__(self, root: str):
        self.folder = ImageFolderDataset(root, image_size=1)
        self.num_classes = self.folder.num_classes

    def __len__(self) -> int:
        return len(self.folder)

    def pil(self, index: int):
        path, label = self.folder.samples[index]
        return read_rgb(path), label


def image_source(path: str, image_size: int, num_classes: int | None, seed: int):
    """ "synthetic[:N]" or "synthetic-shape[:N]" (N renders drawn with `seed`) or an ImageFolder
    root, as (PIL image, label) items."""
    spec = synthetic_spec(path)
    if spec is not None:
        return SyntheticPIL(image_size, num_classes or 10, spec, seed)
    source = FolderPIL(path)
    if num_classes is not None and source.num_classes > num_classes:
        raise UsageError(
            f"{path} has {source.num_classes} class folders but --num-classes is {num_classes}"
        )
    return source


def train_transform(config: ClassifierConfig):
    """timm's training transform with the run's recipe: random resized crop, flip, RandAugment,
    normalisation, random erasing."""
    return timm.data.create_transform(
        config.image_size,
        is_training=True,
        scale=(config.crop_scale, 1.0),
        auto_augment=config.randaugment,
        re_prob=config.reprob,
        interpolation="bicubic",
    )


class ClassificationObjective:
    """The loss on the TrainStep's interface: Mixup/CutMix (timm) with soft-target cross
    entropy, or label-smoothed cross entropy without them."""

    def __init__(self, config: ClassifierConfig, num_classes: int):
        self.mixup = None
        if config.mixup or config.cutmix:
            self.mixup = timm.data.Mixup(
                mixup_alpha=config.mixup,
                cutmix_alpha=config.cutmix,
                label_smoothing=config.label_smoothing,
                num_classes=num_classes,
            )
            self.loss = SoftTargetCrossEntropy()
        else:
            self.loss = LabelSmoothingCrossEntropy(config.label_smoothing)

    def training_losses(self, network, images, model_kwargs):
        labels = model_kwargs["y"]
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        return {"loss": self.loss(network(images), labels)}


@torch.no_grad()
def evaluate_classifier(
    model, dataset, batch_size: int, device, rank=0, world_size=1, progress=False
):
    """Top-1 and top-5 accuracy over `dataset`, each rank scoring every world_size-th item."""
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size)
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5, images
    for images, labels in tqdm(loader, desc="evaluate", disable=not progress):
        logits = model(images.to(device)).float()
        labels = labels.to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), labels.new_tensor(len(labels))])
    if world_size > 1:
        torch.distributed.all_reduce(counts)
    top1, top5, total = counts.tolist()
    return {"top1": top1 / total, "top5": top5 / total, "num_samples": int(total)}


class ClassifierTrainer(TrainingLoop):
    """A classification run of train_classifier.py, on every rank: build, resume, `run()`."""

    def check_inputs(self):
        pretrained = self.config.pretrained
        if pretrained and pretrained != "hub" and not os.path.isfile(pretrained):
            raise UsageError(f"--pretrained {pretrained}: no such file (or use 'hub')")

    def build_data(self):
        config = self.config
        source = image_source(config.data_path, config.image_size, config.num_classes, 0)
        self.num_classes = config.num_classes or source.num_classes
        if (config.mixup or config.cutmix) and self.local_batch % 2:
            raise UsageError(
                f"Mixup/CutMix pair images: the batch per process ({self.local_batch}) must be even"
            )
        self.network_dict = config.model_dict(self.num_classes)
        check_network(config, self.num_classes)
        val = None
        if config.val_path:
            val = image_source(config.val_path, config.image_size, self.num_classes, 1)
        elif isinstance(source, SyntheticPIL):
            spec = SyntheticSpec(SYNTHETIC_VALIDATION, source.shape_only)
            val = SyntheticPIL(config.image_size, self.num_classes, spec, 1)
        synthetic = isinstance(source, SyntheticPIL) and isinstance(val, SyntheticPIL)
        if synthetic and val.shape_only != source.shape_only:
            raise UsageError(
                f"--data-path {config.data_path} and --val-path {config.val_path} label the "
                "shapes differently (synthetic: shape x colour, synthetic-shape: shape)"
            )
        eval_transform = timm.data.create_transform(config.image_size, interpolation="bicubic")
        self.validation = None if val is None else AugmentedImages(val, eval_transform)
        return AugmentedImages(source, train_transform(config), seed=config.global_seed)

    def check_resumable(self, path, state):
        saved = stored_config(state)["model"]
        mismatched = [
            (k, saved.get(k), v) for k, v in self.network_dict.items() if saved.get(k) != v
        ]
        if mismatched:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, a, b in mismatched)
            raise UsageError(f"cannot resume {path}: it is from a different model ({detail})")

    def build_train_step(self) -> TrainStep:
        config = self.config
        torch.manual_seed(config.global_seed)
        model = build_network(config, self.num_classes, report_to=self.log.info).to(self.device)
        ema = create_ema(model)
        optimizer = create_optimizer_v2(
            model, "adamw", lr=config.lr, weight_decay=config.weight_decay
        )
        self.schedule = CosineLRScheduler(
            optimizer,
            t_initial=self.total_steps,
            lr_min=config.min_lr,
            warmup_t=config.warmup_steps,
            warmup_lr_init=config.min_lr,
            t_in_epochs=False,
        )
        objective = ClassificationObjective(config, self.num_classes)
        return self.train_step_for(model, ema, objective, optimizer)

    def before_step(self):
        self.schedule.step_update(self.step)

    def batch_inputs(self, batch):
        images, labels = batch
        return images.to(self.device, non_blocking=True), labels.to(self.device)

    def configs(self) -> dict:
        return {"model": self.network_dict, "train": self.config.to_dict()}

    def describe(self) -> str:
        return f"{self.config.model} ({self.config.attention})"

    def after_step(self):
        every = self.config.eval_every
        if self.validation is None:
            return
        if self.step == self.total_steps or (every and self.step % every == 0):
            self.evaluate()

    def evaluate(self):
        """Top-1/top-5 of the EMA weights (the model's without EMA) on the validation set:
        logged, and written to eval.json in the run folder."""
        config = self.config
        model = self.ema if config.ema_decay > 0 else self.model
        scores = evaluate_classifier(
            model,
            self.validation,
            config.eval_batch_size,
            self.device,
            self.info.rank,
            self.info.world_size,
        )
        self.model.train()
        if self.info.is_main:
            self.log.metrics({"step": self.step, **{f"eval_{k}": v for k, v in scores.items()}})
            self.log.scalars({"eval/top1": scores["top1"], "eval/top5": scores["top5"]}, self.step)
            self.log.info(
                f"step {self.step:07d} top-1 {scores['top1']:.4f} top-5 "
                f"{scores['top5']:.4f} on {scores['num_samples']} images"
            )
            report = {
                "model": config.model,
                "attention": config.attention,
                "step": self.step,
                "weights": "ema" if config.ema_decay > 0 else "model",
                "config": asdict(config),
                "metrics": scores,
            }
            with atomic_write(os.path.join(config.results_dir, "eval.json"), "w") as f:
                json.dump(report, f, indent=1)
        dist.barrier()
