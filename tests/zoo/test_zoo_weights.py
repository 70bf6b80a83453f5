"""torchvision weights by name (`--weights IMAGENET1K_V2`, `DEFAULT`, `ResNet50_Weights.IMAGENET1K_V2`),
without network: a state_dict saved where torch.hub's cache keeps the download stands in for it."""

import os
import pickle
import urllib.error

import pytest
import torch

from zfnet.core.errors import ZfnetError
from zfnet.data.images import Preprocess, load_image
from zfnet.models import weights as W
from zfnet.models.weights import load_model

# Imported at collection: without torchvision the main suite skips this file instead of failing to collect it.
torchvision = pytest.importorskip("torchvision", reason="the model zoo needs torchvision: run `make zoo`")
get_model_weights = torchvision.models.get_model_weights


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """TORCH_HOME in a temporary folder; any download attempt fails as it would offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)

    def offline(url, *a, **k):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


def stand_in(hub, member, state):
    hub.mkdir(parents=True, exist_ok=True)
    path = hub / os.path.basename(member.url)
    torch.save(state, path)
    return path


def random_state(arch, seed=0, **kw):
    torch.manual_seed(seed)
    return torchvision.models.get_model(arch, weights=None, **kw).state_dict()


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "imagenet1k_v1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1",
                                  "default"])
def test_resnet18_weights_by_name_load_the_cached_file(hub, name):
    member = torchvision.models.ResNet18_Weights.IMAGENET1K_V1  # also resnet18's DEFAULT
    state = random_state("resnet18")
    stand_in(hub, member, state)
    m = load_model("torchvision.models:resnet18", name)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    rec = m.zfnet_weights
    assert rec.name == "ResNet18_Weights.IMAGENET1K_V1" and rec.url == member.url and rec.sha256 == "f37072fd"
    assert rec.categories == tuple(member.meta["categories"]) and rec.categories[0] == "tench"
    assert rec.metrics == {"imagenet_top1": 69.758, "imagenet_top5": 89.078}
    assert not m.training


def test_resnet50_v2_declares_its_own_preprocessing(hub):
    member = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    stand_in(hub, member, random_state("resnet50"))
    m = load_model("torchvision.models:resnet50", "ResNet50_Weights.IMAGENET1K_V2")
    pre = Preprocess.for_model(m)
    assert (pre.resize, pre.size, pre.interpolation) == (232, 224, "bilinear")  # not the 256 / 224 of V1
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("arch,name", [("resnet50", "IMAGENET1K_V2"), ("efficientnet_b0", "IMAGENET1K_V1"),
                                       ("inception_v3", "IMAGENET1K_V1"), ("convnext_tiny", "IMAGENET1K_V1")])
def test_preprocessing_equals_the_weights_transforms_on_real_photos(arch, name, imagenet_samples):
    # EfficientNet: bicubic, ConvNeXt: bilinear from 236, Inception: 342 -> 299: against torchvision's own
    # transforms on photos of every shape (and grayscale ones) in the shared sample.
    member = get_model_weights(arch)[name]
    rec = W.torchvision_record(member)
    ours = Preprocess(size=rec.crop_size, resize=rec.resize_size, mean=rec.mean, std=rec.std,
                      interpolation=rec.interpolation)
    theirs = member.transforms()
    for path in sorted(imagenet_samples.iterdir())[::97]:
        im = load_image(path)
        torch.testing.assert_close(ours(im), theirs(im), rtol=0, atol=1e-6)


def test_builder_adjustments_for_its_weights_are_kept(hub):
    # GoogLeNet's weights expect transform_input=True, which its builder sets only when given the weights;
    # DenseNet's published files use legacy key names ("norm.1") that its builder renames.
    g = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
    torch.manual_seed(0)
    stand_in(hub, g, torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict())
    assert load_model("torchvision.models:googlenet", "IMAGENET1K_V1").transform_input is True
    d = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
    state = random_state("densenet121")
    legacy = {k.replace(".norm1.", ".norm.1.").replace(".conv1.", ".conv.1.").replace(".norm2.", ".norm.2.")
              .replace(".conv2.", ".conv.2.") if "denselayer" in k and "num_batches" not in k else k: v
              for k, v in state.items()}
    assert legacy != state
    stand_in(hub, d, legacy)
    m = load_model("torchvision.models:densenet121", "DEFAULT")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())


def test_offline_without_the_file_says_where_to_put_it(hub):
    with pytest.raises(ZfnetError, match=r"cannot download ResNet18_Weights.IMAGENET1K_V1 .*offline, put that "
                                         r"file at .*resnet18-f37072fd.pth or pass --weights FILE"):
        load_model("torchvision.models:resnet18", "IMAGENET1K_V1")


class NotATensor:
    pass


def test_a_file_with_more_than_tensors_is_refused(hub):
    member = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = stand_in(hub, member, {"fc.weight": NotATensor()})
    with pytest.raises(ZfnetError, match=f"cannot load ResNet18_Weights.IMAGENET1K_V1 from {path}"):
        load_model("torchvision.models:resnet18", "IMAGENET1K_V1")
    assert pickle.loads(pickle.dumps(NotATensor()))  # the object itself is harmless; weights_only refuses it


def test_wrong_names_are_one_line_errors(hub):
    with pytest.raises(ZfnetError, match="no such weights .*IMAGENET1K_V1, DEFAULT"):
        load_model("torchvision.models:resnet18", "IMAGENET1K_V9")
    with pytest.raises(ZfnetError, match="not weights of torchvision.models:resnet18 .ResNet18_Weights"):
        load_model("torchvision.models:resnet18", "ResNet50_Weights.IMAGENET1K_V2")
    with pytest.raises(ZfnetError, match="weights file"):  # a file name that does not exist stays a file name
        load_model("torchvision.models:resnet18", "resnet18.pth")


def test_env_file_still_wins_over_default(hub, tmp_path, monkeypatch):
    state = random_state("resnet18", seed=3)
    torch.save(state, tmp_path / "mine.pth")
    monkeypatch.setenv(W.WEIGHTS_ENV, str(tmp_path / "mine.pth"))
    m = load_model("torchvision.models:resnet18", "default")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    assert m.zfnet_weights.name is None  # a file of unknown origin: no torchvision record claimed for it
