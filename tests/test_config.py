"""Config: presets, the strict merge, command-line overrides, cross-key checks."""
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
