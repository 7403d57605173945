"""Device profiles: the built-in GPUs from their datasheets, profile files round trip, bad files are named."""

import json

import pytest

from ds_realloc.planner.profile import BUILTIN, load_profile
from ds_realloc.utils.errors import ConfigError


def test_builtins_are_datasheet_peaks_times_the_stated_efficiency():
    h100, h200, a100 = BUILTIN["h100"], BUILTIN["h200"], BUILTIN["a100"]
    assert h100.flops("bf16") == pytest.approx(0.6 * 989.4e12) and a100.flops("bf16") == pytest.approx(0.6 * 312e12)
    assert h200.memory_bandwidth == pytest.approx(0.8 * 4.8e12) and h200.memory_bytes == 141 * 10**9
    assert h100.intra_node.bandwidth > h100.inter_node.bandwidth and all(p.gpus_per_node == 8 for p in BUILTIN.values())
    assert "datasheet" in h100.source and "efficiency" in h100.source
    assert h100.link(8, 8) is h100.intra_node and h100.link(8, 16) is h100.inter_node
    with pytest.raises(ConfigError, match="no matmul throughput for dtype 'int8'"):
        h100.flops("int8")


def test_a_profile_file_round_trips(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(dict(BUILTIN["a100"].to_json(), name="measured")))
    profile = load_profile(str(path))
    assert profile.name == "measured" and profile.intra_node == BUILTIN["a100"].intra_node
    assert load_profile("h200") is BUILTIN["h200"]


@pytest.mark.parametrize("change, message", [
    (dict(speed=1), "unknown field 'speed'"),
    (dict(memory_bandwidth=0), "field 'memory_bandwidth' must be positive"),
    (dict(matmul_flops={"fp8": 1e15}), "field 'matmul_flops.fp8'"),
    (dict(intra_node={"bandwidth": 1e9}), "'bandwidth' and 'latency'"),
])
def test_bad_profile_files_name_the_field_and_file(tmp_path, change, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(dict(BUILTIN["h100"].to_json(), **change)))
    with pytest.raises(ConfigError, match=message) as error:
        load_profile(str(path))
    assert str(path) in str(error.value)


def test_missing_fields_and_broken_json_are_named(tmp_path):
    data = BUILTIN["h100"].to_json()
    del data["gpus_per_node"]
    (tmp_path / "short.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="lacks field 'gpus_per_node'"):
        load_profile(str(tmp_path / "short.json"))
    (tmp_path / "broken.json").write_text('{\n  "name": "x",\n  oops\n}')
    with pytest.raises(ConfigError, match="broken.json:3: not valid JSON"):
        load_profile(str(tmp_path / "broken.json"))
    with pytest.raises(ConfigError, match="neither a built-in profile"):
        load_profile(str(tmp_path / "absent.json"))
