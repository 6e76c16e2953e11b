from dataclasses import FrozenInstanceError, dataclass
from typing import Literal

import pytest

from benchsuite.config import MethodConfig
from benchsuite.errors import ConfigError


@dataclass(frozen=True)
class DemoConfig(MethodConfig):
    CONFIG_VERSION = 3
    calib_size: int | None = 32
    iters: int = 1000
    lr: float = 4e-5
    use_reparam: bool = True
    percentiles: tuple[float, ...] = (0.999, 0.9999)
    mode: Literal["reference", "ste"] = "reference"
    rank: int | None = None


def test_frozen():
    with pytest.raises(FrozenInstanceError):
        DemoConfig().iters = 3  # type: ignore[misc]


def test_round_trip_keeps_type_version_and_values():
    config = DemoConfig(iters=5, percentiles=(0.5,), rank=4)
    data = config.to_dict()
    assert data["type"] == "DemoConfig" and data["version"] == 3
    assert data["fields"]["percentiles"] == [0.5]
    assert DemoConfig.from_dict(data) == config


def test_from_dict_refuses_other_versions():
    data = DemoConfig().to_dict()
    data["version"] = 2
    with pytest.raises(ConfigError):
        DemoConfig.from_dict(data)


def test_overrides_parse_by_field_type():
    config = DemoConfig().with_overrides(
        {"iters": "7", "lr": "1e-3", "use_reparam": "off", "percentiles": "0.9,0.99", "mode": "ste", "rank": "none", "calib_size": "64"}
    )
    assert config == DemoConfig(calib_size=64, iters=7, lr=1e-3, use_reparam=False, percentiles=(0.9, 0.99), mode="ste", rank=None)
    assert DemoConfig().with_overrides({"rank": "8"}).rank == 8


@pytest.mark.parametrize(
    "overrides, message",
    [({"iter": "3"}, "no field 'iter'"), ({"iters": "many"}, "takes an integer"), ({"use_reparam": "maybe"}, "true or false"), ({"mode": "fast"}, "one of")],
)
def test_bad_overrides_are_user_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        DemoConfig().with_overrides(overrides)
