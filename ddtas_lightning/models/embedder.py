"""Embedder: timm backbone -> global pooling -> linear head -> L2 normalisation."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddtas_lightning.config.validation import ConfigError, check_choice
from ddtas_lightning.models.head_init import HEAD_INITS, init_head

POOLINGS = ("avg", "max", "avg+max")


def _refuse_unsafe_weights(path: Path) -> None:
    """A weights file that needs a full unpickler is refused before timm opens it (timm loads weights-only
    too, with its own message); other load failures are left to timm's load, whose error names the
    architecture (docs/security.md)."""
    from ddtas_lightning.runtime.safe_load import UnsafeFileError, check_weights_file

    try:
        check_weights_file(path, what="backbone.checkpoint_path",
                           expected="a .pth/.safetensors state dict for the timm model")
    except UnsafeFileError:
        raise
    except ConfigError:
        pass


class Embedder(nn.Module):
    """Maps images to L2-normalised ``dim``-d embeddings.

    model_name: any timm model name. pretrained: load timm's pretrained weights (needs a reachable hub)
    unless ``checkpoint_path`` points to a local weights file, which is then used instead (timm drops
    the classifier keys). pooling: "avg", "max" or "avg+max" (the sum of both, as in the DDTAS/MS
    BN-Inception code) over the last feature map; backbones without a spatial map (ViTs) use timm's
    own pooling. freeze_bn: keep every BatchNorm in eval mode (running statistics fixed), as the
    papers do; the affine parameters still train.
    """

    def __init__(
        self,
        model_name: str = "resnet18",
        dim: int = 128,
        pooling: str = "avg",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        freeze_bn: bool = False,
        normalize: bool = True,
        head_init: str = "default",
        **timm_kwargs,
    ) -> None:
        super().__init__()
        check_choice("backbone.head_init", head_init, HEAD_INITS)
        if dim <= 0:
            raise ValueError(f"backbone.dim must be a positive integer, got {dim}")
        check_choice("backbone.pooling", pooling, POOLINGS)
        if model_name not in timm.list_models() and model_name not in timm.list_models(pretrained=True):
            raise ValueError(
                f"backbone.model_name {model_name!r} is not a timm model (see timm.list_models())"
            )
        create_kwargs = dict(num_classes=0, **timm_kwargs)
        if checkpoint_path:
            path = Path(checkpoint_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"backbone.checkpoint_path: weights file {path} does not exist "
                    "(expected a local .pth/.safetensors state dict for the timm model)"
                )
            _refuse_unsafe_weights(path)
            create_kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        else:
            create_kwargs.update(pretrained=pretrained)
        try:
            self.backbone = timm.create_model(model_name, **create_kwargs)
        except Exception as e:
            if checkpoint_path and str(e).startswith("backbone.checkpoint_path"):
                raise  # already names the key (e.g. the BN-Inception loader's own check)
            if checkpoint_path:  # a text file, a truncated file, weights of another architecture
                raise ConfigError(
                    f"backbone.checkpoint_path: cannot load {path} into the timm model {model_name!r} "
                    f"({type(e).__name__}: {_summary(e)}); expected a .pth/.safetensors state dict of that "
                    "architecture (or set backbone.model_name to the one the weights are for)"
                ) from None
            if not pretrained or not isinstance(e, OSError):
                raise
            # hub weights requested offline: name the key and the offline way instead
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(
                f"backbone.pretrained=true: the pretrained weights of {model_name!r} could not be fetched "
                f"({type(e).__name__}: {first}); offline, download them elsewhere and set "
                "backbone.checkpoint_path=/path/to/weights, or use backbone.pretrained=false"
            ) from None
        self.pooling = pooling
        self.freeze_bn = freeze_bn
        self.normalize = normalize
        self.head = nn.Linear(self.backbone.num_features, dim)
        self.head_init = head_init
        init_head(self.head, head_init)
        self.dim = dim
        # Apply freeze_bn now: Lightning >= 2.2 never calls .train() when fitting starts (it only
        # restores each submodule's captured mode after evaluation), so train() alone would leave BN in
        # train mode for the whole run.
        self.train()

    def pool(self, features: Tensor) -> Tensor:
        if features.ndim != 4:  # token sequences etc.: timm's own head pooling
            return self.backbone.forward_head(features, pre_logits=True)
        if self.pooling == "avg":
            return features.mean(dim=(2, 3))
        if self.pooling == "max":
            return features.amax(dim=(2, 3))
        return features.mean(dim=(2, 3)) + features.amax(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        x = self.head(self.pool(self.backbone.forward_features(images)))
        return F.normalize(x, dim=1) if self.normalize else x

    def train(self, mode: bool = True) -> Embedder:
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @torch.no_grad()
    def data_config(self) -> dict:
        """timm's preprocessing config (input size, mean, std, interpolation) for this backbone; the
        input size is the one the model was built for (e.g. a ViT created with ``img_size=28``), not
        its pretrained default."""
        config = timm.data.resolve_data_config({}, model=self.backbone)
        img_size = getattr(getattr(self.backbone, "patch_embed", None), "img_size", None)
        if img_size is not None:
            config["input_size"] = (3, *tuple(img_size))
        return config


def _summary(exc: BaseException, limit: int = 300) -> str:
    """The first lines of an error message, joined and cut to ``limit`` characters."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()][:2]
    text = " ".join(lines) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
