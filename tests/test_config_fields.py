"""`lmforge.fields.dataclass_from_dict`: the one strict dict -> settings dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from lmforge.config import Config
from lmforge.errors import LmforgeError
from lmforge.fields import dataclass_from_dict, field_names
from lmforge.finetune.lora import LoRAConfig
from lmforge.train.config import TrainConfig


@dataclass
class Point:
    x: int = 0
    y: int = 0
    seen: int = field(default=0, init=False)


def test_known_keys_build_the_dataclass():
    assert dataclass_from_dict(Point, {"x": 2}, "point") == Point(x=2)
    assert field_names(Point) == ("x", "y")


def test_unknown_keys_are_named_with_what_was_read_and_the_known_ones():
    with pytest.raises(LmforgeError) as e:
        dataclass_from_dict(Point, {"x": 1, "z": 2, "seen": 3}, "p.json", key="coordinate")
    assert str(e.value) == "p.json: unknown coordinate(s) seen, z; known coordinates: x, y"


def test_a_value_that_is_not_a_mapping_is_refused():
    with pytest.raises(LmforgeError, match="run.toml: expected a mapping of keys"):
        dataclass_from_dict(Point, [("x", 1)], "run.toml")  # type: ignore[arg-type]


def test_the_three_settings_classes_say_what_they_read():
    with pytest.raises(LmforgeError, match=r"model config: unknown config field\(s\) n_layers; known config fields: .*n_layer"):
        Config.from_dict({"n_layers": 3})
    with pytest.raises(LmforgeError, match=r"lr.toml: unknown key\(s\) learning_rate; known keys: .*\blr\b"):
        TrainConfig.from_dict({"learning_rate": 1e-3}, "lr.toml")
    with pytest.raises(LmforgeError, match=r"LoRA config: unknown LoRA setting\(s\) rank; known LoRA settings: alpha, dropout, r, rslora, targets"):
        LoRAConfig.from_dict({"rank": 8})


def test_an_adapters_config_gives_its_lora_settings_and_nothing_else():
    cfg = LoRAConfig(r=4, alpha=8, targets=("q", "v"), rslora=True)
    meta = {"format": "lmforge.adapter", "version": 1, **cfg.to_dict(), "base": "x", "trainable": ["score.weight"]}
    assert LoRAConfig.from_adapter_config(meta) == cfg
    assert LoRAConfig.from_adapter_config({"format": "lmforge.adapter", "r": 2}) == LoRAConfig(r=2)


def test_the_three_settings_classes_check_value_types():
    with pytest.raises(LmforgeError, match=r'model config: n_layer must be an integer, got "four" \(a string\)'):
        Config.from_dict({"n_layer": "four"})
    with pytest.raises(LmforgeError, match=r'lr.toml: lr must be a number, got "fast" \(a string\)'):
        TrainConfig.from_dict({"lr": "fast"}, "lr.toml")
    with pytest.raises(LmforgeError, match=r'LoRA config: r must be an integer, got "8" \(a string\)'):
        LoRAConfig.from_dict({"r": "8"})
    with pytest.raises(LmforgeError, match=r"LoRA config: targets must be a list of strings"):
        LoRAConfig.from_dict({"targets": [1]})
    assert LoRAConfig.from_dict({"alpha": 8, "targets": ["q"]}) == LoRAConfig(alpha=8, targets=("q",))  # an int is a number
