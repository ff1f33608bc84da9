"""BN-Inception (Inception v2 with batch normalisation; Ioffe & Szegedy, ICML 2015), registered with timm
as ``bninception``.

This is the backbone of the MS-loss, MMSI and DDTAS code (spec ``docs/papers/ddtas.md`` §4): the Caffe model
converted to PyTorch and distributed by Cadene's ``pretrainedmodels`` as ``bn_inception-52deb4733.pth``.
The parameter names here are exactly that file's state-dict keys (``conv1_7x7_s2.weight``,
``conv1_7x7_s2_bn.running_mean``, ``inception_3a_1x1.weight``, ..., ``last_linear.weight``), so the file
loads directly::

    Embedder("bninception", dim=512, pooling="avg+max", freeze_bn=True,
             checkpoint_path="/path/to/bn_inception-52deb4733.pth")
    timm.create_model("bninception", num_classes=0,
                      pretrained=True, pretrained_cfg_overlay={"file": "/path/to/bn_inception-52deb4733.pth"})

Input: **BGR**, pixel range 0-255, minus the mean (104, 117, 128) (B, G, R), std 1 -- the project's
``transform=bninception``. Trained at 224 px; the DML papers use 227. ``forward_features`` gives the
(B, 1024, H/32, W/32) map of ``inception_5b`` (7 x 7 at 224 and 227); ``num_features == 1024``.

Architecture: every convolution (with bias, as in Caffe) is followed by BatchNorm (eps 1e-5) and ReLU; the
conv is ``<name>``, its BN ``<name>_bn``. Two stem stages, then ten inception blocks described by one table
(:data:`INCEPTION_BLOCKS`): branches 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 | pool (-> 1x1 projection),
concatenated in that order. Blocks 3c and 4e halve the resolution (stride-2 3x3 convolutions, a 3x3/2 max
pool passed through unprojected, no 1x1 branch); 5b pools with max instead of avg. All pools use Caffe's
ceil rounding. BN momentum is PyTorch's 0.1 (Cadene's port sets 0.9, a literal copy of Caffe's *decay*
0.9 that in PyTorch means "90% new batch"); it only matters with ``freeze_bn=false``.

Loading the Cadene file (:func:`checkpoint_filter_fn`, run by timm's ``load_pretrained``): a leading
``module.`` is stripped (timm), ``last_linear.*`` (the 1000-way ImageNet classifier) is dropped when the
model has no classifier, the BN tensors the file stores as (1, C) are reshaped to (C,), absent
``num_batches_tracked`` counters are set to 0; every other key must match the model exactly in name and
shape -- otherwise a ``ValueError`` lists the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from torch import Tensor, nn

__all__ = ["BNInception", "INCEPTION_BLOCKS", "InceptionBlock", "bninception", "checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "bn_inception-52deb4733.pth"


class InceptionBlock(NamedTuple):
    """One row of the architecture table: output channels of each convolution (0: branch absent).

    pool: ``"avg"`` (3x3/1 average, padding 1, counting the padding) or ``"max"`` (3x3/1 max, padding 1),
    each followed by the 1x1 ``pool_proj``; ``"max/2"``: a 3x3/2 max pool passed through as is, with the
    3x3 convolutions of the other branches at stride 2 (a grid reduction).
    """

    name: str
    c1x1: int
    c3x3_reduce: int
    c3x3: int
    double_reduce: int
    double_1: int
    double_2: int
    pool: str
    pool_proj: int


INCEPTION_BLOCKS: tuple[InceptionBlock, ...] = (
    #              block 1x1  3x3r 3x3  d3r  d3_1 d3_2 pool     proj
    InceptionBlock("3a",  64,  64,  64,  64,  96,  96, "avg",    32),
    InceptionBlock("3b",  64,  64,  96,  64,  96,  96, "avg",    64),
    InceptionBlock("3c",   0, 128, 160,  64,  96,  96, "max/2",   0),
    InceptionBlock("4a", 224,  64,  96,  96, 128, 128, "avg",   128),
    InceptionBlock("4b", 192,  96, 128,  96, 128, 128, "avg",   128),
    InceptionBlock("4c", 160, 128, 160, 128, 160, 160, "avg",   128),
    InceptionBlock("4d",  96, 128, 192, 160, 192, 192, "avg",   128),
    InceptionBlock("4e",   0, 128, 192, 192, 256, 256, "max/2",   0),
    InceptionBlock("5a", 352, 192, 320, 160, 224, 224, "avg",   128),
    InceptionBlock("5b", 352, 192, 320, 192, 224, 224, "max",   128),
)  # fmt: skip

# Stem: (conv name, out channels, kernel, stride), each conv + BN + ReLU; a 3x3/2 max pool after 1 and 3.
STEM: tuple[tuple[str, int, int, int], ...] = (
    ("conv1_7x7_s2", 64, 7, 2),
    ("conv2_3x3_reduce", 64, 1, 1),
    ("conv2_3x3", 192, 3, 1),
)
STEM_POOLS = {"conv1_7x7_s2": "pool1_3x3_s2", "conv2_3x3": "pool2_3x3_s2"}

# A branch: (name of its pool module or None, names of its conv units in order).
Branch = tuple[str | None, tuple[str, ...]]


def _units(block: InceptionBlock) -> list[tuple[str, int, int, int]]:
    """(unit suffix, out channels, kernel, stride) of every conv unit of a block, in branch order."""
    stride = 2 if block.pool == "max/2" else 1
    units = [("1x1", block.c1x1, 1, 1)] if block.c1x1 else []
    units += [("3x3_reduce", block.c3x3_reduce, 1, 1), ("3x3", block.c3x3, 3, stride)]
    units += [("double_3x3_reduce", block.double_reduce, 1, 1), ("double_3x3_1", block.double_1, 3, 1),
              ("double_3x3_2", block.double_2, 3, stride)]
    if block.pool_proj:
        units.append(("pool_proj", block.pool_proj, 1, 1))
    return units


def _branches(block: InceptionBlock) -> list[Branch]:
    p = f"inception_{block.name}_"
    branches: list[Branch] = [(None, (p + "1x1",))] if block.c1x1 else []
    branches.append((None, (p + "3x3_reduce", p + "3x3")))
    branches.append((None, (p + "double_3x3_reduce", p + "double_3x3_1", p + "double_3x3_2")))
    branches.append((p + "pool", (p + "pool_proj",) if block.pool_proj else ()))
    return branches


def block_out_channels(block: InceptionBlock, in_chs: int) -> int:
    """Channels of the block's concatenated output (an unprojected pool passes ``in_chs`` through)."""
    return block.c1x1 + block.c3x3 + block.double_2 + (block.pool_proj or in_chs)


def _pool(kind: str) -> nn.Module:
    if kind == "avg":
        return nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
    if kind == "max":
        return nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
    if kind == "max/2":
        return nn.MaxPool2d(3, stride=2, ceil_mode=True)
    raise ValueError(f"unknown inception pool {kind!r}")


class BNInception(nn.Module):
    """BN-Inception with the Caffe/Cadene parameter names (see the module docstring).

    num_classes: size of ``last_linear`` (1000 for the ImageNet head; 0: no classifier, ``forward``
    returns the pooled 1024-d features). global_pool: timm pool type of ``forward_head`` (the
    Embedder pools the feature map itself). in_chans: input channels (3 for the checkpoint).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        # forward order: ("unit", name) | ("pool", name) | ("block", (block name, branches))
        self._plan: list[tuple[str, object]] = []

        chs = in_chans
        for name, out, k, stride in STEM:
            self._add_unit(name, chs, out, k, stride)
            self._plan.append(("unit", name))
            chs = out
            if name in STEM_POOLS:
                self.add_module(STEM_POOLS[name], nn.MaxPool2d(3, stride=2, ceil_mode=True))
                self._plan.append(("pool", STEM_POOLS[name]))
        for block in INCEPTION_BLOCKS:
            p = f"inception_{block.name}_"
            # the 1x1 reduces read the block input; every later unit reads its predecessor in the branch
            block_in = chs
            prev = None
            for suffix, out, k, stride in _units(block):
                src = block_in if suffix in ("1x1", "3x3_reduce", "double_3x3_reduce", "pool_proj") else prev
                self._add_unit(p + suffix, src, out, k, stride)
                prev = out
            self.add_module(p + "pool", _pool(block.pool))
            self._plan.append(("block", (block.name, _branches(block))))
            chs = block_out_channels(block, block_in)
        if chs != 1024:  # the table must end in the 1024-d map of the checkpoint
            raise AssertionError(f"BN-Inception table ends with {chs} channels, expected 1024")
        self.num_features = self.head_hidden_size = chs

        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.last_linear = self._classifier(num_classes)
        self._init_weights()

    def _add_unit(self, name: str, in_chs: int, out_chs: int, kernel: int, stride: int) -> None:
        self.add_module(name, nn.Conv2d(in_chs, out_chs, kernel, stride=stride, padding=kernel // 2))
        self.add_module(name + "_bn", nn.BatchNorm2d(out_chs, eps=1e-5))

    def _classifier(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return nn.Linear(self.num_features * self.global_pool.feat_mult(), num_classes)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def _unit(self, name: str, x: Tensor) -> Tensor:
        return F.relu(getattr(self, name + "_bn")(getattr(self, name)(x)), inplace=True)

    def _block(self, name: str, branches: Sequence[Branch], x: Tensor) -> Tensor:
        outs = []
        for pool, units in branches:
            y = getattr(self, pool)(x) if pool else x
            for unit in units:
                y = self._unit(unit, y)
            outs.append(y)
        sizes = {tuple(o.shape[-2:]) for o in outs}
        if len(sizes) > 1:
            raise ValueError(
                f"BN-Inception: the branches of block {name} disagree in size {sorted(sizes)} "
                f"for a {tuple(x.shape[-2:])} input map: as in the Caffe model, the grid reductions need even maps, "
                "i.e. input sides of 32k-1 to 32k+6 px (e.g. 96, 224, 227)"
            )
        return torch.cat(outs, dim=1)

    def forward_features(self, x: Tensor) -> Tensor:
        for kind, item in self._plan:
            if kind == "unit":
                x = self._unit(item, x)
            elif kind == "pool":
                x = getattr(self, item)(x)
            else:
                x = self._block(*item, x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.last_linear(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.last_linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.last_linear = self._classifier(num_classes)


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: BNInception) -> dict[str, Tensor]:
    """Cadene-format state dict -> this model's state dict; raises ``ValueError`` on any key mismatch."""
    source = (getattr(model, "pretrained_cfg", None) or {}).get("file") or "the checkpoint"
    target = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("last_linear.") and isinstance(model.last_linear, nn.Identity):
            continue  # the ImageNet classifier; the model has none
        ref = target.get(key)
        if isinstance(value, Tensor) and ref is not None and value.dim() == 2 and value.shape[0] == 1 \
                and ref.dim() == 1 and value.shape[1] == ref.shape[0]:
            value = value.reshape(ref.shape)  # BN vectors stored as (1, C) by the Caffe conversion
        out[key] = value
    for key, ref in target.items():
        if key.endswith("num_batches_tracked") and key not in out:
            out[key] = torch.zeros_like(ref)  # pre-0.4 checkpoints have no BN step counters
    missing = [k for k in target if k not in out]
    unexpected = [k for k in out if k not in target]
    # a classifier of another size is left to timm (dropped when num_classes differs from the cfg's 1000)
    mis_shaped = [
        f"{k} {tuple(out[k].shape)} (model {tuple(target[k].shape)})"
        for k in target
        if k in out and isinstance(out[k], Tensor) and out[k].shape != target[k].shape
        and not k.startswith("last_linear.")
    ]
    if missing or unexpected or mis_shaped:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        problems = [
            f"missing keys: {show(missing)}" if missing else "",
            f"unexpected keys: {show(unexpected)}" if unexpected else "",
            f"shape mismatches: {show(mis_shaped)}" if mis_shaped else "",
        ]
        raise ValueError(
            f"backbone.checkpoint_path: {source} is not a BN-Inception state dict in the layout of "
            f"{CHECKPOINT_FILE} (Cadene's pretrainedmodels key names); "
            + "; ".join(p for p in problems if p)
        )
    return out


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        # Channel order B, G, R and pixel range 0-255: x_255 - (104, 117, 128). timm's transforms produce
        # RGB, so use the project's transform=bninception (which also swaps the channels).
        "mean": (104 / 255, 117 / 255, 128 / 255),
        "std": (1 / 255, 1 / 255, 1 / 255),
        "first_conv": "conv1_7x7_s2",
        "classifier": "last_linear",
        "origin_url": "https://github.com/Cadene/pretrained-models.pytorch",
        "paper_ids": "arXiv:1502.03167",
        "notes": (
            f"No hub weights: pass the local Caffe-converted file {CHECKPOINT_FILE} with "
            "pretrained_cfg_overlay={'file': ...} (Embedder: checkpoint_path).",
            "Input is BGR 0-255 minus (104, 117, 128).",
        ),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"bninception": _cfg()})


def _create_bninception(variant: str, pretrained: bool = False, **kwargs) -> BNInception:
    if kwargs.pop("features_only", False):
        raise ValueError("bninception does not support features_only; use forward_features (1024-d map)")
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant,
            pretrained_cfg=kwargs.get("pretrained_cfg"),
            pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
        )
        if not (cfg.file or cfg.state_dict or cfg.url or cfg.hf_hub_id):
            raise ValueError(
                f"bninception has no downloadable weights: pretrained=True needs a local copy of "
                f"{CHECKPOINT_FILE} (Cadene's pretrainedmodels), given as backbone.checkpoint_path=<file> "
                "(timm: pretrained_cfg_overlay={'file': <file>})"
            )
    else:
        _logger.warning(
            "bninception: random initialisation; the papers fine-tune the ImageNet weights %s "
            "(backbone.checkpoint_path)", CHECKPOINT_FILE,
        )
    return build_model_with_cfg(
        BNInception, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )


@register_model
def bninception(pretrained: bool = False, **kwargs) -> BNInception:
    """BN-Inception (Ioffe & Szegedy 2015), Caffe/Cadene layout; weights only from a local file."""
    return _create_bninception("bninception", pretrained=pretrained, **kwargs)
