"""How a training's model is spread over its ranks: a whole copy on each (DDP, or a single worker), or sharded
(FSDP2, ``torch.distributed.fsdp.fully_shard``: one unit per encoder block, one for the rest); and what running
it then takes: bf16 autocast and FSDP's mixed-precision policy, activation checkpointing, compiled blocks, the
context that keeps gradients local while micro-batches accumulate, and the gathering of the full weights.

Under FSDP no rank ever holds the whole model: each builds it on the meta device (shapes, no storage), shards
it, then gives storage to its own shards only and fills them (``materialise``); pretrained weights are read by
rank 0 alone and reach each rank as its shards (``load_full_weights``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from pipelines.training.config import Precision, ScaleConfig, TrainConfig
from pipelines.training.weights import build_model, fresh_model_config, pretrained_weights
from vit.model import VisionTransformer, ViTConfig


def uses_bf16(precision: Precision, device: torch.device) -> bool:
    """Whether a run computes in bf16: asked for, or "auto" on a GPU."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


@dataclass
class ParallelModel:
    """One rank's model and how to run it."""

    model: VisionTransformer  # its modules; under FSDP its parameters are DTensors holding this rank's shards
    wrapped: nn.Module  # what runs forward and backward: DDP's wrapper, else the model itself
    strategy: Literal["single", "ddp", "fsdp"]
    bf16: bool
    device: torch.device

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Forward and backward passes inside only accumulate this rank's gradients; the next pass outside
        reduces the sum over all ranks (so only the last micro-batch of a step communicates)."""
        if self.strategy == "fsdp":
            # Backward runs inside the context, so switching the sync back on at its exit cannot come too early.
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        elif self.strategy == "ddp":
            with self.wrapped.no_sync():
                yield
        else:
            yield

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for forward passes when the run computes in bf16."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0's CPU (other ranks get an empty dict). Under FSDP it gathers the
        shards: a collective, which every rank must call."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)


def spread_model(
    cfg: TrainConfig, num_classes: int, multi_label: bool, *, rank: int, world: int, device: torch.device
) -> ParallelModel:
    """``cfg``'s model (``weights.build_model``'s) on this rank, spread by ``cfg.scale.strategy``.

    The initial weights follow the default generator: seed it first, alike on every rank. Under FSDP each rank
    initialises every full parameter as ``build_model`` would and keeps its shard of it (``materialise``), so a
    fresh model starts from the same weights whichever the strategy; ``init_from``'s weights are read by rank 0
    alone and loaded into the shards after that.
    """
    scale = cfg.scale
    bf16 = uses_bf16(scale.precision, device)
    if world > 1 and scale.strategy == "fsdp":
        model = _sharded_model(cfg, num_classes, multi_label, rank=rank, world=world, device=device, bf16=bf16)
        return ParallelModel(model, model, "fsdp", bf16, device)
    model = build_model(cfg, num_classes, multi_label)
    model.to(device)
    _prepare(model, scale)
    if world == 1:
        return ParallelModel(model, model, "single", bf16, device)
    from torch.nn.parallel import DistributedDataParallel

    wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return ParallelModel(model, wrapped, "ddp", bf16, device)


def _sharded_model(
    cfg: TrainConfig, num_classes: int, multi_label: bool, *, rank: int, world: int, device: torch.device, bf16: bool
) -> VisionTransformer:
    pretrained = None
    if cfg.init_from is None:
        config = fresh_model_config(cfg, num_classes, multi_label)
    else:  # only rank 0 reads the weights; the others learn the model's config from it
        config, pretrained = _from_rank0(lambda: pretrained_weights(cfg, num_classes, multi_label), rank)
    model = VisionTransformer(config, device="meta")
    _prepare(model, cfg.scale)
    shard(model, world=world, device=device, bf16=bf16)
    materialise(model, device)
    if cfg.init_from is not None:
        load_full_weights(model, pretrained or {})
    return model


def _from_rank0(read: Callable[[], tuple[ViTConfig, dict]], rank: int) -> tuple[ViTConfig, dict | None]:
    """``read()``'s (config, weights) on rank 0; its config, and no weights, on every other rank. An error on
    rank 0 stops every rank rather than leaving them waiting."""
    config, weights, failure = None, None, None
    if rank == 0:
        try:
            config, weights = read()
        except Exception as err:
            failure = err
    payload = [(config, None if failure is None else f"{type(failure).__name__}: {failure}")]
    dist.broadcast_object_list(payload, src=0)
    config, error = payload[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise RuntimeError(f"rank 0 could not read init_from: {error}")
    return config, weights


def _prepare(model: VisionTransformer, scale: ScaleConfig) -> None:
    """What is set on the modules themselves, before any wrapping or sharding."""
    if scale.activation_checkpointing:
        model.set_grad_checkpointing(True)
    if scale.compile:
        for block in model.blocks:
            block.compile()


def shard(model: VisionTransformer, *, world: int, device: torch.device, bf16: bool) -> None:
    """FSDP2 over all ``world`` ranks, in place: each encoder block one unit (one all-gather per block, overlapped
    with the previous block's compute), the rest (embeddings, final norm, head) the root unit. In bf16 the
    all-gathered weights and the compute are bf16; master weights and gradient reduction stay fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The mesh of the run's device: FSDP's default is the GPU whenever there is one, even for a CPU run.
    kwargs: dict = {"mesh": init_device_mesh(device.type, (world,))}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


@torch.no_grad()
def materialise(model: VisionTransformer, device: torch.device) -> None:
    """Storage on ``device`` for the shards of a model built on the meta device and sharded, filled with what the
    model's own initialisation gives the full parameters: this rank's part of exactly the weights ``init_weights``
    draws from the same seed.

    Why not ``to_empty`` then ``init_weights`` on the shards, as FSDP's documentation suggests: a random fill of a
    sharded DTensor draws a distinct part of one full tensor per rank only on CUDA-like devices (DTensor's
    offset-based RNG, Philox); on CPU every rank draws the same numbers into its own shard, so the two halves of
    each weight matrix would be equal. And an initialiser that works on slices of a parameter (the q, k and v
    thirds of ``qkv``) gets new tensors, not views, once that parameter is sharded across the slices.

    So every rank initialises each full parameter in turn, on the CPU with the default generator, through the
    model's ``init_parameter`` and in ``named_parameters`` order, and keeps its own shard: one full parameter at
    a time is held (the largest, the head of a 21k-class model, 67 MB for B/16). Every rank draws the same
    numbers, as replicas must; the weights are those of the whole model built on CPU from the same seed, whatever
    the device, the world size and the strategy; the cost is each rank computing the whole initialisation, as
    each did when it built the whole model.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if any(True for _ in model.buffers()):
        raise ValueError("materialise fills parameters only; this model has buffers, which to_empty leaves unset")
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        full = torch.empty(param.shape, dtype=param.dtype)
        model.init_parameter(name, full)
        if isinstance(param, DTensor):
            # src_data_rank=None: every rank holds the same full tensor, so each keeps its part, no communication.
            param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
        else:
            param.copy_(full)


def load_full_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Whole tensors that rank 0 holds (the others pass an empty dict) into every rank's shards, broadcast one
    tensor at a time; parameters the dict lacks keep their values. A collective: every rank must call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights, options=options)
