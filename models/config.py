"""ModelConfig: everything that defines a network, checked when it is made, saved in checkpoints
and enough to rebuild the network with `build()`."""

from dataclasses import asdict, dataclass, fields

from common import InputError

from . import create_model, parse_model_name
from .attention import ATTENTIONS

VCA_FAMILY = ("vca", "stage1", "stage2", "emb", "diff")
STAGE2_SOFTMAX = ("separate", "joint")


class ConfigError(InputError):
    """A model config that describes no network, with the rule it breaks."""


@dataclass(frozen=True)
class ModelConfig:
    """A registry name (e.g. "DiT-XL/2") with its token mixer and sizes. The VCA options
    (contrast_grid, stage2_softmax, dwc) count only for the VCA family of attentions."""

    name: str
    attention: str = "mhsa"
    input_size: int = 32  # latent side: image side / the VAE's downsampling factor
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool | None = None  # None: on for DiT, off for SiT
    contrast_grid: int = 8
    stage2_softmax: str = "separate"
    dwc: bool = True

    def __post_init__(self):
        try:
            _, _, patch = parse_model_name(self.name)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.learn_sigma is None:
            object.__setattr__(self, "learn_sigma", self.family == "DiT")
        rules = [
            (self.attention in ATTENTIONS, f"attention one of {', '.join(ATTENTIONS)}"),
            (
                self.input_size > 0 and self.input_size % patch == 0,
                f"input_size a multiple of {patch}",
            ),
            (self.in_channels > 0, "in_channels positive"),
            (self.num_classes > 0, "num_classes positive"),
            (self.contrast_grid > 0, "contrast_grid positive"),
            (self.stage2_softmax in STAGE2_SOFTMAX, f"stage2_softmax one of {STAGE2_SOFTMAX}"),
            (
                not (self.attention == "diff" and self.stage2_softmax == "joint"),
                "stage2_softmax separate for the diff ablation (it has no dual streams)",
            ),
        ]
        for ok, rule in rules:
            if not ok:
                raise ConfigError(f"model config {self.describe()} needs {rule}")

    @property
    def family(self) -> str:
        """'DiT' (DDPM) or 'SiT' (interpolant flow)."""
        return parse_model_name(self.name)[0]

    def vca_options(self) -> dict:
        if self.attention not in VCA_FAMILY:
            return {}
        return {
            "contrast_grid": self.contrast_grid,
            "stage2_softmax": self.stage2_softmax,
            "dwc": self.dwc,
        }

    def build(self):
        return create_model(
            self.name,
            attention=self.attention,
            input_size=self.input_size,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            learn_sigma=self.learn_sigma,
            **self.vca_options(),
        )

    def describe(self) -> str:
        side = self.input_size
        return f"{self.name} ({self.attention}, {side}x{side}x{self.in_channels} latents)"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict, **overrides) -> "ModelConfig":
        """From a checkpoint's config, or from an older checkpoint's flat train.py args
        together with `overrides` for what those args did not store (the latent sizes)."""
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in saved.items() if k in known and v is not None}
        return cls(**{**kept, **overrides})
