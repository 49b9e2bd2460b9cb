import pytest

from largebatch.config import (
    TrainConfig,
    apply_overrides,
    load_config,
    parse_assignment,
    save_config,
)
from largebatch.errors import ConfigError


def test_defaults_are_valid():
    TrainConfig().validate()


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: digits\nlr: 1\nlr_decay_epochs: [3, 6]\nepochs: 4\n")
    config = load_config(path)
    assert config.dataset == "digits"
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.lr_decay_epochs == [3, 6]
    config = apply_overrides(config, dict([parse_assignment("epochs=7")]))
    assert config.epochs == 7


def test_saved_config_reads_back_identically(tmp_path):
    config = TrainConfig(dataset="synthetic", model="mlp", lr_decay_epochs=[2], data_dir=None)
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    "values, message",
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"lr": -0.1}, "lr must be > 0"),
        ({"momentum": 1.0}, "momentum"),
        ({"lr_decay": 0.0}, "lr_decay"),
        ({"model": "vgg"}, "unknown model 'vgg'"),
        ({"dataset": "imagenet21k"}, "unknown dataset"),
        ({"method": "lamb"}, "unknown method"),
        ({"max_batch_size": 64}, "at least batch_size"),
        ({"max_batch_size": 200}, "multiple of batch_size"),
        ({"lr_decay_epochs": [5, 2]}, "increasing"),
        ({"parallel": "fsdp2"}, "unknown parallel 'fsdp2'; choose one of: ddp, flat"),
    ],
)
def test_out_of_range_values_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), values).validate()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"learning_rate": 0.1}, "unknown config key 'learning_rate'"),
        ({"epochs": "ten"}, "epochs must be int"),
        ({"epochs": 2.5}, "epochs must be int"),
        ({"resume": "yes"}, "resume must be bool"),
        ({"lr_decay_epochs": "30"}, "list of int"),
        ({"epochs": None}, "may not be empty"),
    ],
)
def test_unknown_keys_and_wrong_types_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), values)


def test_parse_assignment_reads_yaml_values():
    assert parse_assignment("lr_decay_epochs=[30, 60]") == ("lr_decay_epochs", [30, 60])
    assert parse_assignment("data_dir=") == ("data_dir", None)
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignment("epochs")


@pytest.mark.parametrize("text", ["[unclosed", "- a\n- b\n", "key: [1, 2"])
def test_bad_config_files_are_config_errors(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
