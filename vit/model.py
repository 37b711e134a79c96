"""The Vision Transformer of Dosovitskiy et al. (ICLR 2021), equations (1)-(4).

    z0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos                      (1)
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                                   (2)
    z_l  = MLP(LN(z'_l)) + z'_l                                         (3)
    y    = LN(z_L^0)                                                    (4)

Module names follow timm (``patch_embed.proj``, ``blocks.3.attn.qkv``, ...) so that timm state
dicts load without renaming; the arithmetic follows the original JAX code (LayerNorm eps 1e-6,
final norm applied before pooling, JAX initialisers). Shapes: B batch, N patches, T tokens
(N + 1 with a class token), D width, H heads, Dh = D / H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from vit.posemb import resample_pos_embed

Pool = Literal["cls", "gap"]


@dataclass(kw_only=True)
class ViTConfig:
    """Everything needed to build a :class:`VisionTransformer`. Defaults are ViT-B/16 at 224."""

    img_size: int = 224  # input side in pixels; the patch grid is img_size // patch_size
    patch_size: int = 16  # P: side of a square patch (1 for hybrids: the CNN already downsamples)
    in_chans: int = 3
    num_classes: int = 1000  # 0 keeps the trunk only (forward returns the representation)
    width: int = 768  # D, the latent size of every token
    depth: int = 12  # L, number of encoder blocks
    num_heads: int = 12
    mlp_dim: int = 3072  # hidden size of the block MLP
    pool: Pool = "cls"  # "cls": class token (eq. 1, 4); "gap": no token, mean over patches
    representation_size: int | None = None  # tanh "pre-logits" layer used in pretraining (eq. 4)
    dropout: float = 0.0  # after E_pos and after every dense layer except qkv
    attn_dropout: float = 0.0  # on the attention weights
    drop_path: float = 0.0  # stochastic depth rate of the last block; linear from 0 at the first
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6  # the JAX code's value (Hugging Face defaults to 1e-12)
    head_zero_init: bool = True  # the paper zero-initialises the classifier (App. B.1.1)
    head_bias_init: float = 0.0  # -10 for sigmoid (multi-label) pretraining, as big_vision
    dynamic_img_size: bool = False  # accept other input sizes, resampling E_pos on the fly
    # Hybrid: ResNet stage depths of a BiT ResNet stem (GroupNorm, weight-standardised convs) whose
    # feature map replaces the pixel patches, e.g. (3, 4, 9) for R50+ViT-B/16. None: pure ViT.
    resnet_layers: tuple[int, ...] | None = None
    resnet_width: int = 1  # width multiplier of the ResNet stem (BiT's "x1")

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.num_heads < 1:
            raise ValueError(f"patch_size and num_heads must be positive, got {self.patch_size} and {self.num_heads}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.pool not in ("cls", "gap"):
            raise ValueError(f"pool must be 'cls' or 'gap', got {self.pool!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.resnet_layers is not None:
            self.resnet_layers = tuple(self.resnet_layers)
        if self.img_size % self.feature_stride:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of the total stride "
                f"{self.feature_stride} (patch {self.patch_size}"
                + (f" x ResNet stride {self.feature_stride // self.patch_size})" if self.resnet_layers else ")")
            )

    @property
    def feature_stride(self) -> int:
        """Pixels per grid cell: the patch size times the hybrid stem's downsampling."""
        if self.resnet_layers is None:
            return self.patch_size
        # root conv + max-pool (4x), then stride 2 in every stage after the first
        return self.patch_size * 4 * 2 ** (len(self.resnet_layers) - 1)

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.img_size // self.feature_stride
        return (side, side)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.pool == "cls" else 0


def _lecun_normal_(weight: torch.Tensor, fan_in: int) -> None:
    """Flax's ``lecun_normal``: truncated at 2 std, rescaled so the kept part has variance 1/fan_in."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of a unit normal truncated at +-2
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class PatchEmbed(nn.Module):
    """Eq. (1): split into P x P patches and project each linearly to D dims.

    A P x P convolution with stride P is exactly a shared linear map of the flattened patches.
    """

    def __init__(self, config: ViTConfig, in_chans: int, *, device=None, dtype=None):
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = nn.Conv2d(
            in_chans, config.width, config.patch_size, stride=config.patch_size, device=device, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, D, h, w)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash/efficient on GPU)."""

    def __init__(self, config: ViTConfig, *, device=None, dtype=None):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.width // config.num_heads
        self.attn_dropout = config.attn_dropout
        # q, k and v in one matmul; split per head below.
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=config.qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(config.width, config.width, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, T, D = x.shape
        # split (not reshape + unbind): the backward pass then needs no stack and one copy fewer
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(D, dim=-1))
        # q, k, v: (B, H, T, Dh)
        attn = None
        if return_attention:
            # The fused kernels never materialise the weights; analysis needs them, so compute
            # them explicitly (same maths, same dropout semantics).
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (B, H, T, T)
            attn = attn.softmax(dim=-1)
            x = F.dropout(attn, self.attn_dropout, self.training) @ v
        else:
            dropout_p = self.attn_dropout if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, H, T, Dh)
        x = x.transpose(1, 2).reshape(B, T, D)
        x = self.proj_drop(self.proj(x))
        return (x, attn) if return_attention else x


class Mlp(nn.Module):
    """Two dense layers with a GELU between them, dropout after each (the paper's MLP block)."""

    def __init__(self, config: ViTConfig, *, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_dim, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(config.mlp_dim, config.width, device=device, dtype=dtype)
        self.drop2 = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescaling the survivors."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class Block(nn.Module):
    """One pre-LN encoder block, eqs. (2) and (3)."""

    def __init__(self, config: ViTConfig, drop_path: float = 0.0, *, device=None, dtype=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps, device=device, dtype=dtype)
        self.attn = Attention(config, device=device, dtype=dtype)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps, device=device, dtype=dtype)
        self.mlp = Mlp(config, device=device, dtype=dtype)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class PreLogits(nn.Module):
    """The tanh representation layer of the pretraining head (eq. 4's MLP head)."""

    def __init__(self, width: int, representation_size: int, *, device=None, dtype=None):
        super().__init__()
        self.fc = nn.Linear(width, representation_size, device=device, dtype=dtype)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class VisionTransformer(nn.Module):
    """ViT: patch embedding (or hybrid CNN stem), L encoder blocks, final LayerNorm, head."""

    def __init__(self, config: ViTConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        # Built on meta, then given storage and initialised once: the layers' own default initialisations would
        # draw from the generator for values init_weights replaces, and a seed's weights would then depend on
        # whether the model was built whole or on meta and initialised after sharding.
        target = torch.device(device) if device is not None else torch.get_default_device()
        factory = dict(device="meta", dtype=dtype)
        D = config.width
        self.num_prefix_tokens = config.num_prefix_tokens
        self.grid_size = config.grid_size

        embed_in_chans = config.in_chans
        if config.resnet_layers is not None:
            from vit.hybrid import ResNetStem  # hybrids only

            self.stem = ResNetStem(config.resnet_layers, config.resnet_width, config.in_chans, **factory)
            embed_in_chans = self.stem.out_chans
        else:
            self.stem = None
        self.patch_embed = PatchEmbed(config, embed_in_chans, **factory)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D, **factory)) if config.pool == "cls" else None
        num_tokens = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, D, **factory))  # E_pos, learned 1-D
        self.pos_drop = nn.Dropout(config.dropout)

        rates = torch.linspace(0, config.drop_path, config.depth).tolist() if config.depth > 1 else [config.drop_path]
        self.blocks = nn.ModuleList([Block(config, rate, **factory) for rate in rates])
        self.grad_checkpointing = False
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps, **factory)

        self.pre_logits = (
            PreLogits(D, config.representation_size, **factory) if config.representation_size else nn.Identity()
        )
        self.num_features = config.representation_size or D
        self.head = nn.Linear(self.num_features, config.num_classes, **factory) if config.num_classes else nn.Identity()
        if target.type != "meta":
            self.to_empty(device=target)
            self.init_weights()

    # ---------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_weights(self) -> None:
        """The JAX code's initialisers. Call after ``to_empty`` when the model was built on meta (and not
        sharded: a sharded model initialises one full parameter at a time through ``init_parameter``)."""
        for name, param in self.named_parameters():
            self.init_parameter(name, param)

    @torch.no_grad()
    def init_parameter(self, name: str, tensor: torch.Tensor) -> None:
        """Fill ``tensor``, the whole of parameter ``name`` (its full shape), with its initial value.

        Each parameter's value depends on its name and shape alone, so an initialiser that holds one full
        parameter at a time (to keep a shard of it) draws, in ``named_parameters`` order, exactly the weights
        ``init_weights`` gives the same seed.
        """
        owner_name, _, kind = name.rpartition(".")
        owner = self.get_submodule(owner_name)
        if name.startswith("stem."):
            self.stem.init_parameter(name.removeprefix("stem."), tensor)
        elif name == "pos_embed":
            nn.init.normal_(tensor, std=0.02)
        elif name == "cls_token":
            nn.init.zeros_(tensor)
        elif owner is self.head:
            if kind == "bias":
                nn.init.constant_(tensor, self.config.head_bias_init)
            elif self.config.head_zero_init:  # the paper zero-initialises the classifier (App. B.1.1)
                nn.init.zeros_(tensor)
            else:
                nn.init.xavier_uniform_(tensor)
        elif owner is self.patch_embed.proj or (isinstance(self.pre_logits, PreLogits) and owner is self.pre_logits.fc):
            # Flax's default for these two is LeCun normal (truncated); fan-in is all but the output dimension.
            if kind == "weight":
                _lecun_normal_(tensor, fan_in=tensor[0].numel())
            else:
                nn.init.zeros_(tensor)
        elif isinstance(owner, nn.LayerNorm):
            (nn.init.ones_ if kind == "weight" else nn.init.zeros_)(tensor)
        elif isinstance(owner, nn.Linear):
            fused_qkv = owner_name.endswith("attn.qkv")
            if kind == "weight" and fused_qkv:
                # Flax initialises q, k and v as three D x D kernels; keep their fan-in/fan-out.
                for chunk in tensor.chunk(3, dim=0):
                    nn.init.xavier_uniform_(chunk)
            elif kind == "weight":
                nn.init.xavier_uniform_(tensor)
            elif fused_qkv or owner_name.endswith("attn.proj"):
                nn.init.zeros_(tensor)
            else:
                nn.init.normal_(tensor, std=1e-6)
        else:
            raise ValueError(f"no initialiser for parameter {name!r} of a {type(owner).__name__}")

    @torch.no_grad()
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory: recompute each block's activations in the backward pass."""
        self.grad_checkpointing = enable

    def reset_head(self, num_classes: int | None = None) -> None:
        """Replace (when ``num_classes`` differs) and re-initialise the classifier."""
        cfg = self.config
        if num_classes is not None and num_classes != cfg.num_classes:
            cfg.num_classes = num_classes
            ref = self.pos_embed
            head = nn.Linear(self.num_features, num_classes, device="meta", dtype=ref.dtype) if num_classes else None
            self.head = head.to_empty(device=ref.device) if head is not None else nn.Identity()
        for kind, param in self.head.named_parameters():
            self.init_parameter(f"head.{kind}", param)

    # ---------------------------------------------------------------- forward
    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos_embed = self.pos_embed
        if grid != self.grid_size:
            if not self.config.dynamic_img_size:
                raise ValueError(
                    f"input gives a {grid[0]}x{grid[1]} patch grid but the model was built for "
                    f"{self.grid_size[0]}x{self.grid_size[1]} (img_size={self.config.img_size}); "
                    "build it at the new size (load_checkpoint resamples E_pos) or set dynamic_img_size=True"
                )
            pos_embed = resample_pos_embed(
                pos_embed, grid, old_grid=self.grid_size, num_prefix_tokens=self.num_prefix_tokens
            )
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, T, D)
        return self.pos_drop(x + pos_embed)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. (1): pixels (B, C, H, W) to input tokens z0 (B, T, D)."""
        size = self.config.img_size
        if not self.config.dynamic_img_size and tuple(x.shape[-2:]) != (size, size):
            # Checked on pixels, not on the grid: the convolutions would silently crop (or, in the
            # hybrid's SAME padding, pad) a wrong size to the right grid.
            raise ValueError(
                f"input is {x.shape[-2]}x{x.shape[-1]} px but the model was built for img_size={size}; "
                "build it at the new size (load_checkpoint resamples E_pos) or set dynamic_img_size=True"
            )
        stride = self.config.feature_stride
        if x.shape[-2] % stride or x.shape[-1] % stride:
            raise ValueError(f"input is {x.shape[-2]}x{x.shape[-1]} px, not a multiple of the model's stride {stride}")
        if self.stem is not None:
            x = self.stem(x)  # (B, C', H/16, W/16)
        x, grid = self.patch_embed(x)
        return self._pos_embed(x, grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, H, W) to normalised final tokens (B, T, D)."""
        x = self.embed(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Activation checkpointing: keep only each block's input, recompute the rest in backward.
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tokens to the image representation y (B, D)."""
        if self.config.pool == "cls":
            return x[:, 0]
        return x.mean(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens to logits; ``pre_logits=True`` stops before the classifier (for probes, few-shot)."""
        x = self.pre_logits(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def get_attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights of every block, each (B, H, T, T), for rollout and distance analysis."""
        x = self.embed(x)
        maps = []
        for block in self.blocks:
            y, attn = block.attn(block.norm1(x), return_attention=True)
            x = x + block.drop_path(y)
            x = x + block.drop_path(block.mlp(block.norm2(x)))
            maps.append(attn)
        return maps

    # ---------------------------------------------------------------- helpers
    def no_weight_decay(self) -> set[str]:
        """Parameter names that optimisers conventionally exclude from weight decay."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n in ("pos_embed", "cls_token")}

    def num_params(self, exclude_head: bool = False) -> int:
        skip = set(self.head.parameters()) if exclude_head else set()
        return sum(p.numel() for p in self.parameters() if p not in skip)

    def flops_per_image(self) -> int:
        """Forward FLOPs (2 per multiply-add) of the matmuls, for MFU: training is about 3x this."""
        cfg = self.config
        T = self.pos_embed.shape[1]
        D, M, L = cfg.width, cfg.mlp_dim, cfg.depth
        N = self.grid_size[0] * self.grid_size[1]
        embed = 2 * N * self.patch_embed.proj.in_channels * cfg.patch_size**2 * D
        per_block = 2 * T * (3 * D * D + D * D + 2 * D * M) + 2 * 2 * T * T * D
        head = 2 * self.num_features * cfg.num_classes
        stem = self.stem.flops_per_image(cfg.img_size) if self.stem is not None else 0
        return stem + embed + L * per_block + head
