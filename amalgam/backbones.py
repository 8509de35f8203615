"""Build any timm model (or any nn.Module by class path), tap its features uniformly, load local weights safely.

A *tap* names where features are read:
- ``"pooled"``: the pre-logits vector (``forward_head(..., pre_logits=True)``), width ``head_hidden_size``;
- a stage name from ``model.feature_info`` (``"layer4"`` for a ResNet, ``"blocks.5"`` for a ViT,
  ``"stages.3"`` for a ConvNeXt, ``"layers.1"`` for a Swin): an NCHW map from ``forward_intermediates``;
- an integer index into ``feature_info`` (``-1`` is the last stage).
Models that are not timm models are tapped with forward hooks on the named module (``dict(named_modules())``).
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from amalgam.checkpointing import not_a_file_error, refusal_reason, refuses_code, unreadable_message

Tap = str | int
POOLED = "pooled"


def build_model(arch: str, num_classes: int, model_kwargs: dict[str, Any] | None = None,
                owner: str = "model") -> nn.Module:
    """A timm architecture name, or a dotted ``package.module.Class`` path to any nn.Module.

    Never downloads: weights come from local checkpoints (``load_weights``). ``owner`` names the network in errors.
    """
    kwargs = dict(model_kwargs or {})
    if "." in arch and not timm.is_model(arch):
        module_name, _, class_name = arch.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"{owner}: cannot import model class {arch!r}: {err}. Give a timm model name "
                             f"(timm.list_models()) or an importable 'package.module.Class'.") from err
        return cls(num_classes=num_classes, **kwargs)
    if not timm.is_model(arch):
        # Spelling neighbours catch typos ("resnet10tt"); the family glob, names that only share a stem.
        close = (difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
                 or timm.list_models(f"*{arch.split('_')[0]}*")[:8])
        hint = f"Did you mean one of {close}?" if close else "timm.list_models() lists the valid names."
        raise ValueError(f"{owner}: unknown architecture {arch!r}, not a timm model name. {hint} "
                         f"Fix its 'arch'.")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


# --------------------------------------------------------------------------------------------------------
# Feature taps


@dataclass
class Features:
    """What one network produced for a batch: features per tap (in tap order) and logits."""

    taps: list[Tensor]
    logits: Tensor


def classifier_of(model: nn.Module) -> nn.Module | None:
    """The model's head: timm's ``get_classifier()``, else the last ``nn.Linear`` of a plain module (None
    when it has none)."""
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def is_timm_model(model: nn.Module) -> bool:
    return hasattr(model, "forward_intermediates") and hasattr(model, "feature_info")


def valid_taps(model: nn.Module) -> list[str]:
    if is_timm_model(model):
        return [POOLED] + [info["module"] for info in model.feature_info]
    # A plain module: any submodule's output, and "pooled", the input of its head (last Linear) when it has one.
    pooled = [POOLED] if classifier_of(model) is not None else []
    return pooled + [name for name, _ in model.named_modules() if name]


class FeatureTapper:
    """Runs a model once and returns its logits together with the features at the requested taps."""

    def __init__(self, model: nn.Module, taps: Sequence[Tap], owner: str = "model") -> None:
        self.model = model
        self.taps = list(taps)
        self.owner = owner
        self.timm = is_timm_model(model)
        names = valid_taps(model)
        self._stage_index: dict[int, int] = {}  # position in self.taps -> feature_info index
        for pos, tap in enumerate(self.taps):
            if self.timm and tap == POOLED:
                continue
            if self.timm and isinstance(tap, int):
                n = len(model.feature_info)
                if not -n <= tap < n:
                    raise ValueError(f"{owner}: tap index {tap} is out of range for {n} stages; "
                                     f"valid taps: {names}")
                self._stage_index[pos] = tap % n
            elif tap in names:
                if self.timm:
                    self._stage_index[pos] = names.index(tap) - 1
            else:
                raise ValueError(f"{owner}: unknown tap {tap!r}. Valid taps: {names}")

    def __call__(self, x: Tensor) -> Features:
        if not self.timm:
            return self._hooked(x)
        model = self.model
        maps: dict[int, Tensor] = {}
        if self._stage_index:
            indices = sorted(set(self._stage_index.values()))
            final, inter = model.forward_intermediates(x, indices=indices, intermediates_only=False)
            maps = dict(zip(indices, inter))
        else:
            final = model.forward_features(x)
        pooled = model.forward_head(final, pre_logits=True)
        # The model's own head, not get_classifier()(pooled): it also holds heads that are not one layer
        # (distilled ViTs' two, conv-fc heads) and the head's dropout, as the exported model runs it.
        logits = model.forward_head(final)
        taps = [pooled if pos not in self._stage_index else maps[self._stage_index[pos]]
                for pos in range(len(self.taps))]
        return Features(taps, logits)

    def _hooked(self, x: Tensor) -> Features:
        modules = dict(self.model.named_modules())
        captured: dict[str, Tensor] = {}
        handles = [modules[str(t)].register_forward_hook(
            lambda _m, _i, out, name=str(t): captured.__setitem__(name, out)) for t in self.taps if t != POOLED]
        if POOLED in self.taps:  # what the head reads
            handles.append(classifier_of(self.model).register_forward_pre_hook(
                lambda _m, inputs: captured.__setitem__(POOLED, inputs[0].flatten(1))))
        try:
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        return Features([tokens_to_map(captured[str(t)]) for t in self.taps], logits)


def tokens_to_map(x: Tensor) -> Tensor:
    """NCHW stays; ``[B, L, C]`` tokens become an NCHW map, dropping leading prefix (class/register) tokens."""
    if x.ndim != 3:
        return x
    b, n, c = x.shape
    side = math.isqrt(n)
    prefix = n - side * side
    return x[:, prefix:].transpose(1, 2).reshape(b, c, side, side)


def tap_shapes(model: nn.Module, taps: Sequence[Tap], input_size: int, owner: str) -> list[tuple[int, ...]]:
    """Per-sample shapes of the tapped features, from one dry run on a 2-image batch."""
    tapper = FeatureTapper(model, taps, owner)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            weight = next(model.parameters())
            feats = tapper(torch.zeros(2, 3, input_size, input_size, device=weight.device, dtype=weight.dtype))
    except (RuntimeError, AssertionError) as err:  # timm's patch embeddings assert their image size
        hint = ("Give it the input_size it was built for, or build it for this one (model_kwargs: img_size)"
                if isinstance(err, AssertionError) else "Set a larger input_size for it")
        raise ValueError(f"{owner}: the model does not run on {input_size}x{input_size} inputs ({err}). "
                         f"{hint}.") from err
    finally:
        model.train(was_training)
    return [tuple(f.shape[1:]) for f in feats.taps]


# --------------------------------------------------------------------------------------------------------
# Safe weight loading

def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors from .safetensors, or from .pth/.pt/.bin/.ckpt through ``torch.load(weights_only=True)``.

    Never unpickles code: a checkpoint that needs arbitrary objects is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise not_a_file_error(path, "Check the path in your config.")
    if path.suffix.lower() == ".safetensors" or _looks_like_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"Checkpoint {str(path)!r} is not a readable safetensors file: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not refuses_code(path, err):  # truncated, corrupt, or no checkpoint at all: nothing to run
            raise ValueError(unreadable_message(path, err)) from err
        raise ValueError(
            f"Refused to load {str(path)!r}: it is not a plain tensor checkpoint ({type(err).__name__}: "
            f"{refusal_reason(err)}). Loading it would mean running pickled code. "
            f"Re-save its state_dict with safetensors (safetensors.torch.save_file) or as plain tensors."
        ) from err
    for key in ("state_dict", "model", "model_state_dict", "module"):  # Lightning / common trainers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if isinstance(obj, dict):  # modules' extra state (e.g. a loss's memory bank) holds no weights
        obj = {k: v for k, v in obj.items() if not k.endswith("._extra_state")}
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"Checkpoint {str(path)!r} holds no state_dict of tensors.")
    return obj


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file under another name (a hub cache blob has none): an 8-byte little-endian header
    length, then the JSON header's ``{``. PyTorch's zip files start with ``PK``, its legacy pickles with 0x80."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def saved_hyperparameters(path: str | Path, key: str = "hyper_parameters") -> dict[str, Any]:
    """A Lightning ``.ckpt``'s ``hyper_parameters`` (or another mapping entry: ``key``; {} for other files or
    none), its tensors left unread."""
    path = Path(path)
    if path.suffix != ".ckpt" or not path.is_file():
        return {}
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable or refused: loading the weights reports it
        return {}
    saved = checkpoint.get(key) if isinstance(checkpoint, dict) else None
    return dict(saved) if isinstance(saved, dict) else {}


def strip_prefix(state: dict[str, Tensor], expected: set[str], prefix: str | None = None) -> dict[str, Tensor]:
    """Drop a wrapper prefix (``model.``, ``net.model.``, ``module.``...) so keys meet the model's own keys:
    ``prefix`` when given, else the one under which most of the model's keys are found."""
    if prefix:
        if not any(k.startswith(prefix) for k in state):
            found = sorted({k.rsplit(".", 1)[0].split(".")[0] + "." for k in state})[:8]
            raise ValueError(f"no key of the checkpoint starts with {prefix!r}; its keys start with {found}")
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if expected & state.keys():
        return state
    votes: dict[str, int] = {}
    for key in state:
        for i, char in enumerate(key):
            if char == "." and key[i + 1:] in expected:
                votes[key[: i + 1]] = votes.get(key[: i + 1], 0) + 1
    if not votes:
        return state
    best = max(votes.values())
    tied = sorted(p for p, n in votes.items() if n == best)
    if len(tied) > 1:  # e.g. a model and its EMA copy, or a teacher and a student of one architecture
        raise ValueError(f"the checkpoint holds the model's weights under several prefixes {tied}: name the "
                         f"one to load with checkpoint_prefix (e.g. checkpoint_prefix: {tied[0]!r}).")
    return {k[len(tied[0]):]: v for k, v in state.items() if k.startswith(tied[0])}


def load_weights(model: nn.Module, path: str | Path, owner: str, num_classes: int | None = None,
                 prefix: str | None = None) -> None:
    """Load a local checkpoint into ``model`` strictly, with errors that name the owner and the keys.
    ``prefix``: the wrapper prefix of the keys to load (default: found from the model's own key names)."""
    own = model.state_dict()
    try:
        state = strip_prefix(read_state_dict(path), set(own), prefix)
    except (OSError, ValueError) as err:  # a missing file, a folder, an unreadable or refused file
        where = "" if str(path) in str(err) else f" (checkpoint {str(path)!r})"
        raise type(err)(f"{owner}: {err}{where}") from err
    for key in set(own) - set(state):
        if key.endswith(".num_batches_tracked"):  # older and converted files lack it; eval-mode BN never reads it
            state[key] = own[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if not (set(own) & set(state)):
        raise ValueError(f"{owner}: checkpoint {str(path)!r} shares no parameter names with the model; "
                         f"is it the right architecture? Model keys start {sorted(own)[:3]}, "
                         f"checkpoint keys start {sorted(state)[:3]}.")
    mismatched = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if mismatched:
        head = _head_mismatch(model, state, own, mismatched)
        if head is not None and num_classes is not None:
            raise ValueError(f"{owner}: the checkpoint's head has {head} outputs but {num_classes} class "
                             f"names were given ({str(path)!r}). Give exactly the classes it was trained on.")
        detail = ", ".join(f"{k}: model {tuple(own[k].shape)} vs checkpoint {tuple(state[k].shape)}"
                           for k in sorted(mismatched)[:5])
        raise ValueError(f"{owner}: checkpoint {str(path)!r} does not fit the architecture ({detail}).")
    if missing or unexpected:
        shared = len(set(own) & set(state))
        # Families share a few names (a "head.fc" here, a "norm" there): a low overlap means another architecture.
        hint = (f" Only {shared} of the model's {len(own)} keys are in it: is it the right architecture "
                f"(arch, model_kwargs)?" if shared < len(own) / 2 else "")
        raise ValueError(f"{owner}: checkpoint {str(path)!r} does not match the model: "
                         f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                         f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}.{hint}")
    model.load_state_dict(state)


def _head_mismatch(model: nn.Module, state: dict, own: dict, mismatched: list[str]) -> int | None:
    """The checkpoint's class count when the only mismatch is the classifier head."""
    try:
        head = model.get_classifier()
    except AttributeError:
        return None
    head_keys = {name for name, module in model.named_modules() if module is head}
    prefix = next(iter(head_keys), None)
    if prefix is None or not all(k.startswith(prefix + ".") for k in mismatched):
        return None
    weight = state.get(prefix + ".weight")
    return int(weight.shape[0]) if weight is not None else None


def default_preprocessing(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Input size, mean and std from a timm model's pretrained config (ImageNet defaults otherwise)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    return int(size), tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs as one matrix product on maps with no more pixels than its kernel has taps.

    A ResNet's last stages at 28-32 px inputs see 2x2 and 1x1 maps, where most kernel taps meet only zero
    padding and CPU convolution kernels are at their slowest (the backward of a 3x3 conv on a 1x1 map took
    15x its forward). Unrolled into a dense ``[C_out x out pixels, C_in x in pixels]`` matrix, the kernel
    computes the same sums, and gets the same gradients, in one GEMM: this made the 28 px demo's step
    about 1.3x faster on CPU (benchmarks/RESULTS.md). Larger maps run the ordinary convolution.
    """

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h * w > self.kernel_size[0] * self.kernel_size[1]:
            return super().forward(x)
        select, out_size = self._selection(h, w, self.weight)
        if min(out_size) < 1:  # kernel larger than the padded map: the convolution's own error says so
            return super().forward(x)
        c_out, c_in = self.weight.shape[:2]
        # One-hot selection (exact): each (output pixel, input pixel) pair's tap, then rows and columns
        # ordered (channel, pixel) like the flattened NCHW maps.
        matrix = (self.weight.flatten(2) @ select).view(c_out, c_in, -1, h * w).transpose(1, 2)
        matrix = matrix.reshape(-1, c_in * h * w)  # [C_out * P_out, C_in * P_in]
        bias = None if self.bias is None else self.bias.repeat_interleave(out_size[0] * out_size[1])
        return nn.functional.linear(x.flatten(1), matrix, bias).view(x.shape[0], c_out, *out_size)

    def _selection(self, h: int, w: int, like: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``[taps, P_out * P_in]``: 1 where the kernel tap joins the (output pixel, input pixel) pair."""
        if torch.compiler.is_compiling():  # traced once into the graph; a cache there would be a side effect
            return self._build_selection(h, w, like)
        cache = self.__dict__.setdefault("_selection_cache", {})  # not a buffer: no state-dict entry
        key = (h, w, like.device, like.dtype)
        if key not in cache:
            cache[key] = self._build_selection(h, w, like)
        return cache[key]

    def _build_selection(self, h: int, w: int, like: Tensor) -> tuple[Tensor, tuple[int, int]]:
        # Comparisons only, no boolean indexing: shapes never depend on values, so torch.compile traces it
        # without a graph break.
        axes = []
        for n, k, p, d, s in zip((h, w), self.kernel_size, self.padding, self.dilation, self.stride):
            out = (n + 2 * p - d * (k - 1) - 1) // s + 1
            inputs, outputs = torch.arange(n, device=like.device), torch.arange(max(out, 0), device=like.device)
            offset = inputs[None, :] - outputs[:, None] * s + p  # = d * tap
            tap = offset.div(d, rounding_mode="floor")
            axes.append((out, tap, (offset % d == 0) & (tap >= 0) & (tap < k)))
        (ho, tap_y, ok_y), (wo, tap_x, ok_x) = axes
        tap = (tap_y[:, None, :, None] * self.kernel_size[1] + tap_x[None, :, None, :]).flatten()
        ok = (ok_y[:, None, :, None] & ok_x[None, :, None, :]).flatten()
        taps = torch.arange(self.kernel_size[0] * self.kernel_size[1], device=like.device)
        select = (taps[:, None] == tap[None, :]) & ok[None, :]
        return select.to(like.dtype), (ho, wo)


def use_small_map_convs(model: nn.Module) -> nn.Module:
    """Makes every plain ``nn.Conv2d`` of ``model`` a ``SmallMapConv2d``, in place: same parameters, same
    state-dict keys, same results; only maps smaller than the kernel take the matrix-product path."""
    for module in model.modules():
        if (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
                and not isinstance(module.padding, str)):
            module.__class__ = SmallMapConv2d
    return model


class TappedNetwork(nn.Module):
    """A model with its own preprocessing and feature taps: float [0,1] images in, ``Features`` out.

    Each network resizes and normalises the shared batch itself, so teachers of different families
    (ImageNet mean for CNNs, 0.5 for ViTs, other input sizes) all see the same augmented view correctly.
    """

    def __init__(self, arch: str, num_classes: int, taps: Sequence[Tap] = (), input_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 model_kwargs: dict[str, Any] | None = None, owner: str = "model") -> None:
        super().__init__()
        # Checked here: a bad value would otherwise fail in the first step, or turn the loss NaN.
        if input_size is not None and input_size < 1:
            raise ValueError(f"{owner}: 'input_size' is {input_size}; give the side in pixels (at least 1), or "
                             f"leave it out for the model's default")
        for key, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) not in (1, 3):
                raise ValueError(f"{owner}: '{key}' has {len(values)} values {list(values)}; give 1 (all "
                                 f"channels) or 3 (R, G, B)")
        if std is not None and not all(s > 0 for s in std):
            raise ValueError(f"{owner}: 'std' is {list(std)}; every value must be > 0 (the images are divided "
                             f"by it)")
        self.model = use_small_map_convs(build_model(arch, num_classes, model_kwargs, owner))
        size, default_mean, default_std = default_preprocessing(self.model)
        self.input_size = size if input_size is None else int(input_size)
        mean, std = default_mean if mean is None else mean, default_std if std is None else std
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.tapper = FeatureTapper(self.model, taps, owner)

    def preprocess(self, images: Tensor) -> Tensor:
        """Resize and normalise in float32, then hand the network its own weights' dtype: the antialiased
        resize has no bf16 kernel on CPU, and a network held in bf16 (teacher_dtype, bf16-true) takes bf16."""
        images = images.float()
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = nn.functional.interpolate(images, size=(self.input_size, self.input_size),
                                               mode="bilinear", antialias=True, align_corners=False)
        images = (images - self.mean.float()) / self.std.float()
        weight = next(self.model.parameters(), None)
        return images if weight is None or not weight.is_floating_point() else images.to(weight.dtype)

    def forward(self, images: Tensor) -> Features:
        return self.tapper(self.preprocess(images))

    def tap_shapes(self) -> list[tuple[int, ...]]:
        return tap_shapes(self.model, self.tapper.taps, self.input_size, self.tapper.owner)
