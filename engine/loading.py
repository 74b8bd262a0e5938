"""A ready-to-sample model from any checkpoint, shared by sample.py and evaluate_fid.py so both
read checkpoints, pick weights and check them against the model the same way.

Accepted: our training checkpoints (config from their "config", or the "args" of older ones),
the official DiT/SiT files (bare state dicts with the official key names, given by path or by
name: engine.checkpoint.resolve_checkpoint finds or downloads them), and safetensors files
(config from the metadata key "config" or "args", JSON, when present). The sizes always come
from the tensor shapes, so a file is never loaded into a network it was not trained as.
"""

import argparse
import json
import math
import os
from dataclasses import dataclass

import torch

from common import one_line
from common.cli import from_flags
from models import ATTENTIONS, MODEL_NAMES, WIDTHS, ModelConfig, parse_model_name
from models.codec import Codec, load_codec

from .checkpoint import (
    OFFICIAL_URLS,
    default_cache_dir,
    load_checkpoint,
    resolve_checkpoint,
    stored_config,
)
from .dist import resolve_device
from .errors import UsageError
from .objective import ObjectiveConfig
from .precision import add_precision_args, compile_blocks, resolve_compile, resolve_precision
from .sampling import SamplerSpec, sampling_objective


@dataclass(frozen=True)
class CheckpointRequest:
    """Which checkpoint to load and what the user expects of it (None: whatever it holds);
    the fields of add_model_args's flags."""

    ckpt: str | None
    ckpt_cache: str | None = None
    weights: str = "ema"
    model: str | None = None
    attention: str | None = None
    image_size: int | None = None
    num_classes: int | None = None
    vae: str | None = None
    device: str | None = None
    precision: str = "auto"
    compile: bool | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "CheckpointRequest":
        return from_flags(cls, args)


@dataclass
class LoadedModel:
    """A model in eval mode on its device, with everything needed to sample from it."""

    model: torch.nn.Module
    config: ModelConfig
    codec: Codec
    vae: str  # codec spec, as load_codec takes it
    image_size: int
    objective: ObjectiveConfig
    precision: str  # --precision resolved for the device: fp32, tf32, bf16 or fp16
    path: str
    weights: str  # "ema", "model" or "weights" (a file with one set)
    step: int | None = None  # the training step of one of our checkpoints

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def attention(self) -> str:
        return self.config.attention

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def latent_shape(self) -> tuple:
        """(channels, side, side) of the noise."""
        side = self.config.input_size
        return (self.config.in_channels, side, side)

    def objective_for(self, spec: SamplerSpec):
        """The objective that runs `spec` on this model, once the spec is checked to fit it."""
        channels = self.config.in_channels
        if spec.cfg_channels is not None and not 1 <= spec.cfg_channels <= channels:
            raise UsageError(f"--cfg-channels must be between 1 and {channels} for {self.name}")
        return sampling_objective(self.family, self.objective, spec)

    @property
    def description(self) -> str:
        return (
            f"{self.name} ({self.attention}, {self.weights}) from {self.path}: "
            f"{self.image_size}px, {self.num_classes} classes, VAE {self.vae}"
        )


def add_model_args(
    parser: argparse.ArgumentParser,
    ckpt_required: bool = True,
    precision: str = "auto",
    compile_default: bool | None = None,
) -> None:
    """The flags load_model reads; `precision` and `compile_default` are the script's
    defaults, and `ckpt_required=False` suits scripts with modes that need no model."""
    g = parser.add_argument_group("model and checkpoint")
    g.add_argument(
        "--ckpt",
        required=ckpt_required,
        metavar="PATH|NAME",
        help="a training checkpoint (.pt), a safetensors file, an official DiT/SiT file, or the "
        f"name of one ({', '.join(OFFICIAL_URLS)}), looked up in --ckpt-cache and downloaded "
        "there when missing",
    )
    g.add_argument(
        "--ckpt-cache",
        metavar="DIR",
        default=None,
        help="folder of official checkpoints (default $VCA_DIT_CACHE/checkpoints, "
        "else ~/.cache/vca-dit/checkpoints)",
    )
    g.add_argument(
        "--weights",
        choices=["ema", "model"],
        default="ema",
        help="which weights of a training checkpoint: the EMA (default) or the raw model; "
        "files with one set of weights ignore it",
    )
    g.add_argument(
        "--model",
        choices=MODEL_NAMES,
        metavar="NAME",
        default=None,
        help="DiT-*/SiT-* registry name, e.g. DiT-XL/2 (default: from the checkpoint's args, "
        "else inferred from its shapes, SiT when the file name contains 'SiT'); a name that "
        "does not match the checkpoint is an error",
    )
    g.add_argument(
        "--attention",
        choices=ATTENTIONS,
        default=None,
        help="token mixer (default: from the checkpoint's args, else mhsa)",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="expected image side in pixels; an error if the checkpoint and VAE make another "
        "(default: whatever they make)",
    )
    g.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="expected number of classes; an error if the checkpoint has another "
        "(default: the checkpoint's)",
    )
    g.add_argument(
        "--vae",
        default=None,
        help="latent codec: ema | mse (stabilityai/sd-vae-ft-*), a hub id, an AutoencoderKL "
        "folder, or none for pixel models (default: the checkpoint's own; ema for official "
        "and other argless files with 4 latent channels, none for 3)",
    )
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    add_precision_args(g, precision, compile_default)


def read_weights(path: str, which: str) -> tuple[dict, dict, str]:
    """(state dict, stored configs as engine.checkpoint.stored_config gives them, which weights
    were taken)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            state = load_file(path)
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
            saved = {
                key: json.loads(metadata[key]) for key in ("config", "args") if key in metadata
            }
        except Exception as err:
            raise UsageError(f"cannot read safetensors file {path}: {one_line(err)}") from err
        return state, stored_config(saved), "weights"
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path} holds a {type(ckpt).__name__}, not a state dict or checkpoint")
    if isinstance(ckpt.get(which), dict):  # a training checkpoint (ours, or DiT/SiT train.py's)
        return ckpt[which], {**stored_config(ckpt), "step": ckpt.get("step")}, which
    if "model" in ckpt or "ema" in ckpt:
        other = "model" if which == "ema" else "ema"
        raise UsageError(f"{path} has no {which!r} weights; pass --weights {other}")
    return ckpt, stored_config({}), "weights"


def infer_shapes(state: dict, path: str) -> dict:
    """Architecture facts the tensors pin down (official key names)."""
    try:
        pos = state["pos_embed"]
        proj = state["x_embedder.proj.weight"]
        table = state["y_embedder.embedding_table.weight"]
        head = state["final_layer.linear.weight"]
    except KeyError as err:
        raise UsageError(
            f"{path} is not a DiT/SiT checkpoint: it has no {err.args[0]!r} tensor"
        ) from None
    hidden, patch, in_channels = pos.shape[-1], proj.shape[-1], proj.shape[1]
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    width = next((w for w, (d, h, _) in WIDTHS.items() if (d, h) == (depth, hidden)), None)
    if width is None:
        raise UsageError(
            f"{path}: no registry model has depth {depth} and hidden size {hidden} "
            f"(known widths: {', '.join(f'{w} {d}/{h}' for w, (d, h, _) in WIDTHS.items())})"
        )
    return {
        "width": width,
        "patch": patch,
        "in_channels": in_channels,
        "learn_sigma": head.shape[0] == 2 * in_channels * patch * patch,
        "num_classes": table.shape[0] - 1,  # the last row is the null class
        "latent_size": math.isqrt(pos.shape[-2]) * patch,
    }


def model_config(path: str, shapes: dict, saved: dict, request: CheckpointRequest) -> ModelConfig:
    """The network the file holds: name, attention and VCA options as stored (else the flags,
    else inferred: SiT when the file name says so, mhsa), sizes from the tensors. A flag that
    contradicts the file is a UsageError naming the fix."""
    shaped = f"{shapes['width']}/{shapes['patch']}"
    family = "SiT" if "SiT" in os.path.basename(path) else "DiT"
    name = saved.get("name") or request.model or f"{family}-{shaped}"
    if request.model and request.model != name:
        raise UsageError(f"{path} holds a {name} model, not {request.model}; drop --model")
    _, width, patch = parse_model_name(name)
    if f"{width}/{patch}" != shaped:
        raise UsageError(
            f"{path} holds a {shaped}-shaped network (depth {WIDTHS[shapes['width']][0]}, "
            f"hidden {WIDTHS[shapes['width']][1]}, patch {shapes['patch']}), not {name}; "
            f"pass --model {name.split('-')[0]}-{shaped} or a {name} checkpoint"
        )
    attention = saved.get("attention") or request.attention or "mhsa"
    if request.attention and request.attention != attention:
        raise UsageError(
            f"{path} uses {attention} attention, not {request.attention}; drop --attention"
        )
    if request.num_classes is not None and request.num_classes != shapes["num_classes"]:
        raise UsageError(
            f"{path} has {shapes['num_classes']} classes, not --num-classes {request.num_classes}; "
            "drop it"
        )
    sizes = {key: shapes[key] for key in ("in_channels", "learn_sigma", "num_classes")}
    try:
        return ModelConfig.from_dict(
            saved, name=name, attention=attention, input_size=shapes["latent_size"], **sizes
        )
    except ValueError as err:
        raise UsageError(f"cannot build {name} for {path}: {one_line(err)}") from err


def _load_state(model: torch.nn.Module, state: dict, path: str, what: str) -> None:
    """load_state_dict(strict=True), with a one-line account of any mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = [
        f"{len(found)} {kind} (e.g. {found[0]})"
        for kind, found in (("missing keys", missing), ("unexpected keys", unexpected))
        if found
    ]
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes (e.g. {wrong[0]})")
    if problems:
        raise UsageError(
            f"{path} does not match {what}: {'; '.join(problems)}; pass the --model and "
            "--attention it was trained with (or leave them out to read them from the file)"
        )
    model.load_state_dict(state)


def load_model(request: CheckpointRequest, device=None) -> LoadedModel:
    """The checkpoint `request.ckpt` as a model on `device` (default --device, else cuda if
    available), checked against --model/--attention/--image-size/--num-classes/--vae, its
    blocks compiled when --compile says so. Global state (TF32 flags) is the caller's:
    `engine.precision.apply_precision(loaded.precision)`.

    Every mismatch is a UsageError (or a CodecError for the VAE) with a one-line message.
    """
    if not request.ckpt:
        raise UsageError("no checkpoint given; pass --ckpt PATH or an official name")
    device = resolve_device(device or request.device)
    path = resolve_checkpoint(request.ckpt, request.ckpt_cache or default_cache_dir())
    state, saved, weights = read_weights(path, request.weights)
    config = model_config(path, infer_shapes(state, path), saved["model"], request)
    model = config.build()
    _load_state(model, state, path, f"{config.name} with {config.attention} attention")
    model = model.to(device).eval().requires_grad_(False)
    if resolve_compile(request.compile, device):
        compile_blocks(model)

    in_channels = config.in_channels
    vae = request.vae or saved["train"].get("vae") or ("none" if in_channels == 3 else "ema")
    codec = load_codec(vae, device)
    if codec.latent_channels != in_channels:
        raise UsageError(
            f"{path} takes {in_channels}-channel latents but VAE {vae!r} makes "
            f"{codec.latent_channels}; pass --vae {'none' if in_channels == 3 else 'ema'} "
            "or the VAE it was trained with"
        )
    image_size = config.input_size * codec.downsample
    if request.image_size is not None and request.image_size != image_size:
        raise UsageError(
            f"{path} with VAE {vae!r} makes {image_size}px images, not --image-size "
            f"{request.image_size}; drop --image-size or pass the matching checkpoint"
        )
    try:
        objective = ObjectiveConfig.from_dict(saved["objective"], learn_sigma=config.learn_sigma)
    except ValueError as err:
        raise UsageError(f"{path} stores a bad objective: {one_line(err)}") from err
    return LoadedModel(
        model=model,
        config=config,
        codec=codec,
        vae=vae,
        image_size=image_size,
        objective=objective,
        precision=resolve_precision(request.precision, device),
        path=path,
        weights=weights,
        step=saved.get("step") if isinstance(saved.get("step"), int) else None,
    )
