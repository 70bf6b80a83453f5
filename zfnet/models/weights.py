"""Model registry, weights records and `load_model`: how a name or a user factory becomes a ready model.

A weights record says where published weights live (URL + sha256), how images must be preprocessed for
them and what the classes are, so `predict`, the atlas and every experiment preprocess consistently.
torchvision builders also take torchvision's own weight names (`--weights IMAGENET1K_V2`, `DEFAULT`,
`ResNet50_Weights.IMAGENET1K_V2`): they resolve through torchvision's API, with the preprocessing and
categories those weights declare.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..core.errors import ZfnetError
from ..core.results import load_tensors
from ..data.images import IMAGENET_MEAN, IMAGENET_STD
from .networks import ALEXNET_TORCHVISION_KEYS, alexnet, squeezenet1_1, zfnet

__all__ = ["Weights", "MODELS", "WEIGHTS", "load_model", "model_meta", "imagenet_classes", "imagenet_wnids",
           "WEIGHTS_ENV", "check_finite", "torchvision_record"]

WEIGHTS_ENV = "ZFNET_WEIGHTS"  # names a local weights file when there is no internet


@lru_cache(maxsize=1)
def _imagenet_table() -> tuple[tuple[str, str], ...]:
    text = resources.files("zfnet").joinpath("assets/imagenet_classes.tsv").read_text()
    return tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if line)


def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 class names in class-index order."""
    return tuple(name for _, name in _imagenet_table())


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 WordNet ids (n01440764, ...) in class-index order: how ImageNet names its files
    and folders."""
    return tuple(wnid for wnid, _ in _imagenet_table())


@dataclass(frozen=True)
class Weights:
    """A weights record (as torchvision's): where, how to preprocess, what the outputs mean."""

    url: str | None = None
    sha256: str | None = None  # digest of the file at `url`, or its leading hex digits (torchvision puts 8 in the name)
    preprocessing: str = "torchvision"  # "torchvision" or "paper" (see zfnet.data.images)
    categories: tuple[str, ...] | None = None
    key_map: dict = field(default_factory=dict)  # published key prefix -> our module name
    metrics: dict = field(default_factory=dict)
    mean_image: torch.Tensor | None = None  # (3, 256, 256): the paper's per-pixel mean, from a checkpoint
    name: str | None = None  # torchvision's name of these weights, e.g. "ResNet50_Weights.IMAGENET1K_V2"
    # The torchvision preset's geometry and normalization (what torchvision's weights transforms declare).
    resize_size: int = 256
    crop_size: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bilinear"


MODELS: dict[str, Callable[..., nn.Module]] = {
    "zfnet": zfnet,
    "alexnet": alexnet,
    "alexnet2": lambda **kw: alexnet(groups=2, **kw),
    "alexnet_torchvision": lambda **kw: alexnet(layout="torchvision", **kw),
    "squeezenet1_1": squeezenet1_1,
}

WEIGHTS: dict[str, Weights] = {
    "squeezenet1_1": Weights(
        url="https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
        sha256="b8a52dc0",
        categories=None,  # filled lazily with imagenet_classes()
        metrics={"imagenet_top1": 58.178, "imagenet_top5": 80.624},
    ),
    "alexnet_torchvision": Weights(
        url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        sha256="7be5be79",
        key_map=ALEXNET_TORCHVISION_KEYS,
        metrics={"imagenet_top1": 56.522, "imagenet_top5": 79.066},
    ),
}


def model_meta(model: nn.Module) -> Weights:
    """The weights record attached by `load_model` (a plain torchvision-preprocessing one otherwise)."""
    return getattr(model, "zfnet_weights", None) or Weights()


_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def _build(spec: str, num_classes: int | None) -> nn.Module:
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if spec in MODELS:
        return MODELS[spec](**kwargs)
    if ":" in spec:
        if not _FACTORY.match(spec):
            raise ZfnetError(f"bad model {spec!r}: expected package.module:factory (e.g. mypkg.nets:resnet), "
                             f"or one of {', '.join(MODELS)}")
        mod_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ZfnetError(f"cannot import model factory {spec!r}: {e}") from None
        except (Exception, SystemExit) as e:  # the user's module fails while it is imported
            raise ZfnetError(f"importing model factory {spec} raised {type(e).__name__}: {_first_line(e)}") from e
        try:
            model = factory(**kwargs)
        except (Exception, SystemExit) as e:  # the user's code: report it as theirs (the traceback under --debug)
            raise ZfnetError(f"model factory {spec} raised {type(e).__name__}: {_first_line(e)}") from e
        if not isinstance(model, nn.Module):
            raise ZfnetError(f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module")
        return model
    raise ZfnetError(f"unknown model {spec!r}; known: {', '.join(MODELS)}, or package.module:factory")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else "(no message)"


def _fetch(url: str, sha256: str | None) -> str:
    """Download once into the torch.hub cache (hash-checked), or explain how to work offline.

    Without a known digest, a `name-<hex>.pth` file name gives the expected sha256 prefix (torch.hub's rule).
    """
    name = os.path.basename(url)
    if sha256 is None:
        m = re.search(r"-([a-f0-9]{8,})\.", name)
        sha256 = m.group(1) if m else None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(cached) + ".part", hash_prefix=sha256, progress=True)
            os.replace(str(cached) + ".part", cached)
        except RuntimeError as e:  # torch.hub's hash mismatch
            raise ZfnetError(f"downloaded weights from {url} failed the sha256 check: {str(e)[:160]}") from None
        except Exception as e:  # no network, proxy, HTTP error: all mean "give us a file instead"
            raise ZfnetError(f"cannot download weights from {url} ({type(e).__name__}); offline, pass "
                             f"--weights FILE or set {WEIGHTS_ENV}=FILE") from None
    return str(cached)


def _read_state(path: str) -> tuple[dict, dict]:
    """(state_dict, extras) from a plain state_dict or a zfnet checkpoint {"model": ..., "mean_image": ...}."""
    obj = load_tensors(path, "weights file")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"], obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise ZfnetError(f"weights file {path} holds no state_dict")


def _apply_key_map(state: dict, key_map: dict) -> dict:
    if not key_map:
        return state
    out = {}
    for k, v in state.items():
        prefix, _, rest = k.rpartition(".")
        out[f"{key_map.get(prefix, prefix)}.{rest}"] = v
    return out


def _load_state(model: nn.Module, state: dict, source: str, spec: str):
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"shape mismatch at {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise ZfnetError(f"weights {source} do not fit model {spec}: {'; '.join(parts)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def check_finite(state: dict, source: str, allow: bool = False) -> list[str]:
    """The names of the tensors in `state` holding NaN or Infinity; unless `allow`, a ZfnetError naming them
    (a diverged training run or a corrupted file: every output of the model would be NaN)."""
    bad = []
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            counts = {"NaN": int(torch.isnan(v).sum()), "Inf": int(torch.isinf(v).sum())}
            bad.append(f"{k} ({', '.join(f'{n} {kind}' for kind, n in counts.items() if n)})")
    if bad and not allow:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ZfnetError(f"weights {source} hold NaN or Infinity in {len(bad)} tensor(s): {', '.join(bad[:3])}"
                         f"{more}; pass --allow-nonfinite-weights (load_model(..., allow_nonfinite=True)) to load "
                         f"them anyway")
    return bad


def load_model(spec: str | nn.Module, weights: str | None = None, *, num_classes: int | None = None,
               device: str | torch.device = "cpu", allow_nonfinite: bool = False) -> nn.Module:
    """Build a model by registry name or `package.module:factory` and load its weights.

    Args:
        spec: a name from MODELS, "package.module:factory", or an nn.Module (used as is).
        weights: None (random init), "default" (the published weights: the file named by $ZFNET_WEIGHTS
            if set, else downloaded once via torch.hub and hash-checked), a local path, or a URL. For a
            torchvision builder ("torchvision.models:resnet50") also torchvision's weight names
            ("IMAGENET1K_V2", "DEFAULT", "ResNet50_Weights.IMAGENET1K_V2"); "default" is its DEFAULT.
        allow_nonfinite: load weights holding NaN or Infinity (refused by default: every output would be NaN).
    Returns: the model in eval mode, with its weights record at `model.zfnet_weights`.
    """
    named = _torchvision_weights(spec, weights)
    if named is not None:
        return _load_torchvision(spec, named, num_classes).to(device).eval()
    model = spec if isinstance(spec, nn.Module) else _build(spec, num_classes)
    name = spec if isinstance(spec, str) else type(spec).__name__
    record = WEIGHTS.get(name, Weights())
    if record.categories is None and name in WEIGHTS:
        record = replace(record, categories=imagenet_classes())
    if weights == "default":
        weights = os.environ.get(WEIGHTS_ENV) or record.url
        if weights is None:
            raise ZfnetError(f"model {name} has no published weights; pass --weights FILE")
    if weights is not None:
        weights = str(weights)
        if weights.startswith(("http://", "https://", "file://")):
            path = _fetch(weights, record.sha256 if weights == record.url else None)
        else:
            path = weights
        state, extras = _read_state(path)
        check_finite(state, weights, allow=allow_nonfinite)
        _load_state(model, _apply_key_map(state, record.key_map), weights, name)
        if isinstance(extras.get("mean_image"), torch.Tensor):  # a zfnet training checkpoint
            record = replace(record, preprocessing="paper", mean_image=extras["mean_image"])
        if isinstance(extras.get("categories"), (list, tuple)):
            record = replace(record, categories=tuple(extras["categories"]))
    model.zfnet_weights = record
    return model.to(device).eval()



# ----------------------------------------------------------------------------------------------------
# torchvision's weights by name.
_WEIGHT_NAME = re.compile(r"^(?:(?P<enum>[A-Za-z_]\w*_Weights)\.)?(?P<value>[A-Za-z_]\w*)$")


def _torchvision_builder(spec):
    """The torchvision builder that `spec` ("torchvision.models:resnet50") names, else None."""
    if not isinstance(spec, str) or ":" not in spec:
        return None
    mod_name, _, attr = spec.partition(":")
    if mod_name != "torchvision" and not mod_name.startswith("torchvision."):
        return None
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ZfnetError(f"cannot import model factory {spec!r}: {e}") from None


def _torchvision_weights(spec, weights):
    """torchvision's weights enum member that `weights` names for the builder `spec`; None when `spec` is
    not a torchvision builder or `weights` is a file, a URL, none, or "default" with $ZFNET_WEIGHTS set."""
    if not isinstance(weights, str) or weights.startswith(("http://", "https://", "file://")):
        return None
    if weights == "default":
        if os.environ.get(WEIGHTS_ENV):
            return None
        weights = "DEFAULT"
    m = _WEIGHT_NAME.match(weights)
    if m is None or os.path.exists(weights):
        return None
    builder = _torchvision_builder(spec)
    if builder is None:
        return None
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(builder)
    except ValueError:
        raise ZfnetError(f"{spec} declares no torchvision weights; pass --weights FILE") from None
    names = ", ".join(dict.fromkeys([*enum.__members__, "DEFAULT"]))
    if m.group("enum") and m.group("enum") != enum.__name__:
        raise ZfnetError(f"--weights {weights}: these are not weights of {spec} ({enum.__name__}: {names})")
    value = m.group("value")
    member = enum.__members__.get(value) or enum.__members__.get(value.upper())
    if member is None:
        raise ZfnetError(f"--weights {weights}: {spec} has no such weights (choose from {names}, a file or a URL)")
    return member


def torchvision_record(member) -> Weights:
    """zfnet's weights record of a torchvision weights enum member: URL and hash prefix, categories,
    ImageNet metrics, and the preprocessing its transforms declare (resize, crop, mean/std, filter)."""
    t = member.transforms()
    crop, resize = getattr(t, "crop_size", None), getattr(t, "resize_size", None)
    if not crop or not resize:
        raise ZfnetError(f"{type(member).__name__}.{member.name}: its preprocessing ({type(t).__name__}) is not "
                         f"a resize and centre crop; zfnet handles image-classification weights")
    digest = re.search(r"-([a-f0-9]{8,})\.", os.path.basename(member.url))
    metrics = member.meta.get("_metrics", {}).get("ImageNet-1K", {})
    categories = member.meta.get("categories")
    return Weights(url=member.url, sha256=digest.group(1) if digest else None,
                   categories=tuple(categories) if categories else None,
                   metrics={f"imagenet_{k.replace('acc@', 'top')}": v for k, v in metrics.items()},
                   name=f"{type(member).__name__}.{member.name}", resize_size=int(resize[0]), crop_size=int(crop[0]),
                   mean=tuple(float(v) for v in t.mean), std=tuple(float(v) for v in t.std),
                   interpolation=str(getattr(t.interpolation, "value", t.interpolation)))


@contextmanager
def _weights_only(enum):
    """While torchvision's builder loads `enum` weights: torch.load(weights_only=True) (torchvision's own
    get_state_dict unpickles anything), hash-checked downloads, torch.hub's download line on stderr (stdout
    may be --json), and one-line errors. Not thread-safe: it swaps a method of the enum class."""
    own = enum.__dict__.get("get_state_dict")
    original = enum.get_state_dict

    def get_state_dict(self, *args, **kwargs):
        kwargs.update(weights_only=True, check_hash=True)
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(self.url))
        try:
            with redirect_stdout(sys.stderr):
                return original(self, *args, **kwargs)
        except Exception as e:
            what = f"{type(self).__name__}.{self.name}"
            if isinstance(e, RuntimeError) and "hash" in str(e):  # torch.hub's check of a fresh download
                raise ZfnetError(f"downloaded weights {what} from {self.url} failed the sha256 check") from None
            if os.path.exists(cached):  # the file is there, but holds more than plain tensors, or is broken
                raise ZfnetError(f"cannot load {what} from {cached}: {str(e).splitlines()[0][:160]}") from None
            raise ZfnetError(f"cannot download {what} from {self.url} ({type(e).__name__}); offline, put that "
                             f"file at {cached} or pass --weights FILE") from None

    enum.get_state_dict = get_state_dict
    try:
        yield
    finally:
        if own is not None:
            enum.get_state_dict = own
        else:
            del enum.get_state_dict


def _load_torchvision(spec: str, member, num_classes: int | None) -> nn.Module:
    """Build with torchvision's builder and its weights, so every adjustment the builder makes for them
    (Inception's transform_input, DenseNet's legacy keys, auxiliary heads) is made as torchvision makes it."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    with _weights_only(type(member)):
        try:
            model = _torchvision_builder(spec)(weights=member, **kwargs)
        except ValueError as e:  # e.g. num_classes that does not fit the weights
            raise ZfnetError(f"{spec} with weights {member}: {e}") from None
    model.zfnet_weights = torchvision_record(member)
    return model
