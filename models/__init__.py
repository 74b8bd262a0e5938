"""Networks: the DiT/SiT backbone, its token mixers, and the model registry."""

from .attention import ATTENTION_HELP, ATTENTIONS
from .dit import DiT

# name -> (depth, hidden size, heads); the patch size is the "/p" suffix. S to XL are DiT's;
# T (tiny) is ours, for tests and CPU demos.
WIDTHS = {
    "T": (6, 192, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCHES = (2, 4, 8)
FAMILIES = ("DiT", "SiT")
MODEL_NAMES = tuple(
    f"{family}-{width}/{patch}" for family in FAMILIES for width in WIDTHS for patch in PATCHES
)


def parse_model_name(name: str) -> tuple[str, str, int]:
    """'SiT-B/2' -> ('SiT', 'B', 2); a clear ValueError for anything else."""
    try:
        family, rest = name.split("-", 1)
        width, patch = rest.split("/")
        if family in FAMILIES and width in WIDTHS and int(patch) in PATCHES:
            return family, width, int(patch)
    except ValueError:
        pass
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def create_model(
    name: str,
    attention: str = "mhsa",
    input_size: int = 32,
    num_classes: int = 1000,
    in_channels: int = 4,
    learn_sigma: bool | None = None,
    **opts,
) -> DiT:
    """Build `name` (e.g. 'DiT-XL/2', 'SiT-S/2') with the token mixer `attention`.

    `input_size` is the latent side (image side / 8 with the SD VAE). DiT models learn sigma
    (2 * in_channels outputs); SiT models predict in_channels, and `learn_sigma=True` gives them
    the 8-channel head of SiT's released checkpoint while still returning in_channels.
    Remaining opts go to the backbone (mlp_ratio, class_dropout_prob) or to VCA
    (contrast_grid, stage2_softmax, dwc).
    """
    family, width, patch = parse_model_name(name)
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTIONS)}")
    depth, hidden, heads = WIDTHS[width]
    if learn_sigma is None:
        learn_sigma = family == "DiT"
    return DiT(
        input_size=input_size,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        return_sigma=family == "DiT",
        attention=attention,
        **opts,
    )


from .config import ConfigError, ModelConfig  # noqa: E402 (it builds with create_model)

__all__ = [
    "ATTENTIONS",
    "ATTENTION_HELP",
    "ConfigError",
    "DiT",
    "MODEL_NAMES",
    "ModelConfig",
    "create_model",
    "parse_model_name",
]
