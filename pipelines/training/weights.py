"""Where a training's weights come from and go: checkpoint folders and runs, released files, the model built
from them (fresh, or from ``init_from`` with a new zero head and resampled position embeddings)."""

from __future__ import annotations

import posixpath
import tempfile
from pathlib import Path
from typing import Any

import torch

import vit
from pipelines.common.config import ConfigError
from pipelines.common.storage import filesystem
from pipelines.training.config import TrainConfig
from vit.model import VisionTransformer

MODEL_FILE = "model.safetensors"  # the portable weights in every checkpoint: vit.load_model reads them
COMMITTED_FILE = "COMMITTED"  # written once every rank's part of a checkpoint is in storage


def build_model(cfg: TrainConfig, num_classes: int, multi_label: bool) -> VisionTransformer:
    """The model of ``cfg``: fresh, or from ``init_from`` with a new zero head and resampled E_pos."""
    if cfg.init_from is None:
        return VisionTransformer(fresh_model_config(cfg, num_classes, multi_label))
    overrides = _overrides(cfg, num_classes, multi_label)
    path = local_weights(resolve_weights(cfg.init_from, cfg.storage_options), cfg.storage_options)
    if cfg.model is None:
        # The variant of the weights: ours carry their config, released ones (.npz, timm, Hugging Face) show it in
        # their tensors. No representation layer: the paper fine-tunes without it (model_args may ask for one).
        try:
            model = vit.load_model(path, **{"representation_size": None, **overrides})
        except vit.UnknownVariantError as err:
            raise _unknown_variant(cfg, err) from None
    else:
        model = vit.create_model(cfg.model, **{**_representation(cfg, cfg.model), **overrides})
        vit.load_checkpoint(model, path)
    model.reset_head()  # the paper replaces the whole head by a zero-initialised one
    return model


def fresh_model_config(cfg: TrainConfig, num_classes: int, multi_label: bool) -> vit.ViTConfig:
    """The config of the model ``build_model`` builds when ``init_from`` is null."""
    overrides = _overrides(cfg, num_classes, multi_label)
    return vit.model_config(cfg.model, **{**_representation(cfg, cfg.model), **overrides})


def pretrained_weights(
    cfg: TrainConfig, num_classes: int, multi_label: bool
) -> tuple[vit.ViTConfig, dict[str, torch.Tensor]]:
    """``init_from``'s weights as ``build_model`` starts from them, without building the model: the config of
    the model they go into and its tensors under its names (E_pos resampled), the head left out (it starts
    afresh). For a caller that builds the model sharded and loads these into the shards."""
    overrides = _overrides(cfg, num_classes, multi_label)
    path = local_weights(resolve_weights(cfg.init_from, cfg.storage_options), cfg.storage_options)
    # On the meta device the loaded tensors are assigned, not copied: the holder costs no memory of its own.
    if cfg.model is None:
        try:
            holder = vit.load_model(path, device="meta", **{"representation_size": None, **overrides})
        except vit.UnknownVariantError as err:
            raise _unknown_variant(cfg, err) from None
    else:
        holder = vit.create_model(cfg.model, device="meta", **{**_representation(cfg, cfg.model), **overrides})
        vit.load_checkpoint(holder, path)
    return holder.config, {k: v for k, v in holder.state_dict().items() if not k.startswith("head.")}


def _overrides(cfg: TrainConfig, num_classes: int, multi_label: bool) -> dict[str, Any]:
    sigmoid = cfg.loss == "sigmoid" or (cfg.loss == "auto" and multi_label)
    overrides: dict[str, Any] = {"img_size": cfg.data.image_size, "num_classes": num_classes}
    overrides["head_bias_init"] = -10.0 if sigmoid else 0.0  # big_vision's start for sigmoid pretraining
    overrides.update(cfg.model_args)
    return overrides


def init_model_config(cfg: TrainConfig) -> vit.ViTConfig:
    """The config of the weights ``init_from`` holds (with ``model_args``), as ``build_model`` reads them when
    ``model`` is null; a ``ConfigError`` naming the field when they do not say their variant. For the driver,
    to refuse such weights before any worker starts (it reads the weights once more)."""
    path = local_weights(resolve_weights(cfg.init_from, cfg.storage_options), cfg.storage_options)
    try:
        return vit.infer_model_config(path, **cfg.model_args)
    except vit.UnknownVariantError as err:
        raise _unknown_variant(cfg, err) from None


def _unknown_variant(cfg: TrainConfig, err: vit.UnknownVariantError) -> ConfigError:
    return ConfigError(
        f"model: the {err.format} weights {cfg.init_from} do not say their model's variant: their width {err.width} "
        f"is that of no named size and their layout does not give the number of attention heads. Set "
        f"`{cfg.recipe}.model` (`model` for `vit {cfg.recipe}`) to their variant, with `model_args` for the sizes it "
        f"does not share with them, or give the head count: `model_args: {{num_heads: N}}`"
    )


def _representation(cfg: TrainConfig, variant: str) -> dict:
    if not cfg.representation_layer:
        return {}
    return {"representation_size": vit.model_config(variant).width}


def checkpoint_step(path: str) -> int:
    return int(posixpath.basename(path.rstrip("/")).removeprefix("checkpoint-"))


def latest_committed_checkpoint(run_dir: str, storage_options: dict | None = None) -> str | None:
    """The newest checkpoint of a run whose every part reached storage, as a path or URL."""
    fs, path = filesystem(run_dir, storage_options)
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return None
    for name in sorted((n for n in names if n.startswith("checkpoint-")), reverse=True):
        if fs.exists(posixpath.join(path, name, COMMITTED_FILE)):
            return posixpath.join(run_dir, name)
    return None


def resolve_weights(location: str, storage_options: dict | None = None) -> str:
    """A weights file from a file, a checkpoint folder (its model.safetensors) or a run (its latest checkpoint)."""
    fs, path = filesystem(location, storage_options)
    if fs.isfile(path):
        return location
    if fs.isfile(posixpath.join(path, MODEL_FILE)):
        return posixpath.join(location, MODEL_FILE)
    checkpoint = latest_committed_checkpoint(location, storage_options)
    if checkpoint is None:
        raise FileNotFoundError(f"{location}: no weights file, checkpoint folder or run with committed checkpoints")
    return posixpath.join(checkpoint, MODEL_FILE)


def local_weights(location: str, storage_options: dict | None = None) -> str:
    """A local path of ``location``, downloading remote files into a temporary folder."""
    fs, path = filesystem(location, storage_options)
    if "file" in fs.protocol:
        return path
    target = Path(tempfile.mkdtemp(prefix="vit-weights-")) / posixpath.basename(path)
    fs.get(path, str(target))
    return str(target)
