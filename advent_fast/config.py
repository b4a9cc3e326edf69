"""Training configuration: typed defaults, YAML presets, a strict merge and command-line overrides.

The defaults below are the ADVENT release's GTA5 -> Cityscapes ResNet-101 settings (order of
operations, lambdas, optimisers, poly schedules). Presets in ``advent_fast/configs/*.yaml`` change
only what differs. Every merge is strict: an unknown key or a value of the wrong type raises a
:class:`ConfigError` that names the key.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

MODES = ("source_only", "minent", "minent_er", "advent", "advent_minent")
SOURCES = ("embedded", "gta5", "synthia", "cityscapes")
ARCHS = ("deeplabv2_r101", "deeplabv2_vgg16", "deeplabv2_small")
PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEFAULT_PRESET = "embedded"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending key."""


@dataclass
class DataConfig:
    # embedded | gta5 | synthia | cityscapes (embedded: generated GTA5/Cityscapes-format data; cityscapes: its
    # labelled train split, the paper's oracle, with train.mode source_only)
    source: str = "gta5"
    source_root: Optional[str] = None  # GTA5, SYNTHIA-RAND-CITYSCAPES or Cityscapes root
    target_root: Optional[str] = None  # Cityscapes root (leftImg8bit/, gtFine/)
    source_list: Optional[str] = None  # release-style list files (None: every image in the folder)
    target_list: Optional[str] = None  # Cityscapes train images used as the target
    val_list: Optional[str] = None  # Cityscapes val images evaluated
    embedded_root: Optional[str] = None  # where the embedded data is cached (None: $ADVENT_FAST_DATA)
    source_size: Optional[List[int]] = field(default_factory=lambda: [1280, 720])  # [w, h]; None: embedded
    target_size: Optional[List[int]] = field(default_factory=lambda: [1024, 512])  # [w, h]; None: embedded
    eval_label_size: Optional[List[int]] = field(default_factory=lambda: [2048, 1024])  # None: native
    num_classes: int = 19
    num_workers: Optional[int] = None  # loader processes per stream and for evaluation; None: 0 on CPU, 4 on GPU
    # Training images: pillow (the release's decode and bicubic resize) | opencv (same decoded pixels, OpenCV's
    # resize: faster, slightly different values). Evaluation always reads as the release does.
    image_reader: str = "pillow"


@dataclass
class ModelConfig:
    arch: str = "deeplabv2_r101"
    multi_level: bool = True  # aux head on layer3 (ResNet only)
    # ImageNet weights (DeepLab_resnet_pretrained_imagenet.pth), or a whole model to start from (models.weights)
    init_weights: Optional[str] = None
    freeze_bn: bool = False  # release quirk: False = BatchNorm in train mode (batch-1 statistics)
    param_groups: str = "release"  # release quirk: "release" (repeated backbone tensors) | "clean"
    discriminator_width: int = 64  # ndf of FCDiscriminator
    width: Optional[int] = None  # deeplabv2_small only: base channel width (None: its default)


@dataclass
class TrainConfig:
    mode: str = "advent"
    seed: int = 1234
    max_iters: int = 250_000  # length of the poly schedule
    stop_iter: int = 120_000  # the release stops early; the schedule still runs to max_iters
    source_batch_size: int = 1  # global batch, split over processes
    target_batch_size: int = 1
    lr: float = 2.5e-4  # generator SGD; heads get 10x
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_d: float = 1e-4  # discriminators, Adam
    betas_d: List[float] = field(default_factory=lambda: [0.9, 0.99])
    power: float = 0.9  # poly schedule exponent, for G and D
    lambda_seg_main: float = 1.0
    lambda_seg_aux: float = 0.1
    lambda_adv_main: float = 0.001
    lambda_adv_aux: float = 0.0002
    lambda_ent_main: float = 0.001
    lambda_ent_aux: float = 0.0002
    lambda_cp_main: float = 0.001  # not in the release: the entropy weights are used for CP
    lambda_cp_aux: float = 0.0002
    entropy_ranking_ratio: float = 0.3  # minent_er: fraction of highest-entropy pixels kept per image
    class_prior: Optional[str] = None  # class-ratio prior file; adds the CP loss to target-side modes
    class_prior_mu: float = 0.5
    # The GPU fast path (README "Fast path"): losses on the 1/8-resolution logits with the upsampling
    # fused into the kernels, fused optimisers, frozen BatchNorm folded into the convolutions (with
    # model.freeze_bn), and the "auto" values below. null: on for CUDA devices, off elsewhere.
    fast_path: Optional[bool] = None
    # fp32 | bf16 | fp16 (with a gradient scaler) | auto: on the GPU fast path backend.auto_precision (bf16;
    # fp16 on compute capability 7.x: V100, T4; fp32 below); else fp32
    precision: str = "auto"
    channels_last: Optional[bool] = None  # null: on the fast path only
    compile: str = "none"  # torch.compile of G and D: none | default | max-autotune-no-cudagraphs | reduce-overhead
    # The whole step (both G passes, both D, the optimisers) replayed as one CUDA graph after a few
    # eager steps: needs the fast path on CUDA devices and no reduce-overhead.
    # null: on where it can be (and torch.compile is off), falling back to eager steps with a warning
    # if the capture fails or a batch changes shape; true: required, such a failure is an error.
    cuda_graph: Optional[bool] = None
    # How several processes average their gradients: ddp (DistributedDataParallel's all-reduces inside
    # the last backward) or after_backward (one all-reduce a gradient bucket after the step's backwards,
    # then the optimisers; a whole-step CUDA graph then captures everything up to the all-reduces).
    # auto: after_backward where the CUDA graph is on, else ddp. One process: after_backward runs the
    # optimisers after the graph instead of inside it, and ddp nothing.
    gradient_sync: str = "auto"
    # Train-mode BatchNorm with the residual add and ReLU after it in fused kernels (advent_fast.batch_norm;
    # channels_last CUDA activations, outside torch.compile); with model.freeze_bn on the fast path, the
    # folded BatchNorm's shift with them (the release path's eval-mode BatchNorm is left as it is). Same
    # values up to float rounding; 1.12x the AdvEnt step on an H200, off until its kernels' CUDA tests have run.
    fused_batchnorm: bool = False
    # Every trainable convolution weight and bias cast to the autocast dtype once a step by one autograd node
    # (advent_fast.weight_casts), whose backward casts their gradients back and adds them to the step's earlier
    # ones in one pass (multi-tensor kernels on GPUs): a few launches where autocast and autograd take two
    # kernels a tensor. Fast path with bf16 or fp16, without torch.compile or DDP. Bit-identical; off: 1.02x
    # the AdvEnt step on an H200.
    fused_weight_casts: bool = False
    # The classifier's convolutions with their output channels padded by zero filters to a multiple of
    # this (8: what 16-bit tensor-core convolutions want; 19 classes are none), the padding sliced off the
    # logits. Same values up to float rounding, state dict unchanged; 1 (off): 0.99x the AdvEnt step on an H200.
    classifier_channels_multiple: int = 1
    # The backbone's dilated 3x3 convolutions run undilated on the input's d x d phases stacked along the batch
    # (advent_fast.models.space_to_batch): what cuDNN's dilated convolutions cost against undilated ones of the
    # same size. Same values up to float rounding, state dict unchanged; off: 0.90x the AdvEnt step on an H200.
    space_to_batch: bool = False
    # Keep only each backbone block's input for the backward and recompute the block there: a
    # fraction of the activation memory for about one more backbone forward per step. Exact.
    activation_checkpointing: bool = False
    target_losses: str = "fused"  # fused (advent_fast ops) | reference (advent_fast.reference)
    max_nonfinite_steps: int = 5  # stop after this many consecutive steps with a non-finite loss
    cudnn_benchmark: bool = True  # release setting (train.deterministic turns it off)
    # Bit-identical runs on a GPU from the same seed: deterministic cuDNN algorithms (no benchmark) and
    # torch.use_deterministic_algorithms, process-wide. On CUDA it needs the fused upsample+losses (fast path,
    # target_losses fused): the release path's upsampling backward and NLLLoss have no deterministic CUDA
    # kernels. CPU runs are deterministic either way.
    deterministic: bool = False


@dataclass
class EvalConfig:
    every: int = 2000  # evaluate on the target val split every N iterations (0: only at the end)
    max_images: Optional[int] = None  # evaluate on the first N val images (None: all)
    batch_size: int = 1
    precision: str = "fp32"  # fp32 (release) | bf16 | fp16 | auto (backend.auto_precision on GPUs: bf16, fp16 or fp32)


@dataclass
class RunConfig:
    dir: Optional[str] = None  # None: runs/<source>_<arch>_<mode>_<time>
    snapshot_every: int = 2000
    # null: every snapshot is kept (release; a ResNet-101 snapshot is 170 MiB, 60 of them a 120k run). N: the N
    # snapshots with the best in-training val mIoU (eval.every), the most recent among equals and without one
    keep_snapshots: Optional[int] = None
    log_every: int = 10  # JSONL metrics (and TensorBoard scalars)
    tensorboard: bool = False
    image_every: int = 1000  # TensorBoard images (predictions, entropy maps)
    progress: bool = True  # tqdm bar
    cpu_threads: Optional[int] = None  # torch intra-op threads (None: torch's default, all cores)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "data.source": SOURCES,
    "data.image_reader": ("pillow", "opencv"),
    "model.arch": ARCHS,
    "model.param_groups": ("release", "clean"),
    "train.mode": MODES,
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.compile": ("none", "default", "max-autotune-no-cudagraphs", "reduce-overhead"),
    "train.target_losses": ("fused", "reference"),
    "train.gradient_sync": ("auto", "ddp", "after_backward"),
    "eval.precision": ("fp32", "bf16", "fp16", "auto"),
}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str) -> Any:
    """A YAML file's contents ({} for an empty one)."""
    with open(path) as f:
        return parse_yaml(f.read()) or {}


def _check_value(name: str, annotation: Any, value: Any) -> Any:
    """The value converted to the field's type, or a ConfigError naming the key."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _check_value(name, next(a for a in args if a is not type(None)), value)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{name}' expects a list, got {value!r}")
        return [_check_value(f"{name}[{i}]", args[0], v) for i, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[annotation]
    if not ok:
        raise ConfigError(f"config key '{name}' expects {annotation.__name__}, got {value!r}")
    return float(value) if annotation is float else value


def merge(config: Config, updates: Dict[str, Any], source: str = "") -> Config:
    """Merge a nested dict into ``config`` in place, rejecting unknown keys and wrong types."""
    where = f" (in {source})" if source else ""
    if not isinstance(updates, dict):
        raise ConfigError(f"a config must be a mapping of sections{where}, got {updates!r}")
    for section_name, section_updates in updates.items():
        section = getattr(config, str(section_name), None)
        if not dataclasses.is_dataclass(section):
            raise ConfigError(f"unknown config section '{section_name}'{where}; "
                              f"known: {', '.join(f.name for f in dataclasses.fields(config))}")
        if not isinstance(section_updates, dict):
            raise ConfigError(f"config section '{section_name}' must be a mapping{where}")
        hints = typing.get_type_hints(type(section))
        for key, value in section_updates.items():
            name = f"{section_name}.{key}"
            if key not in hints:
                raise ConfigError(f"unknown config key '{name}'{where}")
            setattr(section, key, _check_value(name, hints[key], value))
    return config


def set_value(config: Config, assignment: str) -> Config:
    """Apply one ``section.key=value`` override (the value is read as YAML)."""
    path, sep, text = assignment.partition("=")
    if not sep or path.count(".") != 1:
        raise ConfigError(f"an override must look like section.key=value, got {assignment!r}")
    section, key = path.strip().split(".")
    return merge(config, {section: {key: parse_yaml(text)}}, source=f"--set {assignment}")


def preset_path(name_or_path: str) -> str:
    """A preset name (``gta2cityscapes_r101``) or a path to a YAML file."""
    if os.path.isfile(name_or_path):
        return name_or_path
    path = os.path.join(PRESET_DIR, f"{name_or_path}.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"no config file or preset named {name_or_path!r}; presets: "
                          f"{', '.join(list_presets())}")
    return path


def list_presets() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def load_config(name_or_path: Optional[str] = DEFAULT_PRESET, overrides: Sequence[str] = (),
                updates: Optional[Dict[str, Any]] = None) -> Config:
    """Defaults <- a preset or YAML file <- ``section.key=value`` overrides <- ``updates`` (a
    nested dict: the dedicated command-line flags win), then validated."""
    from . import release_config  # it raises this module's ConfigError

    config = Config()
    if name_or_path is not None:
        path = preset_path(name_or_path)
        values = read_yaml(path)
        if release_config.is_release_config(values):  # the release's experiment file (advent.yml, ...)
            preset, settings = release_config.from_release(values, path)
            merge(config, read_yaml(preset_path(preset)), source=preset)
            for release_key, name, value in settings:
                section, key = name.split(".")
                try:
                    merge(config, {section: {key: value}})
                except ConfigError as err:
                    raise ConfigError(f"{err} (from the release's {release_key} in {path})") from None
        else:
            merge(config, values, source=path)
    for assignment in overrides:
        set_value(config, assignment)
    if updates:
        merge(config, updates, source="command line")
    validate(config)
    return config


def from_dict(values: Dict[str, Any]) -> Config:
    """A Config from a saved (complete) dict, e.g. a run's config.yaml or a checkpoint's."""
    config = merge(Config(), copy.deepcopy(values), source="saved config")
    validate(config)
    return config


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def save_config(config: Config, path: str) -> None:
    with open(path, "w") as f:
        f.write(dump_config(config))


def validate(config: Config) -> None:
    """Checks across keys and ranges; a ConfigError names the key."""
    for name, allowed in CHOICES.items():
        section, key = name.split(".")
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"config key '{name}' must be one of {', '.join(allowed)}; got {value!r}")
    d, m, t, e, r = config.data, config.model, config.train, config.eval, config.run
    for name, value in [("data.source_size", d.source_size), ("data.target_size", d.target_size),
                        ("data.eval_label_size", d.eval_label_size)]:
        if value is not None and (len(value) != 2 or min(value) < 1):
            raise ConfigError(f"config key '{name}' must be [width, height] of positive ints, got {value}")
        if value is None and d.source != "embedded" and name != "data.eval_label_size":
            raise ConfigError(f"config key '{name}' may be null only with data.source: embedded")
    if d.source == "embedded" and (d.source_root or d.target_root):
        raise ConfigError("config keys 'data.source_root'/'data.target_root' are set but data.source is "
                          "embedded: choose a preset for your data (--config gta2cityscapes_r101, ...) "
                          "or --set data.source=gta5|synthia|cityscapes")
    if len(t.betas_d) != 2:
        raise ConfigError(f"config key 'train.betas_d' must hold two numbers, got {t.betas_d}")
    positive = {
        "data.num_classes": d.num_classes, "model.discriminator_width": m.discriminator_width,
        "train.max_iters": t.max_iters, "train.source_batch_size": t.source_batch_size,
        "train.target_batch_size": t.target_batch_size, "train.max_nonfinite_steps": t.max_nonfinite_steps,
        "run.snapshot_every": r.snapshot_every, "run.log_every": r.log_every,
        "run.image_every": r.image_every, "eval.batch_size": e.batch_size,
        "train.classifier_channels_multiple": t.classifier_channels_multiple,
    }
    non_negative = {"data.num_workers": d.num_workers or 0, "train.stop_iter": t.stop_iter, "train.seed": t.seed,
                    "train.lr": t.lr, "train.lr_d": t.lr_d, "train.weight_decay": t.weight_decay,
                    "train.momentum": t.momentum, "eval.every": e.every}
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{name}' must be positive, got {value}")
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key '{name}' must be >= 0, got {value}")
    if r.cpu_threads is not None and r.cpu_threads < 1:
        raise ConfigError(f"config key 'run.cpu_threads' must be positive or null, got {r.cpu_threads}")
    if r.keep_snapshots is not None and r.keep_snapshots < 1:
        raise ConfigError(f"config key 'run.keep_snapshots' must be positive or null, got {r.keep_snapshots}")
    if e.max_images is not None and e.max_images < 1:
        raise ConfigError(f"config key 'eval.max_images' must be positive or null, got {e.max_images}")
    if t.stop_iter > t.max_iters:
        raise ConfigError(f"config key 'train.stop_iter' ({t.stop_iter}) exceeds train.max_iters "
                          f"({t.max_iters}): the poly schedule would go negative")
    if not 0.0 < t.entropy_ranking_ratio <= 1.0:
        raise ConfigError(f"config key 'train.entropy_ranking_ratio' must be in (0, 1], "
                          f"got {t.entropy_ranking_ratio}")
    if t.class_prior is not None and t.mode == "source_only":
        raise ConfigError("config key 'train.class_prior' needs a target-side mode; "
                          "train.mode is source_only")
    if d.source == "synthia" and d.num_classes != 16:
        raise ConfigError(f"config key 'data.num_classes' must be 16 with data.source: synthia, "
                          f"got {d.num_classes} (the synthia2cityscapes_* presets set it, and the release's "
                          f"SYNTHIA source size 1280x760)")
    if d.source in ("embedded", "gta5") and d.num_classes != 19:
        raise ConfigError(f"config key 'data.num_classes' must be 19 with data.source: {d.source} "
                          f"(GTA5 labels), got {d.num_classes}")
    if m.width is not None and (m.arch != "deeplabv2_small" or m.width < 1):
        raise ConfigError(f"config key 'model.width' is a positive width for deeplabv2_small only "
                          f"(arch {m.arch}, width {m.width})")
    if m.param_groups == "release" and m.arch != "deeplabv2_r101":
        raise ConfigError(f"config key 'model.param_groups' must be clean for {m.arch} "
                          f"(the release grouping is a quirk of the release's ResNet-101 code)")
    if t.cuda_graph is True and (t.fast_path is False or t.compile == "reduce-overhead"):
        raise ConfigError("config key 'train.cuda_graph' needs train.fast_path (true or null) and train.compile "
                          f"other than reduce-overhead (got fast_path {t.fast_path}, compile {t.compile})")
    if m.multi_level and m.arch == "deeplabv2_vgg16":
        raise ConfigError("config key 'model.multi_level' must be false for deeplabv2_vgg16 "
                          "(single level, as in the paper)")
