"""DeepLab-V2 segmentation networks: the release ResNet-101, a VGG-16 and a small CPU variant.

All three return ``(aux, main)`` logits at output stride 8 (``aux`` is None for single-level
models) and share the release's BatchNorm semantics: affine parameters frozen, layers in train
mode (batch statistics every forward, running statistics updated). ``freeze_bn=True`` is a
named deviation that keeps BatchNorm in eval mode even under ``model.train()``.
``activation_checkpointing = True`` keeps only each backbone block's input for the backward and
recomputes the block there (same values and gradients, BatchNorm statistics updated once).
Also here: ``build_model`` (by arch name), ``fold_frozen_batchnorm`` (frozen BatchNorm folded
into the preceding convolutions, exact, state dict unchanged; ``shared_scaled_weights`` reuses the
folded weights across a step's forwards) and ``ReleaseSGD``, the optimiser
update that the release's repeated-tensor parameter group implies.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..backend import device_guard, get_backend
from ..batch_norm import add_relu, shift_relu, train_batch_norm

ASPP_DILATIONS = (6, 12, 18, 24)
GROUPINGS = ("release", "clean")


class ASPPHead(nn.Module):
    """ASPP-L classifier: parallel 3x3 convs (dilation = padding), outputs summed.

    ADVENT sums all four branches (AdaptSegNet's head returned after the second one).
    ``channels_multiple`` (``train.classifier_channels_multiple``): each convolution runs with its
    output channels padded by zero filters to a multiple of this, and the padding is sliced off the
    sum: 19 classes are no multiple of 8, which 16-bit tensor-core convolutions want. Same values
    and gradients up to float rounding; the parameters and state dict stay as they are. Under autocast
    the padded weights (new tensors) are cast once a forward, not once a step like the others.
    """

    channels_multiple: int = 1

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = ASPP_DILATIONS):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=d, dilation=d, bias=True)
            for d in dilations
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        classes = self.conv2d_list[0].out_channels
        extra = -classes % self.channels_multiple
        if not extra:
            out = self.conv2d_list[0](x)
            for conv in self.conv2d_list[1:]:
                out = out + conv(x)
            return out
        out = None
        for conv in self.conv2d_list:
            # F.pad keeps the weight's memory format (channels_last on the fast path)
            weight = F.pad(conv.weight, (0, 0, 0, 0, 0, 0, 0, extra))
            y = F.conv2d(x, weight, F.pad(conv.bias, (0, extra)), padding=conv.padding, dilation=conv.dilation)
            out = y if out is None else out + y
        return out[:, :classes]


def bn_relu(bn: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ReLU (in place, as the release's) of ``bn(x)`` (``+ residual``); a :class:`FusedBatchNorm2d` applies
    them all in its kernels."""
    if isinstance(bn, (FusedBatchNorm2d, FusedFoldedBatchNorm2d)):
        return bn(x, relu=True, residual=residual)
    return add_relu(bn(x), residual, relu=True)


def frozen_batchnorm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm whose affine parameters never train (release: requires_grad False)."""
    bn = nn.BatchNorm2d(channels)
    for p in bn.parameters():
        p.requires_grad = False
    return bn


@contextlib.contextmanager
def _running_statistics_kept(block: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm in ``block`` normalises with its batch statistics as usual but leaves the
    running statistics and the batch count as they are: momentum 0 (the same op and saved tensors,
    which checkpoint's recomputation check requires; dropping the running buffers would change them)."""
    layers = [m for m in block.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked) for m in layers]
    for m in layers:
        m.momentum, m.num_batches_tracked = 0.0, None
    try:
        yield
    finally:
        for m, (momentum, count) in zip(layers, saved):
            m.momentum, m.num_batches_tracked = momentum, count


def checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` keeping only ``x`` for the backward, which runs the block again first.

    No RNG state is saved: the models have no randomness. Eagerly, the recomputation must not update
    train-mode BatchNorm statistics a second time; torch.compile applies such updates once, in the
    compiled forward, and recomputes only pure ops (nor does it trace a custom ``context_fn``).
    """
    if torch.compiler.is_compiling():
        return checkpoint(block, x, use_reentrant=False, preserve_rng_state=False)
    return checkpoint(block, x, use_reentrant=False, preserve_rng_state=False,
                      context_fn=lambda: (contextlib.nullcontext(), _running_statistics_kept(block)))


class SegmentationModel(nn.Module):
    """Common behaviour: BN mode handling, model meta data and optimiser parameter groups.

    Subclasses set ``arch`` and implement ``backbone_roots`` and ``heads``.
    """

    arch: str
    # Recompute each backbone block in the backward instead of keeping its activations: about one
    # more backbone forward per training step for a fraction of the activation memory.
    activation_checkpointing: bool = False

    def __init__(self, num_classes: int, multi_level: bool, freeze_bn: bool):
        super().__init__()
        self.num_classes = num_classes
        self.multi_level = multi_level
        self.freeze_bn = freeze_bn

    def meta(self) -> dict:
        """What a checkpoint needs to rebuild this model."""
        return {"arch": self.arch, "num_classes": self.num_classes, "multi_level": self.multi_level}

    def train(self, mode: bool = True) -> "SegmentationModel":
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    @contextlib.contextmanager
    def _batches_counted_together(self) -> Iterator[None]:
        """Train-mode BatchNorm adds 1 to its ``num_batches_tracked`` in every forward, a tiny kernel a layer
        (104 in ResNet-101: as many launches eagerly, as many graph nodes when captured). Inside this block
        the layers with a momentum skip it and one multi-tensor add counts the forward for all of them once
        it has completed. (Without a momentum, BatchNorm averages with the count: those keep their own.)
        Not under torch.compile, which fuses the adds itself."""
        if torch.compiler.is_compiling():
            yield
            return
        layers = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                  and m.track_running_stats and m.momentum is not None and m.num_batches_tracked is not None]
        counters = [m.num_batches_tracked for m in layers]
        for m in layers:
            m.num_batches_tracked = None
        try:
            yield
        finally:
            for m, counter in zip(layers, counters):
                m.num_batches_tracked = counter
        if counters:
            torch._foreach_add_(counters, 1)

    def _run_blocks(self, blocks: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """``x`` through ``blocks`` in order, each checkpointed with ``activation_checkpointing``
        when a backward may follow."""
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in blocks:
            x = checkpointed(block, x) if recompute else block(x)
        return x

    def backbone_roots(self) -> list[nn.Module]:
        """Top-level backbone modules, trained at the base lr."""
        raise NotImplementedError

    def heads(self) -> list[nn.Module]:
        """Classifier heads (aux first when present), trained at 10x the base lr."""
        raise NotImplementedError

    def release_backbone_entries(self) -> Iterator[nn.Parameter]:
        """The release's 1x group, repeats included; only the ResNet-101 has one."""
        raise ValueError(
            f"grouping='release' reproduces a quirk of the ResNet-101 release code; "
            f"{self.arch} has no release counterpart, use grouping='clean'"
        )

    def optim_parameters(self, lr: float, grouping: str = "release") -> list[dict]:
        """SGD parameter groups: ``[backbone at lr, heads at 10 * lr]``.

        ``grouping="clean"`` lists each trainable backbone tensor once.
        ``grouping="release"`` lists the release's 1x group verbatim, duplicates included
        (ResNet-101: 314 entries for 104 tensors). torch 2.13's SGD accepts duplicates within a
        group only with a UserWarning, announces an error for later versions, and does not
        update them the way torch 0.4.1 did (the single-tensor and foreach paths even disagree);
        use :class:`ReleaseSGD` for the release's update.
        """
        if grouping == "release":
            backbone = list(self.release_backbone_entries())
        elif grouping == "clean":
            backbone = [p for root in self.backbone_roots() for p in root.parameters() if p.requires_grad]
        else:
            raise ValueError(f"unknown grouping {grouping!r}; expected one of {GROUPINGS}")
        head_params = [p for head in self.heads() for p in head.parameters()]
        return [{"params": backbone, "lr": lr}, {"params": head_params, "lr": 10 * lr}]


def _init_release_style(model: nn.Module) -> None:
    """Release init: every conv weight N(0, 0.01), BN weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.01)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Bottleneck(nn.Module):
    """Caffe-style ResNet bottleneck: stride on the first 1x1 conv, 3x3 padding = dilation."""

    expansion = 4
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))  # forward: bn(conv(x))

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, stride=stride, bias=False)
        self.bn1 = frozen_batchnorm(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = frozen_batchnorm(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = frozen_batchnorm(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = bn_relu(self.bn1, self.conv1(x))
        out = self.conv3(bn_relu(self.bn2, self.conv2(out)))
        residual = x if self.downsample is None else self.downsample(x)
        return bn_relu(self.bn3, out, residual)


def _resnet_layer(in_channels: int, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    # The release gives every layer a projection shortcut (layer1 changes width, layer2 strides,
    # layer3/4 are dilated), so all four carry `downsample` weights.
    out_channels = planes * Bottleneck.expansion
    downsample = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        frozen_batchnorm(out_channels),
    )
    layers = [Bottleneck(in_channels, planes, stride, dilation, downsample)]
    layers += [Bottleneck(out_channels, planes, dilation=dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class DeepLabV2ResNet101(SegmentationModel):
    """The release ``ResNetMulti``: dilated ResNet-101, ASPP heads on layer3 (aux) and layer4 (main).

    State-dict names and shapes match released checkpoints (44,601,560 parameters for 19 classes).
    """

    arch = "deeplabv2_r101"
    conv_bn_pairs = (("conv1", "bn1"),)  # the stem; forward: bn(conv(x))

    def __init__(self, num_classes: int, multi_level: bool = True, freeze_bn: bool = False):
        super().__init__(num_classes, multi_level, freeze_bn)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = frozen_batchnorm(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = _resnet_layer(64, 64, 3, stride=1, dilation=1)
        self.layer2 = _resnet_layer(256, 128, 4, stride=2, dilation=1)
        self.layer3 = _resnet_layer(512, 256, 23, stride=1, dilation=2)
        self.layer4 = _resnet_layer(1024, 512, 3, stride=1, dilation=4)
        if multi_level:
            self.layer5 = ASPPHead(1024, num_classes)
        self.layer6 = ASPPHead(2048, num_classes)
        _init_release_style(self)
        self.train()

    def forward(self, x: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        with self._batches_counted_together():
            x = self.maxpool(bn_relu(self.bn1, self.conv1(x)))
            x = self._run_blocks([*self.layer1, *self.layer2, *self.layer3], x)  # bottlenecks
            aux = self.layer5(x) if self.multi_level else None
            return aux, self.layer6(self._run_blocks(self.layer4, x))

    def backbone_roots(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4]

    def heads(self) -> list[nn.Module]:
        return [self.layer5, self.layer6] if self.multi_level else [self.layer6]

    def release_backbone_entries(self) -> Iterator[nn.Parameter]:
        """The release's ``get_1x_lr_params_no_scale``: for each root, every sub-module's
        ``parameters()``, so a tensor is yielded once per enclosing module (conv1 once, block
        convs 3 times, shortcut convs 4 times: 314 entries for 104 tensors)."""
        for root in self.backbone_roots():
            for module in root.modules():
                for p in module.parameters():
                    if p.requires_grad:
                        yield p


# VGG-16 conv widths up to conv4_3, "M" = 2x2 max-pool (pool4 removed); conv5 follows with
# dilation 2 (pool5 removed), so the output stride stays 8.
_VGG16_CONVS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
_VGG16_DILATED_CONVS = (512, 512, 512)


class DeepLabV2VGG16(SegmentationModel):
    """DeepLab-V2 VGG-16 (AdaptSegNet layout): conv1-conv4 + dilated conv5, fc6/fc7 as dilated
    3x3 convs, one ASPP head. Names follow AdaptSegNet: ``features.N``, ``classifier``."""

    arch = "deeplabv2_vgg16"

    def __init__(self, num_classes: int, multi_level: bool = False, freeze_bn: bool = False):
        if multi_level:
            raise ValueError("deeplabv2_vgg16 is single-level; use multi_level=False")
        super().__init__(num_classes, multi_level=False, freeze_bn=freeze_bn)
        layers: list[nn.Module] = []
        in_channels = 3
        for item in _VGG16_CONVS:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_channels = item
        for width in _VGG16_DILATED_CONVS:
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=2, dilation=2), nn.ReLU(inplace=True)]
            in_channels = width
        layers += [
            nn.Conv2d(512, 1024, kernel_size=3, padding=4, dilation=4), nn.ReLU(inplace=True),  # fc6
            nn.Conv2d(1024, 1024, kernel_size=3, padding=4, dilation=4), nn.ReLU(inplace=True),  # fc7
        ]
        self.features = nn.Sequential(*layers)
        self.classifier = ASPPHead(1024, num_classes)
        # The blocks activation checkpointing recomputes: conv1-conv3 each up to its pool, conv4,
        # conv5, fc6-fc7. Views of `features` (a tuple: no second registration, same state dict).
        ends = [i + 1 for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
        ends += [ends[-1] + 6, ends[-1] + 12, len(layers)]  # 3 conv+ReLU pairs each
        self.blocks = tuple(self.features[a:b] for a, b in zip([0, *ends], ends))
        self.train()

    def forward(self, x: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, self.classifier(self._run_blocks(self.blocks, x))

    def backbone_roots(self) -> list[nn.Module]:
        return [self.features]

    def heads(self) -> list[nn.Module]:
        return [self.classifier]


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=dilation,
                  dilation=dilation, bias=False),
        frozen_batchnorm(out_channels),
        nn.ReLU(inplace=True),
    )


class DeepLabV2Small(SegmentationModel):
    """A small stand-in for quick CPU runs: three stride-2 stages and a dilated stage (output
    stride 8), with the ResNet-101 model's head layout (``layer5`` aux on the third stage,
    ``layer6`` main on the last) and the same BatchNorm semantics."""

    arch = "deeplabv2_small"

    def __init__(self, num_classes: int, multi_level: bool = True, freeze_bn: bool = False, width: int = 16):
        super().__init__(num_classes, multi_level, freeze_bn)
        self.width = width
        self.stage1 = _conv_bn_relu(3, width, stride=2)
        self.stage2 = nn.Sequential(_conv_bn_relu(width, 2 * width, stride=2),
                                    _conv_bn_relu(2 * width, 2 * width))
        self.stage3 = nn.Sequential(_conv_bn_relu(2 * width, 4 * width, stride=2),
                                    _conv_bn_relu(4 * width, 4 * width))
        self.stage4 = nn.Sequential(_conv_bn_relu(4 * width, 8 * width, dilation=2),
                                    _conv_bn_relu(8 * width, 8 * width, dilation=2))
        if multi_level:
            self.layer5 = ASPPHead(4 * width, num_classes)
        self.layer6 = ASPPHead(8 * width, num_classes)
        _init_release_style(self)
        self.train()

    def meta(self) -> dict:
        return {**super().meta(), "width": self.width}

    def forward(self, x: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        with self._batches_counted_together():
            x = self._run_blocks([self.stage1, *self.stage2, *self.stage3], x)  # conv-BN-ReLU blocks
            aux = self.layer5(x) if self.multi_level else None
            return aux, self.layer6(self._run_blocks(self.stage4, x))

    def backbone_roots(self) -> list[nn.Module]:
        return [self.stage1, self.stage2, self.stage3, self.stage4]

    def heads(self) -> list[nn.Module]:
        return [self.layer5, self.layer6] if self.multi_level else [self.layer6]


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A frozen BatchNorm folded into the conv before it (:class:`FoldedConv2d`): forward is the
    identity. It keeps its parameters, buffers and place in the module tree, so state-dict names,
    loading, ``.to()`` and ``train()``/``eval()`` behave as before folding."""

    _folded_conv: "FoldedConv2d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FusedFoldedBatchNorm2d(FoldedBatchNorm2d):
    """A folded frozen BatchNorm whose convolution applies only the scale: this adds the shift, with the
    residual add and ReLU that follow (through :func:`bn_relu`), in one kernel
    (:func:`advent_fast.batch_norm.shift_relu`) instead of the convolution's bias add, the residual add and
    the ReLU, each a pass over the activations."""

    def forward(self, x: torch.Tensor, relu: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        _, shift = self._folded_conv.frozen_affine()
        return shift_relu(x, shift, relu, residual)


class FusedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose train-mode forward is :func:`advent_fast.batch_norm.train_batch_norm`: the fused
    kernels on channels_last CUDA activations (with the residual add and ReLU that follow, through
    :func:`bn_relu`), ATen's otherwise; eval mode is nn.BatchNorm2d's. Same parameters, buffers and state
    dict."""

    def forward(self, x: torch.Tensor, relu: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not (self.training and self.track_running_stats and self.momentum is not None):
            return add_relu(super().forward(x), residual, relu)
        if self.num_batches_tracked is not None:  # None while activation checkpointing recomputes
            self.num_batches_tracked.add_(1)
        return train_batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, self.momentum,
                                self.eps, relu, residual)


def use_fused_batchnorm(model: nn.Module) -> int:
    """Every nn.BatchNorm2d of ``model`` becomes a :class:`FusedBatchNorm2d`, and every BatchNorm folded into
    a convolution without a bias (:func:`fold_frozen_batchnorm`) a :class:`FusedFoldedBatchNorm2d`, in place;
    returns how many. The state dict stays as it is."""
    layers = [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    for bn in layers:
        bn.__class__ = FusedBatchNorm2d
    folded = [m for m in model.modules() if type(m) is FoldedBatchNorm2d and m._folded_conv.bias is None]
    for bn in folded:
        bn.__class__ = FusedFoldedBatchNorm2d
    return len(layers) + len(folded)


class _ScaledWeight(torch.autograd.Function):
    """``weight * scale`` (one scale per output channel) written in ``dtype`` by one kernel (the product
    in float32, rounded once, as a multiply then a cast round it); backward: ``grad * scale`` in the
    weight's dtype, also one kernel. ``scale`` (frozen BN, no gradient) is kept on ctx, not saved for
    backward, so the node survives a backward pass: the forwards of a training step share one scaled
    weight (:func:`shared_scaled_weights`), each with its own backward."""

    @staticmethod
    def forward(ctx, weight, scale, dtype):
        ctx.scale, ctx.weight_dtype = scale, weight.dtype
        return torch.mul(weight, scale.reshape(-1, 1, 1, 1), out=torch.empty_like(weight, dtype=dtype))

    @staticmethod
    def backward(ctx, grad):
        return torch.mul(grad, ctx.scale.reshape(-1, 1, 1, 1)).to(ctx.weight_dtype), None, None


def _capturing(tensor: torch.Tensor) -> bool:
    """Whether this forward is being captured into a CUDA graph (``tensor`` tells the device): what it computes
    is then recomputed at every replay, so nothing made in an earlier, eager, forward may be reused (its
    memory is not the graph's), and what it makes may be reused only inside this capture."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


# The folded convs holding something for reuse while a shared_scaled_weights block is open (None: no block).
_block_holders: Optional[set] = None


@contextlib.contextmanager
def shared_scaled_weights():
    """Within the block each folded conv (:func:`fold_frozen_batchnorm`) scales (and, under autocast, casts)
    its weight once and reuses it in every forward with the same dtype and grad mode: a training step's
    source and target forwards, each with its own backward, issue half the weight kernels. While a CUDA
    graph captures, its BN's scale and shift are also made once in the block (eagerly they are kept
    across blocks: :meth:`FoldedConv2d.frozen_affine`). The weights and BN tensors must not change inside
    the block without their version counters seeing it (in-place ops on them do; writes through ``.data``
    do not): open it around a step's forwards and backwards, not its optimiser step. Leaving it drops
    what it kept."""
    global _block_holders
    if _block_holders is not None:  # nested: the outer block owns the reuse
        yield
        return
    _block_holders = set()
    try:
        yield
    finally:
        holders, _block_holders = _block_holders, None
        for conv in holders:
            conv._scaled_weight_cache = None
            if conv._affine_cache is not None and conv._affine_cache[2]:  # made during a capture
                conv._affine_cache = None


class FoldedConv2d(nn.Conv2d):
    """A Conv2d that also applies the eval-mode BatchNorm following it, in one convolution:
    ``conv(x, w * s) + (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``.

    ``weight`` stays the trainable tensor (its gradient flows through the multiply by ``s``). The BN
    is held in a plain attribute, not registered as a child, so the module tree and state dict list
    it once, under its own name. ``s`` and the BN's shift come from :meth:`frozen_affine`, the scaled
    weight from :meth:`scaled_weight`.
    """

    _folded_bn: FoldedBatchNorm2d
    _folded_affines: "_FoldedAffines"  # every conv folded with this one, for computing their affines together
    # ((eps, versions), BN tensors, made during a capture, s, shift by dtype) that frozen_affine last computed.
    _affine_cache: Optional[tuple] = None
    # (key, weight, s, scaled weight) that scaled_weight made inside a shared_scaled_weights block.
    _scaled_weight_cache: Optional[tuple] = None

    def _hold_in_block(self) -> bool:
        """Registers this conv with the open shared_scaled_weights block, which drops what it kept on
        leaving; False if no block is open."""
        if _block_holders is None:
            return False
        _block_holders.add(self)
        return True

    def frozen_affine(self, shift_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, beta - mean * s), computed in at least fp32 as BatchNorm computes; the shift converted to
        ``shift_dtype`` if given.

        An eager forward reuses them while the BN's four tensors are the same objects at the same
        versions (load_state_dict, in-place writes and ``.to()`` all change one, hence refresh them):
        recomputing them every forward cost five small kernels per convolution, more host time than
        the BatchNorm pass they save. A forward captured into a CUDA graph computes them in the graph
        (the replays then follow the BN tensors), once per :func:`shared_scaled_weights` block. Kept ones
        are computed for every conv folded with this one at once (:class:`_FoldedAffines`: a few kernels,
        not five a conv). Under torch.compile and when a BN tensor requires grad, every forward computes
        its own. Writes that leave the version counters alone are not seen: through ``.data``, and DDP's
        broadcast of rank 0's buffers before each forward (harmless while BN is frozen: every rank holds
        rank 0's statistics from the moment DDP wraps the model, and that first sync does count).
        """
        bn = self._folded_bn
        tensors = _bn_tensors(bn)
        capturing = _capturing(bn.running_var)
        if torch.compiler.is_compiling() or any(t.requires_grad for t in tensors) or (
                capturing and _block_holders is None):  # computed for this forward alone
            scale, shift = _affine(tensors, bn.eps)
            return scale, shift if shift_dtype is None else shift.to(shift_dtype)
        if not self._affine_valid(tensors, capturing):
            self._folded_affines.refresh(capturing)
        _, _, _, scale, shifts = self._affine_cache
        if shift_dtype not in shifts:
            shifts[shift_dtype] = shifts[None].to(shift_dtype)
        return scale, shifts[shift_dtype]

    def _affine_valid(self, tensors: tuple[torch.Tensor, ...], capturing: bool) -> bool:
        """Whether the kept affine is of these BN tensors: the same tensors at the same versions, the same eps,
        and made as this forward is (eagerly, or during a capture: the two never share)."""
        cache = self._affine_cache
        if cache is None or cache[2] != capturing:
            return False
        return cache[0] == (self._folded_bn.eps, tuple(t._version for t in tensors)) and all(
            a is b for a, b in zip(cache[1], tensors))

    def scaled_weight(self, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``weight * scale`` in ``dtype`` (the autocast dtype under autocast: the convolution then casts
        nothing). Inside :func:`shared_scaled_weights` it is made once and reused while the weight and
        ``scale`` are the same tensors (the weight at the same version) and the grad mode is the same,
        also during CUDA-graph capture (once per replay then); not under torch.compile, where it is part
        of the traced graph."""
        weight = self.weight
        if torch.compiler.is_compiling():
            return (weight * scale.reshape(-1, 1, 1, 1)).to(dtype)
        if not self._hold_in_block():
            return _ScaledWeight.apply(weight, scale, dtype)
        key = (weight._version, dtype, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        cache = self._scaled_weight_cache
        if cache is not None and cache[0] == key and cache[1] is weight and cache[2] is scale:
            return cache[3]
        scaled = _ScaledWeight.apply(weight, scale, dtype)
        self._scaled_weight_cache = (key, weight, scale, scaled)
        return scaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._folded_bn.training:  # e.g. freeze_bn turned off, or a submodule's train() called directly
            raise RuntimeError("a folded BatchNorm must stay in eval mode; keep freeze_bn=True "
                               "and call train() on the whole model")
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype
        if isinstance(self._folded_bn, FusedFoldedBatchNorm2d):  # the BN adds the shift (and has no bias)
            scale, _ = self.frozen_affine()
            return self._conv_forward(x, self.scaled_weight(scale, dtype), None)
        if self.bias is None:
            # Under autocast the convolution would cast the bias to the autocast dtype every forward:
            # the cached shift is already in it (the same rounding of the same values).
            scale, shift = self.frozen_affine(dtype)
        else:
            scale, shift = self.frozen_affine()
            shift = (shift + self.bias.to(scale.dtype) * scale).to(self.weight.dtype)
        return self._conv_forward(x, self.scaled_weight(scale, dtype), shift)


def _bn_tensors(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, ...]:
    return bn.weight, bn.bias, bn.running_mean, bn.running_var


def _affine(tensors: tuple[torch.Tensor, ...], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, beta - mean * s) of a BN's (or of concatenated BNs') (gamma, beta, mean, var), in at least fp32."""
    weight, bias, mean, var = tensors
    acc = torch.promote_types(var.dtype, torch.float32)
    scale = weight.to(acc) * torch.rsqrt(var.to(acc) + eps)
    return scale, bias.to(acc) - mean.to(acc) * scale


class _FoldedAffines:
    """The convs of one :func:`fold_frozen_batchnorm` call, whose BN scales and shifts are computed together
    (their BN tensors concatenated: about ten kernels for ResNet-101's 104, against five a conv) whenever one
    conv finds its own missing or stale (the first forward, a changed BN tensor, each captured step)."""

    def __init__(self, convs: list):
        self.convs = convs

    def refresh(self, capturing: bool) -> None:
        """Every conv's affine as :meth:`FoldedConv2d.frozen_affine` keeps it (BNs whose tensors require grad
        left out); made during a capture: held by the open shared_scaled_weights block."""
        groups: dict = {}
        for conv in self.convs:
            bn = conv._folded_bn
            tensors = _bn_tensors(bn)
            if not any(t.requires_grad for t in tensors):
                key = (bn.running_var.device, torch.promote_types(bn.running_var.dtype, torch.float32), bn.eps)
                groups.setdefault(key, []).append((conv, tensors))
        for (_, _, eps), members in groups.items():
            scale, shift = _affine([torch.cat(parts) for parts in zip(*(t for _, t in members))], eps)
            sizes = [c._folded_bn.num_features for c, _ in members]
            for (conv, tensors), s, t in zip(members, scale.split(sizes), shift.split(sizes)):
                versions = tuple(x._version for x in tensors)
                conv._affine_cache = ((eps, versions), tensors, capturing, s, {None: t})
                if capturing:
                    conv._hold_in_block()


def _conv_bn_pairs(model: nn.Module) -> Iterator[tuple[nn.Module, nn.Module]]:
    """(module, next module) candidates where the forward computes ``bn(conv(x))``: neighbours in
    a Sequential, and the ``conv_bn_pairs`` a module's class declares for its own forward."""
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            children = list(m)
            yield from zip(children, children[1:])
        for conv_name, bn_name in getattr(m, "conv_bn_pairs", ()):
            yield getattr(m, conv_name), getattr(m, bn_name)


def fold_frozen_batchnorm(model: SegmentationModel) -> int:
    """Fold every frozen BatchNorm into the Conv2d before it, in place; returns the pairs folded.

    Saves each BatchNorm's own elementwise pass over the activations (forward and backward). Exact
    only while BatchNorm is a fixed affine map, i.e. for a model built with ``freeze_bn=True``
    (ValueError otherwise). Parameters (same tensors, names and trainability, so optimiser groups
    and training are unchanged) and the state dict (names, shapes, values) stay as they are; the
    classes of the conv and BN change to :class:`FoldedConv2d` and :class:`FoldedBatchNorm2d`.
    Idempotent: folded pairs are skipped, so a second call returns 0.
    """
    if not getattr(model, "freeze_bn", False):
        raise ValueError("fold_frozen_batchnorm needs a model built with freeze_bn=True: only "
                         "BatchNorm frozen in eval mode is a fixed affine map that folds exactly")
    pairs = [(conv, bn) for conv, bn in _conv_bn_pairs(model)
             if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d]
    affines = _FoldedAffines([conv for conv, _ in pairs])
    for conv, bn in pairs:
        conv.__class__ = FoldedConv2d
        # plain attributes: nn.Module's child registration would list them twice in the module tree
        object.__setattr__(conv, "_folded_bn", bn)
        object.__setattr__(conv, "_folded_affines", affines)
        object.__setattr__(bn, "_folded_conv", conv)
        bn.__class__ = FoldedBatchNorm2d
    return len(pairs)


_MODELS = {m.arch: m for m in (DeepLabV2ResNet101, DeepLabV2VGG16, DeepLabV2Small)}
ARCHS = tuple(_MODELS)


def build_model(arch: str, num_classes: int, multi_level: bool = True, freeze_bn: bool = False,
                **options) -> SegmentationModel:
    """A freshly initialised model; ``options`` go to the constructor (``width`` for the small one).

    deeplabv2_vgg16 is single-level: it needs ``multi_level=False``.
    """
    if arch not in _MODELS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    return _MODELS[arch](num_classes, multi_level=multi_level, freeze_bn=freeze_bn, **options)


class ReleaseSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay as torch 0.4.1 applied it to the release's groups.

    A tensor listed k times in a group was updated k times per step, in sequence, and 0.4.1
    added the weight decay IN PLACE to the gradient each time, so with g = grad, buf = momentum
    buffer (zero at start), each of the k passes does::

        g = g + weight_decay * p;  buf = momentum * buf + g;  p = p - lr * buf

    Updates of different tensors do not interact, so this equals the release's pass over its
    314-entry list. Duplicates are counted at construction (the group keeps each tensor once and
    a ``multiplicity`` list beside ``params``); with multiplicity 1 everywhere this is exactly
    ``torch.optim.SGD(momentum=m, weight_decay=wd)``. Unlike 0.4.1, ``p.grad`` is left untouched.

    ``fused=True`` takes a tensor ``lr`` too and, like torch's fused optimisers, skips the whole
    step on the device when the optimiser's ``found_inf`` attribute (a float tensor set before
    :meth:`step`) is non-zero: the step then needs no host synchronisation and can be captured in a
    CUDA graph. On the Triton backend (CUDA tensors) all k passes of a tensor run in one kernel, which
    reads and writes each tensor once (``kernels/release_sgd.py``); elsewhere each pass is torch's
    fused SGD kernel.
    """

    def __init__(self, params, lr, momentum: float = 0.0, weight_decay: float = 0.0, fused: bool = False):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "fused": fused})

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(_count_duplicates(param_group))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            entries = [(p, k) for p, k in zip(group["params"], group["multiplicity"]) if p.grad is not None]
            if not entries:
                continue
            if group["fused"]:
                self._update_fused(entries, group["lr"], group["momentum"], group["weight_decay"])
            else:
                self._update(entries, group["lr"], group["momentum"], group["weight_decay"])
        return loss

    def _momentum_buffers(self, params, momentum: float):
        """Each tensor's momentum buffer (zeros at first) in the tensor's dtype and layout: one loaded from a
        checkpoint of another memory format (a run resumed across the fast-path switch) is converted once,
        as the fused kernels walk a tensor and its buffer in memory order."""
        if momentum == 0:
            return None
        for p in params:
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            elif buf.dtype != p.dtype or not _same_layout(p, buf):
                self.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf)
        return [self.state[p]["momentum_buffer"] for p in params]

    @staticmethod
    def _passes(entries, grads, weight_decay: float):
        """Pass r updates the tensors listed more than r times: yields (their indices, the tensors,
        their working gradients), the weight decay added to the gradients once more each pass
        (0.4.1's in-place add; pass 0 makes new tensors, so ``grads`` stay as they were)."""
        params = [p for p, _ in entries]
        for r in range(max(k for _, k in entries)):
            live = [i for i, (_, k) in enumerate(entries) if k > r]
            p_live, g_live = [params[i] for i in live], [grads[i] for i in live]
            if weight_decay != 0 and r == 0:  # every entry is live: one out-of-place multi-tensor add
                grads = g_live = torch._foreach_add(g_live, p_live, alpha=weight_decay)
            elif weight_decay != 0:
                torch._foreach_add_(g_live, p_live, alpha=weight_decay)
            yield live, p_live, g_live

    def _update(self, entries, lr: float, momentum: float, weight_decay: float) -> None:
        buffers = self._momentum_buffers([p for p, _ in entries], momentum)
        grads = [p.grad for p, _ in entries]
        for live, p_live, g_live in self._passes(entries, grads, weight_decay):  # foreach: a few launches a pass
            direction = g_live
            if buffers is not None:
                direction = [buffers[i] for i in live]
                torch._foreach_mul_(direction, momentum)
                torch._foreach_add_(direction, g_live)
            torch._foreach_add_(p_live, direction, alpha=-lr)

    def _update_fused(self, entries, lr, momentum: float, weight_decay: float) -> None:
        # A zero momentum buffer makes the first update buf = g, as SGD's first step.
        params = [p for p, _ in entries]
        buffers = self._momentum_buffers(params, momentum)
        found_inf = getattr(self, "found_inf", None)
        # Fused kernels walk a tensor, its gradient and its buffer in memory order: a gradient of another
        # layout or dtype (assigned by hand; autograd's follow their tensor's) is copied into the tensor's.
        grads = [p.grad if p.grad.dtype == p.dtype and _same_layout(p, p.grad) else torch.empty_like(p).copy_(p.grad)
                 for p in params]
        if _takes_release_sgd_kernel(params):
            from ..kernels.release_sgd import release_sgd_update

            with device_guard(params[0].device):
                release_sgd_update(params, grads, buffers, [k for _, k in entries], lr, momentum, weight_decay,
                                   found_inf)
            return
        # torch's kernel runs without weight decay (the passes accumulate it in the working gradients).
        for live, p_live, g_live in self._passes(entries, grads, weight_decay):
            torch._fused_sgd_(p_live, g_live, [] if buffers is None else [buffers[i] for i in live],
                              weight_decay=0.0, momentum=momentum, lr=lr, dampening=0.0, nesterov=False,
                              maximize=False, is_first_step=False, found_inf=found_inf)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides where a dimension is longer than 1: the elements in the same order."""
    if a.shape != b.shape:
        return False
    sa, sb = a.stride(), b.stride()
    return sa == sb or all(x == y for n, x, y in zip(a.shape, sa, sb) if n > 1)


def _takes_release_sgd_kernel(params) -> bool:
    """Whether ReleaseSGD's Triton kernel updates these tensors (their gradients and buffers in their dtype and
    layout): the Triton backend, dense float32/16 tensors of at most 2**31 - 1 elements on one device."""
    if get_backend(params[0].device) != "triton":
        return False
    return all((p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)))
               and p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.numel() < 2**31
               and p.device == params[0].device for p in params)


def _count_duplicates(group: dict) -> dict:
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    counts = Counter(id(p) for p in params)
    unique = list({id(p): p for p in params}.values())
    return {**group, "params": unique, "multiplicity": [counts[id(p)] for p in unique]}
