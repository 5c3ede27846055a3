"""Tests for alwayssparse.config: dotted overrides and dict round trips."""

from __future__ import annotations

import json
import re

import pytest

from alwayssparse.config import apply_overrides, field_paths, from_dict, to_dict
from alwayssparse.layout import LayoutConfig
from alwayssparse.methods import TopKAST
from alwayssparse.sparsity import SparsityConfig

SCHEDULE_KEYS = [
    "update_interval",
    "num_updates",
    "start_step",
    "stop_step",
    "stop_fraction",
    "drop_fraction",
    "drop_schedule",
    "regrow_std",
]
ALL_KEYS = [
    "method",
    "sparsity",
    "backend",
    "block_size",
    "block_norm",
    "group_lasso",
    "group_lasso_std",
    "layout.distribution",
    "layout.dense_first_last",
    "layout.sparse_embeddings",
    "layout.dense_patterns",
    "layout.sparse_patterns",
    "topkast.backward_sparsity",
    "topkast.refresh_interval",
    "topkast.exploration_coefficient",
    "topkast.exploration_norm",
    "topkast.random_exploration",
    "topkast.exploration_stop_step",
    "topkast.selection",
    *[f"set.{k}" for k in SCHEDULE_KEYS],
    *[f"dynsparse.{k}" for k in SCHEDULE_KEYS],
    "dynsparse.init_std",
    *[f"rigl.{k}" for k in SCHEDULE_KEYS],
    "rigl.gradient_chunk_elements",
    *[
        f"gmp.{k}"
        for k in ["initial_sparsity", "update_interval", "start_step", "stop_step", "stop_fraction"]
    ],
]


def test_field_paths() -> None:
    # The toy method registered by conftest.py gets its section with no edit to SparsityConfig.
    assert field_paths(SparsityConfig()) == [*ALL_KEYS, "lottery.update_interval", "lottery.swap"]


def test_apply_overrides_parses_each_type() -> None:
    config = SparsityConfig()
    result = apply_overrides(
        config,
        [
            "method=static",
            "sparsity=0.95",
            "--backend=masked",
            "layout.distribution=erk",
            "layout.dense_first_last=true",
            "layout.sparse_embeddings=0",
            "layout.dense_patterns=[head.*, blocks.0.*]",
            "layout.sparse_patterns=emb.weight",
            "topkast.backward_sparsity=0.5",
            "topkast.refresh_interval=100",
            "topkast.exploration_coefficient=1e-4",
            "topkast.random_exploration=yes",
            "topkast.exploration_stop_step=5000",
            "topkast.selection=global",
        ],
    )
    assert result is config
    assert config.method == "static"
    assert config.sparsity == 0.95 and isinstance(config.sparsity, float)
    assert config.layout == LayoutConfig(
        distribution="erk",
        dense_first_last=True,
        sparse_embeddings=False,
        dense_patterns=["head.*", "blocks.0.*"],
        sparse_patterns=["emb.weight"],
    )
    assert config.topkast == TopKAST(
        backward_sparsity=0.5,
        refresh_interval=100,
        exploration_coefficient=1e-4,
        random_exploration=True,
        exploration_stop_step=5000,
        selection="global",
    )
    assert isinstance(config.topkast.refresh_interval, int)
    assert isinstance(config.topkast.exploration_stop_step, int)


def test_optional_none_and_empty_list() -> None:
    config = apply_overrides(
        SparsityConfig(),
        ["topkast.exploration_stop_step=7", "topkast.backward_sparsity=0.25"],
    )
    assert (config.topkast.exploration_stop_step, config.topkast.backward_sparsity) == (7, 0.25)
    apply_overrides(
        config,
        [
            "topkast.exploration_stop_step=none",
            "topkast.backward_sparsity=null",
            "layout.dense_patterns=[]",
        ],
    )
    assert config.topkast.exploration_stop_step is None
    assert config.topkast.backward_sparsity is None
    assert config.layout.dense_patterns == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("on", True), ("False", False), ("no", False), ("off", False)],
)
def test_bool_spellings(text: str, expected: bool) -> None:
    config = apply_overrides(SparsityConfig(), [f"topkast.random_exploration={text}"])
    assert config.topkast.random_exploration is expected


@pytest.mark.parametrize(
    "key", ["bogus", "topkast.bogus", "layout", "nothing.sparsity", "static.x"]
)
def test_unknown_key_is_named(key: str) -> None:
    with pytest.raises(ValueError, match="unknown config key") as info:
        apply_overrides(SparsityConfig(), [f"{key}=1"])
    message = str(info.value)
    assert repr(key) in message
    assert f"{len(field_paths(SparsityConfig()))} valid keys in all" in message


@pytest.mark.parametrize(
    ("key", "nearest"),
    [
        ("topkast.refresh_intervall", "topkast.refresh_interval"),
        ("topkast.sparsity", "sparsity"),
        ("layout.distributon", "layout.distribution"),
        ("rigl.gradient_chunk", "rigl.gradient_chunk_elements"),
    ],
)
def test_unknown_key_suggests_the_nearest_few(key: str, nearest: str) -> None:
    with pytest.raises(ValueError, match="did you mean") as info:
        apply_overrides(SparsityConfig(), [f"{key}=1"])
    suggested = str(info.value).split("did you mean ")[1].split("?")[0].split(", ")
    assert nearest in suggested
    assert len(suggested) <= 5


@pytest.mark.parametrize(
    "override",
    [
        "topkast.refresh_interval=abc",
        "topkast.refresh_interval=1.5",
        "sparsity=lots",
        "topkast.random_exploration=maybe",
        "topkast.exploration_stop_step=soon",
        "topkast.backward_sparsity=half",
    ],
)
def test_unparseable_value_names_key(override: str) -> None:
    key = override.partition("=")[0]
    with pytest.raises(ValueError, match="^" + re.escape(key) + ": cannot parse"):
        apply_overrides(SparsityConfig(), [override])


def test_missing_equals_raises() -> None:
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(SparsityConfig(), ["sparsity"])


def test_overrides_apply_in_order() -> None:
    config = SparsityConfig()
    apply_overrides(config, ["sparsity=0.5", "sparsity=0.7"])
    assert config.sparsity == 0.7


def test_to_dict_from_dict_round_trip() -> None:
    config = apply_overrides(
        SparsityConfig(),
        [
            "sparsity=0.95",
            "layout.distribution=erk",
            "layout.dense_patterns=[a.*]",
            "topkast.exploration_stop_step=100",
            "topkast.selection=global",
        ],
    )
    data = to_dict(config)
    assert data["layout"]["dense_patterns"] == ["a.*"]
    assert data["topkast"]["exploration_stop_step"] == 100
    assert data["static"] == {}
    restored = from_dict(SparsityConfig, json.loads(json.dumps(data)))
    assert restored == config
    assert isinstance(restored.layout, LayoutConfig)
    assert isinstance(restored.topkast, TopKAST)
    # Partial dicts keep the defaults for missing keys.
    partial = from_dict(SparsityConfig, {"sparsity": 0.5, "topkast": {"refresh_interval": 3}})
    assert partial == SparsityConfig(sparsity=0.5, topkast=TopKAST(refresh_interval=3))


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown config keys \['bogus'\]"):
        from_dict(SparsityConfig, {"bogus": 1})
    with pytest.raises(ValueError, match=r"unknown config keys \['topkast\.bogus'\]"):
        from_dict(SparsityConfig, {"topkast": {"refresh_interval": 2, "bogus": 1}})
    with pytest.raises(ValueError, match=r"layout\.nope"):
        from_dict(SparsityConfig, {"layout": {"nope": True}})


def test_sections_of_unregistered_entries_are_skipped_with_a_warning() -> None:
    """A config saved by a process that had a plugin method registered loads without it."""
    data = to_dict(SparsityConfig())
    data["plugin"] = {"option": 3}
    with pytest.warns(UserWarning, match=r"\['plugin'\] belong to nothing registered"):
        restored = from_dict(SparsityConfig, data)
    assert restored == SparsityConfig()
    with pytest.raises(ValueError, match=r"unknown config keys \['bogus'\]"):
        from_dict(SparsityConfig, {**to_dict(SparsityConfig()), "bogus": 1})
