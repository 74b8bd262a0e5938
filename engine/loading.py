"""A ready-to-sample model from any checkpoint, shared by sample.py and evaluate_fid.py so both
read checkpoints, pick weights and check them against the model the same way.

Accepted: our training checkpoints (config from their "args"), the official DiT/SiT files (bare
state dicts with the official key names, given by path or by name: found in a cache folder and
downloaded there on first use), and safetensors files (config from the metadata key "args", a
JSON dict of train.py flags, when present). Without stored args the architecture is inferred
from the tensor shapes, so a file is never loaded into a network it was not trained as.
"""

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import torch

from models import ATTENTIONS, MODEL_NAMES, WIDTHS, create_model, parse_model_name
from models.codec import Codec, load_codec

from .checkpoint import load_checkpoint
from .errors import UsageError
from .precision import add_precision_args, compile_blocks, resolve_compile, resolve_precision
from .sampling import add_objective_args, objective_config

DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"
# SiT's URL is the one in its repository's download.py (willisma/SiT).
OFFICIAL_URLS = {
    "DiT-XL-2-256x256.pt": DIT_URL.format("DiT-XL-2-256x256.pt"),
    "DiT-XL-2-512x512.pt": DIT_URL.format("DiT-XL-2-512x512.pt"),
    "SiT-XL-2-256.pt": "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/"
    "SiT-XL-2-256.pt?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0",
}
VCA_OPTIONS = ("contrast_grid", "stage2_softmax", "dwc")


@dataclass
class LoadedModel:
    """A model in eval mode on its device, with everything needed to sample from it."""

    model: torch.nn.Module
    family: str  # "DiT" (DDPM) or "SiT" (interpolant flow)
    name: str  # registry name, e.g. "DiT-XL/2"
    attention: str
    image_size: int
    num_classes: int
    vae: str  # codec spec, as load_codec takes it
    codec: Codec
    objective: dict  # config for engine.sampling.create_objective / sampling_objective
    latent_shape: tuple  # (channels, side, side) of the noise
    precision: str  # --precision resolved for the device: fp32, tf32, bf16 or fp16
    path: str
    description: str


def default_cache_dir() -> str:
    """$VCA_DIT_CACHE (the project's cache root, default ~/.cache/vca-dit) + /checkpoints."""
    root = os.environ.get("VCA_DIT_CACHE") or os.path.join("~", ".cache", "vca-dit")
    return os.path.join(os.path.expanduser(root), "checkpoints")


def add_model_args(
    parser: argparse.ArgumentParser,
    cfg_scale: float = 1.0,
    ckpt_required: bool = True,
    precision: str = "auto",
    compile_default: bool | None = None,
) -> None:
    """The flags load_model reads; `cfg_scale`, `precision` and `compile_default` are the
    script's defaults, and `ckpt_required=False` suits scripts with modes that need no model."""
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
    g.add_argument(
        "--cfg-scale",
        type=float,
        default=cfg_scale,
        help=f"classifier-free guidance scale; 1 turns it off (default {cfg_scale:g})",
    )
    g.add_argument(
        "--cfg-channels",
        type=int,
        default=None,
        help="guide only the first N latent channels (default: all); 3 reproduces DiT's rule, "
        "on which its published numbers rest",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")


def resolve_checkpoint(name_or_path: str, cache_dir: str) -> str:
    """An existing file as is; an official name from `cache_dir`, downloaded there if missing."""
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        return path
    if name_or_path not in OFFICIAL_URLS:
        raise UsageError(
            f"checkpoint {name_or_path!r} does not exist; pass a checkpoint file or one of the "
            f"official names {', '.join(OFFICIAL_URLS)}"
        )
    cached = os.path.join(cache_dir, name_or_path)
    if os.path.isfile(cached):
        return cached
    url = OFFICIAL_URLS[name_or_path]
    partial = f"{cached}.{os.getpid()}.partial"  # one per process: ranks may download at once
    try:
        os.makedirs(cache_dir, exist_ok=True)
        torch.hub.download_url_to_file(url, partial, progress=sys.stderr.isatty())
        os.replace(partial, cached)
    except Exception as err:
        raise UsageError(
            f"{name_or_path} is not in {cache_dir} and downloading it failed ({_first_line(err)}); "
            f"download {url} on a machine with network and put it at {cached}"
        ) from err
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return cached


def read_weights(path: str, which: str) -> tuple[dict, dict, str]:
    """(state dict, stored train.py args or {}, which weights were taken)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            state = load_file(path)
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
            saved = json.loads(metadata.get("args", "{}"))
        except Exception as err:
            raise UsageError(f"cannot read safetensors file {path}: {_first_line(err)}") from err
        return state, saved if isinstance(saved, dict) else {}, "weights"
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path} holds a {type(ckpt).__name__}, not a state dict or checkpoint")
    if isinstance(ckpt.get(which), dict):  # a training checkpoint (ours, or DiT/SiT train.py's)
        saved = ckpt.get("args")
        return ckpt[which], saved if isinstance(saved, dict) else {}, which
    if "model" in ckpt or "ema" in ckpt:
        other = "model" if which == "ema" else "ema"
        raise UsageError(f"{path} has no {which!r} weights; pass --weights {other}")
    return ckpt, {}, "weights"


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


def _model_name(path: str, shapes: dict, saved: dict, requested: str | None) -> str:
    shaped = f"{shapes['width']}/{shapes['patch']}"
    if saved.get("model"):
        name = saved["model"]
    elif requested:
        name = requested
    else:
        family = "SiT" if "SiT" in os.path.basename(path) else "DiT"
        name = f"{family}-{shaped}"
    if requested and requested != name:
        raise UsageError(f"{path} holds a {name} model, not {requested}; drop --model")
    _, width, patch = parse_model_name(name)
    if f"{width}/{patch}" != shaped:
        raise UsageError(
            f"{path} holds a {shaped}-shaped network (depth {WIDTHS[shapes['width']][0]}, "
            f"hidden {WIDTHS[shapes['width']][1]}, patch {shapes['patch']}), not {name}; "
            f"pass --model {name.split('-')[0]}-{shaped} or a {name} checkpoint"
        )
    return name


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


def load_model(args: argparse.Namespace, device=None) -> LoadedModel:
    """The checkpoint `args.ckpt` as a model on `device` (default --device, else cuda if
    available), checked against --model/--attention/--image-size/--num-classes/--vae, its
    forward compiled when --compile says so. Global state (TF32 flags) is the caller's:
    `engine.precision.apply_precision(loaded.precision)`.

    Every mismatch is a UsageError (or a CodecError for the VAE) with a one-line message.
    """
    if not args.ckpt:
        raise UsageError("no checkpoint given; pass --ckpt PATH or an official name")
    device = _device(device or args.device)
    path = resolve_checkpoint(args.ckpt, args.ckpt_cache or default_cache_dir())
    state, saved, weights = read_weights(path, args.weights)
    shapes = infer_shapes(state, path)
    name = _model_name(path, shapes, saved, args.model)
    family = parse_model_name(name)[0]

    attention = saved.get("attention") or args.attention or "mhsa"
    if args.attention and args.attention != attention:
        raise UsageError(
            f"{path} uses {attention} attention, not {args.attention}; drop --attention"
        )
    num_classes = shapes["num_classes"]
    if args.num_classes is not None and args.num_classes != num_classes:
        raise UsageError(
            f"{path} has {num_classes} classes, not --num-classes {args.num_classes}; drop it"
        )
    opts = {}
    if attention not in ("mhsa", "diffattn"):  # the VCA family takes these options
        opts = {k: saved[k] for k in VCA_OPTIONS if k in saved}
    try:
        model = create_model(
            name,
            attention=attention,
            input_size=shapes["latent_size"],
            num_classes=num_classes,
            in_channels=shapes["in_channels"],
            learn_sigma=shapes["learn_sigma"],
            **opts,
        )
    except ValueError as err:
        raise UsageError(f"cannot build {name} for {path}: {_first_line(err)}") from err
    _load_state(model, state, path, f"{name} with {attention} attention")
    model = model.to(device).eval().requires_grad_(False)
    if resolve_compile(args.compile, device):
        compile_blocks(model)

    in_channels = shapes["in_channels"]
    if args.cfg_channels is not None and not 1 <= args.cfg_channels <= in_channels:
        raise UsageError(f"--cfg-channels must be between 1 and {in_channels} for {name}")
    vae = args.vae or saved.get("vae") or ("none" if in_channels == 3 else "ema")
    codec = load_codec(vae, device)
    if codec.latent_channels != in_channels:
        raise UsageError(
            f"{path} takes {in_channels}-channel latents but VAE {vae!r} makes "
            f"{codec.latent_channels}; pass --vae {'none' if in_channels == 3 else 'ema'} "
            "or the VAE it was trained with"
        )
    image_size = shapes["latent_size"] * codec.downsample
    if args.image_size is not None and args.image_size != image_size:
        raise UsageError(
            f"{path} with VAE {vae!r} makes {image_size}px images, not --image-size "
            f"{args.image_size}; drop --image-size or pass the matching checkpoint"
        )

    defaults = argparse.ArgumentParser()
    add_objective_args(defaults)
    objective_args = defaults.parse_args([])
    for key, value in saved.items():
        if hasattr(objective_args, key):
            setattr(objective_args, key, value)
    objective = {**objective_config(objective_args), "learn_sigma": shapes["learn_sigma"]}
    latent = shapes["latent_size"]
    return LoadedModel(
        model=model,
        family=family,
        name=name,
        attention=attention,
        image_size=image_size,
        num_classes=num_classes,
        vae=vae,
        codec=codec,
        objective=objective,
        latent_shape=(in_channels, latent, latent),
        precision=resolve_precision(args.precision, device),
        path=path,
        description=f"{name} ({attention}, {weights}) from {path}: {image_size}px, "
        f"{num_classes} classes, VAE {vae}",
    )


def _device(spec) -> torch.device:
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise UsageError(f"bad --device {spec!r}: {_first_line(err)}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: no CUDA GPU is available here; use --device cpu")
    return device


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
