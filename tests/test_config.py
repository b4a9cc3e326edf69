"""Config: presets, the strict merge, command-line overrides, cross-key checks, the release's experiment files."""
import os
import re

import pytest

from advent_fast import train
from advent_fast.config import (
    Config,
    ConfigError,
    dump_config,
    from_dict,
    list_presets,
    load_config,
    merge,
    parse_yaml,
    set_value,
)


def test_presets_load_with_paper_values():
    assert {"embedded", "gta2cityscapes_r101", "gta2cityscapes_vgg16", "synthia2cityscapes_r101",
            "synthia2cityscapes_vgg16"} <= set(list_presets())
    gta = load_config("gta2cityscapes_r101")
    t = gta.train
    assert (t.lr, t.momentum, t.weight_decay, t.lr_d, t.betas_d, t.power) == (2.5e-4, 0.9, 5e-4, 1e-4, [0.9, 0.99], 0.9)
    assert (t.max_iters, t.stop_iter, t.seed, gta.run.snapshot_every) == (250_000, 120_000, 1234, 2000)
    assert (t.lambda_seg_main, t.lambda_seg_aux, t.lambda_adv_main, t.lambda_adv_aux,
            t.lambda_ent_main, t.lambda_ent_aux) == (1.0, 0.1, 0.001, 0.0002, 0.001, 0.0002)
    assert (t.source_batch_size, t.target_batch_size, t.entropy_ranking_ratio) == (1, 1, 0.3)
    assert gta.data.source_size == [1280, 720] and gta.data.target_size == [1024, 512]
    # Release quirks are the paper presets' defaults.
    assert gta.model.freeze_bn is False and gta.model.param_groups == "release"
    synthia = load_config("synthia2cityscapes_r101")
    assert synthia.data.num_classes == 16 and synthia.train.stop_iter == 90_000
    assert synthia.data.source_size == [1280, 760]
    vgg = load_config("synthia2cityscapes_vgg16")
    assert vgg.model.arch == "deeplabv2_vgg16" and vgg.model.multi_level is False
    assert load_config("embedded").model.arch == "deeplabv2_small"


@pytest.mark.parametrize("updates, key", [
    ({"train": {"lr_typo": 1.0}}, "train.lr_typo"),
    ({"trian": {"lr": 1.0}}, "trian"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"train": {"max_iters": 10.5}}, "train.max_iters"),
    ({"train": {"seed": True}}, "train.seed"),
    ({"model": {"multi_level": 1}}, "model.multi_level"),
    ({"data": {"source_size": 5}}, "data.source_size"),
    ({"data": {"source_size": [1, "a"]}}, "data.source_size[1]"),
    ({"train": 3}, "train"),
])
def test_merge_rejects_unknown_keys_and_wrong_types_by_name(updates, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        merge(Config(), updates)


@pytest.mark.parametrize("override, key", [
    ("train.mode=minent_rank", "train.mode"),
    ("train.precision=fp8", "train.precision"),
    ("train.compile=fastest", "train.compile"),
    ("data.image_reader=turbojpeg", "data.image_reader"),
    ("train.fast_path=maybe", "train.fast_path"),
    ("train.stop_iter=300000", "train.stop_iter"),
    ("train.entropy_ranking_ratio=0", "train.entropy_ranking_ratio"),
    ("data.num_classes=16", "data.num_classes"),  # embedded / GTA5 labels are 19-class
    ("model.param_groups=release", "model.param_groups"),  # no release grouping for the small model
    ("model.width=0", "model.width"),
    ("run.keep_snapshots=0", "run.keep_snapshots"),
    ("run.snapshot_every=0", "run.snapshot_every"),
    ("train.classifier_channels_multiple=0", "train.classifier_channels_multiple"),
    ("train.gradient_sync=nccl", "train.gradient_sync"),
])
def test_validation_names_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config("embedded", [override])


@pytest.mark.parametrize("other", ["train.fast_path=false", "train.compile=reduce-overhead"])
def test_cuda_graph_needs_a_sync_free_fast_path(other):
    assert load_config("embedded", ["train.cuda_graph=true"]).train.cuda_graph
    assert load_config("embedded", ["train.cuda_graph=true", "train.precision=fp16"]).train.cuda_graph
    with pytest.raises(ConfigError, match=re.escape("train.cuda_graph")):
        load_config("embedded", ["train.cuda_graph=true", other])


def test_overrides_parse_yaml_values():
    c = load_config("embedded", ["train.lr=1e-4", "train.lr_d=2.5E-5", "data.source_size=[64, 32]",
                                 "train.class_prior=null", "train.stop_iter=7", "train.max_iters=7"])
    assert c.train.lr == 1e-4 and isinstance(c.train.lr, float) and c.train.lr_d == 2.5e-5
    assert c.data.source_size == [64, 32] and c.train.class_prior is None and c.train.stop_iter == 7
    c = load_config("embedded", ["train.lr=1"])  # an int is a fine float
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float)
    assert parse_yaml("1e-4") == 1e-4
    with pytest.raises(ConfigError, match="section.key=value"):
        set_value(Config(), "lr=1")


def test_cross_key_checks():
    with pytest.raises(ConfigError, match="train.class_prior"):
        load_config("embedded", ["train.mode=source_only", "train.class_prior=prior.json"])
    with pytest.raises(ConfigError, match="data.source_root"):
        load_config("embedded", ["data.source_root=/somewhere"])
    with pytest.raises(ConfigError, match="data.num_classes"):
        load_config("gta2cityscapes_r101", ["data.source=synthia"])
    with pytest.raises(ConfigError, match="model.multi_level"):
        load_config("gta2cityscapes_vgg16", ["model.multi_level=true"])
    with pytest.raises(ConfigError, match="model.width"):  # the small model's only
        load_config("gta2cityscapes_r101", ["model.width=8"])
    with pytest.raises(ConfigError, match="train.stop_iter"):  # one step past the schedule's end
        load_config("embedded", ["train.max_iters=100", "train.stop_iter=101"])
    with pytest.raises(ConfigError, match="no config file or preset"):
        load_config("no_such_preset")


def test_round_trip_through_a_saved_dict(tmp_path):
    c = load_config("gta2cityscapes_r101", ["train.mode=minent_er"])
    assert from_dict(c.to_dict()) == c
    assert from_dict(parse_yaml(dump_config(c))) == c
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  mode: minent\n  lr: 1e-3\n")
    assert load_config(str(path)).train.lr == 1e-3


def test_cli_errors_name_the_key(capsys):
    assert train.main(["--set", "train.bogus=1", "--print-config"]) == 2
    assert "train.bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--mode", "nope"])  # argparse lists the modes
    assert train.main(["--mode", "minent", "--precision", "bf16", "--channels-last", "--print-config"]) == 0
    printed = parse_yaml(capsys.readouterr().out)
    assert printed["train"]["mode"] == "minent" and printed["train"]["precision"] == "bf16"
    assert printed["train"]["channels_last"] is True
    assert printed["train"]["fast_path"] is None and printed["train"]["compile"] == "none"
    assert train.main(["--no-fast-path", "--no-channels-last", "--compile", "default", "--print-config"]) == 0
    printed = parse_yaml(capsys.readouterr().out)["train"]
    assert (printed["fast_path"], printed["channels_last"], printed["compile"]) == (False, False, "default")
    assert printed["cuda_graph"] is None  # wherever it can be
    assert train.main(["--cuda-graph", "--print-config"]) == 0
    assert parse_yaml(capsys.readouterr().out)["train"]["cuda_graph"] is True
    assert train.main(["--no-cuda-graph", "--print-config"]) == 0
    assert parse_yaml(capsys.readouterr().out)["train"]["cuda_graph"] is False
    assert printed["activation_checkpointing"] is False
    assert train.main(["--activation-checkpointing", "--print-config"]) == 0
    assert parse_yaml(capsys.readouterr().out)["train"]["activation_checkpointing"] is True
    assert printed["deterministic"] is False
    assert train.main(["--deterministic", "--print-config"]) == 0
    assert parse_yaml(capsys.readouterr().out)["train"]["deterministic"] is True


# ---- the release's experiment files (advent/scripts/configs/*.yml) --------------------------------------------

# The release's defaults (advent/domain_adaptation/config.py), written as its YAML files write keys; paths into
# the release's own checkout (list files, experiment roots) left out.
RELEASE_DEFAULTS = """
SOURCE: GTA
TARGET: Cityscapes
NUM_WORKERS: 4
NUM_CLASSES: 19
GPU_ID: 0
TRAIN:
  SET_SOURCE: all
  SET_TARGET: train
  BATCH_SIZE_SOURCE: 1
  BATCH_SIZE_TARGET: 1
  IGNORE_LABEL: 255
  INPUT_SIZE_SOURCE: [1280, 720]
  INPUT_SIZE_TARGET: [1024, 512]
  INFO_SOURCE: ''
  MODEL: DeepLabv2
  MULTI_LEVEL: True
  RESTORE_FROM: ''
  IMG_MEAN: [104.00698793, 116.66876762, 122.67891434]
  LEARNING_RATE: 2.5e-4
  MOMENTUM: 0.9
  WEIGHT_DECAY: 0.0005
  POWER: 0.9
  LAMBDA_SEG_MAIN: 1.0
  LAMBDA_SEG_AUX: 0.1
  DA_METHOD: AdvEnt
  LEARNING_RATE_D: 1e-4
  LAMBDA_ADV_MAIN: 0.001
  LAMBDA_ADV_AUX: 0.0002
  LAMBDA_ENT_MAIN: 0.001
  LAMBDA_ENT_AUX: 0.0002
  MAX_ITERS: 250000
  EARLY_STOP: 120000
  SAVE_PRED_EVERY: 2000
  SNAPSHOT_DIR: ''
  RANDOM_SEED: 1234
  TENSORBOARD_LOGDIR: ''
  TENSORBOARD_VIZRATE: 100
TEST:
  MODE: best
  MODEL: [DeepLabv2]
  MODEL_WEIGHT: [1.0]
  MULTI_LEVEL: [True]
  RESTORE_FROM: ['']
  SNAPSHOT_DIR: ['']
  SNAPSHOT_STEP: 2000
  SNAPSHOT_MAXITER: 120000
  SET_TARGET: val
  BATCH_SIZE_TARGET: 1
  INPUT_SIZE_TARGET: [1024, 512]
  OUTPUT_SIZE_TARGET: [2048, 1024]
  WAIT_MODEL: True
"""
# The release's minent.yml, as it ships.
RELEASE_MINENT = """SOURCE: GTA
TARGET: Cityscapes
NUM_WORKERS: 4
TRAIN:
  DA_METHOD: MinEnt
  MODEL: DeepLabv2
  RESTORE_FROM: ../../pretrained_models/DeepLab_resnet_pretrained_imagenet.pth
  MULTI_LEVEL: True
  LAMBDA_ENT_MAIN: 0.001
  LAMBDA_ENT_AUX: 0.0002
TEST:
  MODE: best
"""


def release_file(tmp_path, text, name="experiment.yml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_release_defaults_are_the_paper_preset(tmp_path):
    preset = load_config("gta2cityscapes_r101").to_dict()
    release = load_config(release_file(tmp_path, RELEASE_DEFAULTS)).to_dict()
    # loader processes, how often TensorBoard draws images, the run folder: the release's, the preset's own
    assert (release["data"].pop("num_workers"), release["run"].pop("image_every"), release["run"].pop("dir")) == (
        4, 100, os.path.join("experiments", "snapshots", "GTA2Cityscapes_DeepLabv2_AdvEnt"))
    for section, key in (("data", "num_workers"), ("run", "image_every"), ("run", "dir")):
        preset[section].pop(key)
    assert release == preset

    minent = load_config(release_file(tmp_path, RELEASE_MINENT, "minent.yml"))
    assert minent.train.mode == "minent" and minent.data.num_workers == 4
    assert minent.model.init_weights == "../../pretrained_models/DeepLab_resnet_pretrained_imagenet.pth"
    # the command line still wins
    assert load_config(release_file(tmp_path, RELEASE_MINENT), updates={"train": {"mode": "minent_er"}}).train.mode \
        == "minent_er"


# Every release key with a setting: (its value in the file, the setting, the setting's value), each value unlike
# the preset's and every other's, so that a key mapped to the wrong setting shows.
RELEASE_SETTINGS = [
    ("NUM_WORKERS", 3, "data.num_workers", 3),
    ("DATA_DIRECTORY_SOURCE", "/data/GTA5", "data.source_root", "/data/GTA5"),
    ("DATA_DIRECTORY_TARGET", "/data/Cityscapes", "data.target_root", "/data/Cityscapes"),
    ("NUM_CLASSES", 19, "data.num_classes", 19),
    ("TRAIN.BATCH_SIZE_SOURCE", 2, "train.source_batch_size", 2),
    ("TRAIN.BATCH_SIZE_TARGET", 5, "train.target_batch_size", 5),
    ("TRAIN.INPUT_SIZE_SOURCE", [640, 360], "data.source_size", [640, 360]),
    ("TRAIN.INPUT_SIZE_TARGET", [512, 256], "data.target_size", [512, 256]),
    ("TRAIN.MULTI_LEVEL", False, "model.multi_level", False),
    ("TRAIN.RESTORE_FROM", "init.pth", "model.init_weights", "init.pth"),
    ("TRAIN.LEARNING_RATE", 1.5e-3, "train.lr", 1.5e-3),
    ("TRAIN.MOMENTUM", 0.85, "train.momentum", 0.85),
    ("TRAIN.WEIGHT_DECAY", 3e-4, "train.weight_decay", 3e-4),
    ("TRAIN.POWER", 0.8, "train.power", 0.8),
    ("TRAIN.LAMBDA_SEG_MAIN", 1.1, "train.lambda_seg_main", 1.1),
    ("TRAIN.LAMBDA_SEG_AUX", 0.11, "train.lambda_seg_aux", 0.11),
    ("TRAIN.LAMBDA_ADV_MAIN", 0.011, "train.lambda_adv_main", 0.011),
    ("TRAIN.LAMBDA_ADV_AUX", 0.0011, "train.lambda_adv_aux", 0.0011),
    ("TRAIN.LAMBDA_ENT_MAIN", 0.012, "train.lambda_ent_main", 0.012),
    ("TRAIN.LAMBDA_ENT_AUX", 0.0012, "train.lambda_ent_aux", 0.0012),
    ("TRAIN.LEARNING_RATE_D", 2e-4, "train.lr_d", 2e-4),
    ("TRAIN.MAX_ITERS", 200000, "train.max_iters", 200_000),
    ("TRAIN.EARLY_STOP", 90000, "train.stop_iter", 90_000),
    ("TRAIN.SAVE_PRED_EVERY", 500, "run.snapshot_every", 500),
    ("TRAIN.RANDOM_SEED", 7, "train.seed", 7),
    ("TRAIN.TENSORBOARD_LOGDIR", "tb", "run.tensorboard", True),
    ("TRAIN.TENSORBOARD_VIZRATE", 50, "run.image_every", 50),
    ("TEST.OUTPUT_SIZE_TARGET", [1024, 512], "data.eval_label_size", [1024, 512]),
    ("TRAIN.DA_METHOD", "MinEnt", "train.mode", "minent"),
]


def release_text(flat):
    """A release experiment file setting the flat keys ("TRAIN.LEARNING_RATE": value)."""
    import yaml

    nested = {}
    for key, value in flat.items():
        section, _, name = key.rpartition(".")
        (nested.setdefault(section, {}) if section else nested)[name] = value
    return yaml.safe_dump(nested)


def setting(config, name):
    section, key = name.split(".")
    return getattr(getattr(config, section), key)


def test_every_release_key_becomes_its_setting(tmp_path):
    from advent_fast.release_config import SETTINGS

    assert set(SETTINGS) | {"TRAIN.DA_METHOD"} == {key for key, *_ in RELEASE_SETTINGS}
    config = load_config(release_file(tmp_path, release_text({key: value for key, value, *_ in RELEASE_SETTINGS})))
    preset = load_config("gta2cityscapes_r101")
    for key, _, name, expected in RELEASE_SETTINGS:
        assert setting(config, name) == expected, key
        assert setting(preset, name) != expected or key == "NUM_CLASSES", key


def test_release_list_files_sets_and_run_folders(tmp_path):
    lists = {"SOURCE": "SYNTHIA", "NUM_CLASSES": 16, "DATA_LIST_SOURCE": "lists/synthia_{}.txt",
             "DATA_LIST_TARGET": "lists/cityscapes_{}.txt", "TRAIN.SET_SOURCE": "rand"}
    c = load_config(release_file(tmp_path, release_text(lists)))
    assert (c.data.source, c.data.num_classes, c.data.source_size) == ("synthia", 16, [1280, 760])
    assert (c.data.source_list, c.data.target_list, c.data.val_list) == (
        "lists/synthia_rand.txt", "lists/cityscapes_train.txt", "lists/cityscapes_val.txt")
    assert c.run.dir == os.path.join("experiments", "snapshots", "SYNTHIA2Cityscapes_DeepLabv2_AdvEnt")  # release's
    named = load_config(release_file(tmp_path, release_text({"EXP_NAME": "my_experiment"})))
    assert named.run.dir == os.path.join("experiments", "snapshots", "my_experiment")
    derived = load_config(release_file(tmp_path, release_text({"EXP_ROOT": "exp", "TRAIN.DA_METHOD": "MinEnt"})))
    assert derived.run.dir == os.path.join("exp", "snapshots", "GTA2Cityscapes_DeepLabv2_MinEnt")
    given = load_config(release_file(tmp_path, release_text({"EXP_NAME": "x", "TRAIN.SNAPSHOT_DIR": "out/run"})))
    assert given.run.dir == "out/run"


@pytest.mark.parametrize("text, message", [
    ("SOURCE: GTA\nTRAIN:\n  LEARNING_RATES: 0.1\n", "unknown release config key(s) TRAIN.LEARNING_RATES"),
    ("SOURCE: GTA\nFOO: 1\n", "unknown release config key(s) FOO"),
    ("SOURCE: GTA\nTRAIN:\n  LEARNING_RATE: fast\n", "TRAIN.LEARNING_RATE"),
    ("SOURCE: GTA\nTRAIN:\n  IGNORE_LABEL: 254\n", "'TRAIN.IGNORE_LABEL'"),
    ("SOURCE: GTA\nTRAIN:\n  IMG_MEAN: [0, 0, 0]\n", "Caffe mean"),
    ("SOURCE: GTA\nTRAIN:\n  MODEL: DeepLabv3\n", "DeepLabv2 (ResNet-101) only"),
    ("SOURCE: GTA\nTRAIN:\n  DA_METHOD: AdaptSeg\n", "one of AdvEnt, MinEnt"),
    ("SOURCE: Foggy\n", "one of GTA, SYNTHIA"),
    ("SOURCE: GTA\nTARGET: Mapillary\n", "Cityscapes only"),
    ("SOURCE: GTA\nGPU_ID: 1\n", "CUDA_VISIBLE_DEVICES"),
    ("SOURCE: GTA\nTRAIN:\n  SET_SOURCE: part\n", "give its list file (DATA_LIST_SOURCE"),
    ("SOURCE: GTA\nTRAIN:\n  SET_TARGET: train_extra\n", "the target images are Cityscapes' train split"),
    ("SOURCE: GTA\nTEST:\n  SET_TARGET: test\n", "reads Cityscapes' val split"),
    ("SOURCE: GTA\nTRAIN: 3\n", "'TRAIN' in"),
    ("SOURCE: SYNTHIA\nNUM_CLASSES: 19\n", "'data.num_classes' must be 16"),
])
def test_release_files_are_strict(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(release_file(tmp_path, text))
    assert message in str(err.value), err.value


def test_a_file_mixing_the_formats_is_this_projects_and_names_the_stray_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config section 'SOURCE'"):
        load_config(release_file(tmp_path, "SOURCE: GTA\ntrain:\n  lr: 0.1\n"))


def test_a_release_file_trains_from_the_command_line(tmp_path, capsys):
    path = release_file(tmp_path, RELEASE_MINENT)
    assert train.main(["--config", path, "--print-config"]) == 0
    assert parse_yaml(capsys.readouterr().out)["train"]["mode"] == "minent"
