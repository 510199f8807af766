"""The typed run config: the shipped configs and a config.yaml saved before it existed load to the same values; it
is frozen; every field has its flag and its kind."""
import dataclasses
import glob
import json
import os

import pytest
import yaml

from helpers import ROOT
from xception_mx.config import SCHEMA, RunConfig, build_parser, dump_yaml, load_yaml, resolve, upgrade_saved

DATA = os.path.join(ROOT, "tests", "data")
#: Keys added after the fixtures were saved, with their defaults (a saved run's manifest is upgraded differently:
#: it computed at the paper's widths, so ``upgrade_saved`` gives it channel_multiple 1).
ADDED_SINCE = {"channel_multiple": "auto"}
#: Values a shipped config changed since then (the demo keeps its last 2 checkpoints and the best).
CHANGED_SINCE = {"demo_digits.yaml": {"keep_last": 2}}


def _before(name: str) -> dict:
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))),
                         ids=os.path.basename)
def test_every_shipped_config_loads_to_the_values_the_dict_config_had(path):
    expected = _before("configs_resolved_before_typed.json")[os.path.basename(path)]
    changed = CHANGED_SINCE.get(os.path.basename(path), {})
    assert resolve(load_yaml(path)).to_dict() == {**expected, **ADDED_SINCE, **changed}


def test_a_config_yaml_and_a_manifest_config_saved_before_the_typed_config_load_unchanged(tmp_path):
    before = _before("config_saved_before_typed.json")
    expected = {**before, **ADDED_SINCE}
    from_yaml = resolve(load_yaml(os.path.join(DATA, "config_saved_before_typed.yaml")))
    from_manifest = resolve(upgrade_saved(before))  # what plan_run does with a manifest's config
    assert from_yaml.to_dict() == expected and from_manifest == from_yaml.replace(channel_multiple="1")
    assert from_yaml.gpus == (0, 1) and from_yaml.filter_list == (8, 8, 16, 16, 24, 24, 32)
    dump_yaml(from_yaml, str(tmp_path / "config.yaml"))  # and what we write reads back the same
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == expected


def test_the_config_is_frozen_and_replace_rechecks_nothing_silently():
    config = resolve({}, {"lr": "0.1"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.2  # type: ignore[misc]
    changed = config.replace(lr=0.2)
    assert (config.lr, changed.lr) == (0.1, 0.2)


def test_every_field_has_a_flag_and_a_kind_that_matches_its_type():
    kinds = {"int": int, "float": float, "str": str, "bool": bool, "ints": tuple, "floats": tuple,
             "optional_int": int}
    names = {f.name for f in dataclasses.fields(RunConfig)}
    assert names == {opt.name for opt in SCHEMA}
    flags = {a.dest for a in build_parser()._actions}
    assert names <= flags
    for opt in SCHEMA:
        if opt.default is not None:
            assert isinstance(opt.default, kinds[opt.kind]), opt.name
    assert resolve({}, {"mean": "1,2,3", "gpus": "0"}).mean == (1.0, 2.0, 3.0)
