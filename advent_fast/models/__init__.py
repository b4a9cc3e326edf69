"""Segmentation networks, discriminator, and weight/checkpoint loading."""
from .deeplabv2 import (
    ARCHS,
    GROUPINGS,
    ASPPHead,
    DeepLabV2ResNet101,
    DeepLabV2Small,
    DeepLabV2VGG16,
    FusedBatchNorm2d,
    FusedFoldedBatchNorm2d,
    ReleaseSGD,
    SegmentationModel,
    build_model,
    fold_frozen_batchnorm,
    shared_scaled_weights,
    use_fused_batchnorm,
)
from .discriminator import FCDiscriminator
from .space_to_batch import batch_to_space, space_to_batch, use_space_to_batch
from .weights import (
    CHECKPOINT_FORMAT,
    checkpoint_dict,
    load_init_weights,
    load_model_state,
    model_from_checkpoint,
    save_checkpoint,
)

__all__ = [
    "ARCHS",
    "ASPPHead",
    "CHECKPOINT_FORMAT",
    "DeepLabV2ResNet101",
    "DeepLabV2Small",
    "DeepLabV2VGG16",
    "FCDiscriminator",
    "FusedBatchNorm2d",
    "FusedFoldedBatchNorm2d",
    "GROUPINGS",
    "ReleaseSGD",
    "SegmentationModel",
    "build_model",
    "checkpoint_dict",
    "fold_frozen_batchnorm",
    "load_init_weights",
    "load_model_state",
    "model_from_checkpoint",
    "save_checkpoint",
    "shared_scaled_weights",
    "batch_to_space",
    "space_to_batch",
    "use_fused_batchnorm",
    "use_space_to_batch",
]
