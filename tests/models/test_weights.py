"""load_model: registry names, factories, local files, URLs (hash-checked), and clear errors."""

import shutil

import pytest
import torch
from shared_data import SQUEEZENET_WEIGHTS, need_shared

from zfnet.core.errors import ZfnetError
from zfnet.models import weights as W
from zfnet.models.networks import ALEXNET_TORCHVISION_KEYS, alexnet
from zfnet.models.weights import load_model


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)
    return tmp_path / "hub"


def test_url_download_is_hash_checked_and_cached(tmp_path, hub_dir):
    src = need_shared(SQUEEZENET_WEIGHTS)
    good = tmp_path / "squeezenet1_1-3fc5c0c8.pth"  # sha256 prefix of the shared file, torch.hub naming
    shutil.copy(src, good)
    m = load_model("squeezenet1_1", good.as_uri())
    assert (hub_dir / "checkpoints" / good.name).exists()
    ref = load_model("squeezenet1_1", str(src))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    bad = tmp_path / "squeezenet1_1-deadbeef.pth"
    shutil.copy(src, bad)
    with pytest.raises(ZfnetError, match="sha256"):
        load_model("squeezenet1_1", bad.as_uri())
    assert not (hub_dir / "checkpoints" / bad.name).exists()  # nothing half-checked left in the cache


def test_default_weights_offline_message_and_env(tmp_path, hub_dir, monkeypatch):
    rec = W.WEIGHTS["squeezenet1_1"]
    monkeypatch.setitem(W.WEIGHTS, "squeezenet1_1", W.Weights(url="http://127.0.0.1:9/squeezenet1_1-b8a52dc0.pth",
                                                              sha256=rec.sha256))
    with pytest.raises(ZfnetError, match="cannot download weights .* pass --weights FILE or set ZFNET_WEIGHTS"):
        load_model("squeezenet1_1", "default")
    monkeypatch.setenv(W.WEIGHTS_ENV, str(need_shared(SQUEEZENET_WEIGHTS)))
    m = load_model("squeezenet1_1", "default")
    assert m.zfnet_weights.categories[281] == "tabby"


def test_torchvision_alexnet_keys_load(tmp_path):
    ours = alexnet(layout="torchvision").eval()
    back = {v: k for k, v in ALEXNET_TORCHVISION_KEYS.items()}
    tv_state = {f"{back[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v for k, v in ours.state_dict().items()}
    assert "features.0.weight" in tv_state and "classifier.6.bias" in tv_state
    torch.save(tv_state, tmp_path / "alexnet-owt.pth")
    m = load_model("alexnet_torchvision", str(tmp_path / "alexnet-owt.pth"))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(m(x), ours(x))


def test_checkpoint_dict_sets_paper_preprocessing(tmp_path):
    m = load_model("zfnet", None, num_classes=5)
    mean = torch.rand(3, 256, 256)
    torch.save({"model": m.state_dict(), "mean_image": mean, "categories": list("abcde")}, tmp_path / "ck.pt")
    m2 = load_model("zfnet", str(tmp_path / "ck.pt"), num_classes=5)
    assert m2.zfnet_weights.preprocessing == "paper" and torch.equal(m2.zfnet_weights.mean_image, mean)
    assert m2.zfnet_weights.categories == tuple("abcde") and not m2.training


def test_factories_and_errors(tmp_path):
    assert isinstance(load_model("torch.nn:Identity"), torch.nn.Identity)
    assert load_model("zfnet.models:zfnet", num_classes=7).fc8.out_features == 7
    with pytest.raises(ZfnetError, match="unknown model 'resnet9'; known: zfnet"):
        load_model("resnet9")
    with pytest.raises(ZfnetError, match="cannot import model factory"):
        load_model("no_such_pkg.mod:fn")
    with pytest.raises(ZfnetError, match="weights file not found: .*nope.pth"):
        load_model("zfnet", str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(ZfnetError, match="cannot read weights file .*junk.pth"):
        load_model("zfnet", str(tmp_path / "junk.pth"))
    with pytest.raises(ZfnetError, match="do not fit model zfnet: missing .* keys"):
        load_model("zfnet", str(need_shared(SQUEEZENET_WEIGHTS)))


def test_weights_only_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ZfnetError, match="cannot read weights file"):
        load_model("zfnet", str(tmp_path / "evil.pt"))
