"""Image classifiers from timm with their attention swapped for this project's token mixers.

VCA is presented as a plug-and-play replacement for self-attention; here the claim meets the
backbones researchers already trust. timm builds the network (patch embedding, MLPs, norms,
heads, its DeiT / Swin / PVT-v2 recipes and pretrained weights); `swap_attention` puts a
`models.attention` mixer (mhsa, vca or an ablation) in each block's place, the same module the
DiT backbone uses, and everything else stays timm's.

How each family is swapped:

- ViT / DeiT: every block's attention. The class token (and DeiT's distillation token) has no
  place on the patch grid that VCA pools and convolves, so it is a prefix token: a key and value
  of Stage I and a query of Stage II like every patch, outside the pooling and the conv
  (`VisualContrastAttention(prefix_tokens=...)`). With `mhsa` the swapped model computes exactly
  timm's (same qkv/proj weights).
- Swin: the shifted-window attention becomes one global mixer over the stage's whole grid
  (window = feature map, no shift); the relative position tables go. With VCA this is linear in
  the tokens, which windows were there to achieve. The seed paper's Swin-T changes by -0.4M
  parameters, which matches dropping the tables and adding VCA's tokens (see the README table).
- PVT-v2: the spatial-reduction attention (q, kv and the strided `sr` conv with its norm)
  becomes a global mixer over the stage's grid; dropping `sr` is most of the seed paper's
  -1.6M for PVT.

PVT v1 and CSWin are not in timm and are not rewritten here.
"""

import logging
from dataclasses import dataclass

import timm
from torch import nn

from .attention import ATTENTIONS, build_attention

log = logging.getLogger(__name__)

FAMILIES = {  # timm module of the model's entrypoint -> how its attention is found
    "timm.models.vision_transformer": "vit",
    "timm.models.deit": "vit",
    "timm.models.swin_transformer": "swin",
    "timm.models.pvt_v2": "pvt",
}
# The seed paper's classification backbones available in timm (PVT-Tiny is v1, not in timm: its
# closest timm relative is PVT-v2-b1; CSWin is not in timm).
BACKBONES = (
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "pvt_v2_b1",
    "swin_tiny_patch4_window7_224",
)
CLASSIFIER_ATTENTIONS = ("native", *ATTENTIONS)
MIXER_OPTIONS = ("contrast_grid", "stage2_softmax", "dwc")


def family_of(name: str) -> str:
    """'vit', 'swin' or 'pvt' for a timm model name; ValueError for any other."""
    module = timm.models.model_entrypoint(name).__module__ if timm.models.is_model(name) else None
    if module not in FAMILIES:
        raise ValueError(
            f"unknown or unsupported timm model {name!r}; use a ViT/DeiT, Swin or PVT-v2, "
            f"e.g. {', '.join(BACKBONES)}"
        )
    return FAMILIES[module]


class GlobalAttention(nn.Module):
    """A project token mixer where a timm block calls its attention. It takes any of the blocks'
    calls (ViT: attn_mask / is_causal keywords, Swin: mask, PVT-v2: feat_size) and refuses what a
    global mixer built for one grid cannot honour: a mask, or another grid."""

    def __init__(self, mixer: nn.Module, grid_size: tuple[int, int]):
        super().__init__()
        self.mixer = mixer
        self.grid_size = tuple(grid_size)

    def forward(self, x, feat_size=None, attn_mask=None, mask=None, is_causal=False):
        if attn_mask is not None or mask is not None or is_causal:
            raise ValueError("a swapped attention mixes all tokens; it takes no attention mask")
        if feat_size is not None and tuple(feat_size) != self.grid_size:
            raise ValueError(
                f"the attention was built for a {self.grid_size} grid, got {tuple(feat_size)};"
                " build the classifier for this image size"
            )
        return self.mixer(x)


@dataclass(frozen=True)
class AttentionSite:
    """One block's attention: where it sits and the grid it sees."""

    block: nn.Module
    dim: int
    num_heads: int
    grid_size: tuple[int, int]
    prefix_tokens: int


def attention_sites(model: nn.Module, family: str, img_size: int) -> list[AttentionSite]:
    """Every block's attention in depth order. Swin blocks are set to one window over the
    stage's grid (no shift) on the way, so that their call hands over the whole grid."""
    if family == "vit":
        grid, prefix = tuple(model.patch_embed.grid_size), model.num_prefix_tokens
        return [
            AttentionSite(b, b.attn.qkv.in_features, b.attn.num_heads, grid, prefix)
            for b in model.blocks
        ]
    if family == "swin":
        sites = []
        for block in (b for stage in model.layers for b in stage.blocks):
            grid = tuple(block.input_resolution)
            block.set_input_size(grid, grid)
            attn = block.attn
            sites.append(AttentionSite(block, attn.qkv.in_features, attn.num_heads, grid, 0))
        return sites
    sites, side = [], img_size  # PVT-v2: each stage's grid from its strided patch conv
    embeds = [model.patch_embed, *(stage.downsample for stage in model.stages[1:])]
    for stage, embed in zip(model.stages, embeds, strict=True):
        conv = embed.proj
        side = (side + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        for block in stage.blocks:
            sites.append(
                AttentionSite(block, block.attn.dim, block.attn.num_heads, (side, side), 0)
            )
    return sites


def swap_attention(
    model: nn.Module, family: str, attention: str, img_size: int, **mixer_options
) -> nn.Module:
    """Replace every block's attention of a timm `model` with the project's `attention` mixer
    (block index = depth, for the differential lambda schedule); `mixer_options` go to VCA
    (build_attention hands them to the VCA variants only)."""
    if attention not in ATTENTIONS:
        raise ValueError(
            f"unknown attention {attention!r}; choose one of {', '.join(CLASSIFIER_ATTENTIONS)}"
        )
    device = next(model.parameters()).device
    sites = attention_sites(model, family, img_size)
    for index, site in enumerate(sites):
        options = {**mixer_options, "prefix_tokens": site.prefix_tokens}
        mixer = build_attention(
            attention, site.dim, site.num_heads, site.grid_size, index, **options
        )
        site.block.attn = GlobalAttention(mixer, site.grid_size).to(device)
    return model


@dataclass
class WeightReport:
    """What loading a timm state dict into a swapped model did."""

    loaded: list[str]
    new: list[str]  # the swapped model's keys the state dict did not fill
    unused: list[str]  # the state dict's keys with no place (or another shape) in the model


def load_timm_weights(model: nn.Module, state_dict: dict) -> WeightReport:
    """Load a timm checkpoint into a (swapped) classifier with strict=False: an attention's
    `attn.x` key fills `attn.mixer.x` where the shapes agree (ViT's qkv and proj), so only the
    replaced attention's own parameters start fresh."""
    own = model.state_dict()
    mapped, unused = {}, []
    for key, value in state_dict.items():
        target = key if key in own else key.replace(".attn.", ".attn.mixer.", 1)
        if target in own and own[target].shape == value.shape:
            mapped[target] = value
        else:
            unused.append(key)
    model.load_state_dict(mapped, strict=False)
    new = [key for key in own if key not in mapped]
    return WeightReport(sorted(mapped), new, unused)


def create_classifier(
    name: str,
    attention: str = "native",
    *,
    num_classes: int = 1000,
    img_size: int = 224,
    pretrained: str | bool = False,
    report_to=None,
    **options,
) -> nn.Module:
    """A timm classifier whose attention is `attention`: "native" keeps timm's own, any of
    models.attention.ATTENTIONS swaps it in (e.g. `create_classifier("deit_tiny_patch16_224",
    attention="vca", contrast_grid=7)`).

    `options`: VCA's (contrast_grid, stage2_softmax, dwc) go to the mixers, the rest to
    timm.create_model (e.g. patch_size, depth, drop_path_rate). `pretrained`: True loads timm's
    weights from the Hugging Face hub, a path loads a timm state dict file (.pth /
    .safetensors); either fills every non-attention parameter (and a ViT's qkv/proj), as
    `load_timm_weights` reports in one line to `report_to` (default: this module's logger)."""
    if attention not in CLASSIFIER_ATTENTIONS:
        raise ValueError(
            f"unknown attention {attention!r}; choose one of {', '.join(CLASSIFIER_ATTENTIONS)}"
        )
    family = family_of(name)
    mixer_options = {k: options.pop(k) for k in MIXER_OPTIONS if k in options}
    kwargs = {"num_classes": num_classes, **options}
    if family != "pvt":  # PVT-v2 takes any image size; its grids are read off at swap time
        kwargs["img_size"] = img_size
    if isinstance(pretrained, str):
        kwargs["pretrained_cfg_overlay"] = {"file": pretrained}
    model = timm.create_model(name, pretrained=bool(pretrained), **kwargs)
    if attention == "native":
        return model
    state = model.state_dict() if pretrained else None
    swap_attention(model, family, attention, img_size, **mixer_options)
    if state is not None:
        report = load_timm_weights(model, state)
        (report_to or log.info)(
            f"{name}: {len(report.loaded)} keys loaded, new: {report.new}; unused: {report.unused}"
        )
    return model
