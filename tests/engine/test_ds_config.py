import json
import logging
import math

import pytest
import torch

from ds_realloc.engine.config import EngineConfig, OptimConfig
from ds_realloc.engine.ds_config import (BatchGeometry, frozen_ds_config, lr_schedule, torch_dtype, train_ds_config,
                                         zero_stage)
from ds_realloc.utils.config import load_config
from ds_realloc.utils.errors import ConfigError

BATCH = BatchGeometry(micro_batch_size=2, grad_accum=4, dp_size=2)


def test_generated_config():
    config = train_ds_config(EngineConfig(zero_stage=3, offload_optimizer=True), OptimConfig(lr=3e-5, warmup_steps=5),
                             BATCH, total_steps=100)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (16, 2, 4)
    assert zero_stage(config) == 3 and config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["optimizer"]["params"]["lr"] == 3e-5 and "torch_adam" not in config["optimizer"]["params"]
    assert "scheduler" not in config
    native_bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert torch_dtype(config) == (torch.bfloat16 if native_bf16 else torch.float32)  # auto


def test_cpu_machines_step_with_deepspeed_cpu_adam():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    zero0 = train_ds_config(EngineConfig(zero_stage=0), OptimConfig(), BATCH, total_steps=10)
    assert zero0["optimizer"]["params"]["torch_adam"] is True  # no ZeRO-Offload at stage 0
    for stage in (1, 2, 3):
        config = train_ds_config(EngineConfig(zero_stage=stage), OptimConfig(), BATCH, total_steps=10)
        assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert "torch_adam" not in config["optimizer"]["params"]


def _lrs(optim, total_steps):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    scheduler = lr_schedule(optim, total_steps)(optimizer)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate the next optimizer step uses
        optimizer.step()
        scheduler.step()
    return rates


def test_lr_schedule_warmup_then_cosine_to_min():
    expected = [0.1 + 0.9 * (1 + math.cos(math.pi * step / 3)) / 2 for step in range(3)]
    assert _lrs(OptimConfig(lr=1.0, min_lr_ratio=0.1), 3) == pytest.approx(expected)
    assert expected[0] == 1.0  # no warmup: the first step runs at the peak rate
    warm = _lrs(OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.0), 4)
    assert warm == pytest.approx([0.0, 0.5, 1.0, 0.5])


def test_user_json_overrides_but_not_the_batch_geometry(tmp_path, caplog):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000},
                                "bf16": {"enabled": True}, "gradient_accumulation_steps": 7,
                                "train_micro_batch_size_per_gpu": "auto"}))
    with caplog.at_level(logging.WARNING, logger="ds_realloc"):
        config = train_ds_config(EngineConfig(deepspeed_config=str(path)), OptimConfig(), BATCH, 10)
    assert zero_stage(config) == 2 and config["zero_optimization"]["reduce_bucket_size"] == 1000
    assert config["zero_optimization"]["stage3_max_live_parameters"] == 3e7  # our keys stay
    assert torch_dtype(config) == torch.bfloat16
    assert config["gradient_accumulation_steps"] == 4 and "gradient_accumulation_steps=7" in caplog.text


def test_bad_user_json_names_file_and_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 3,}\n}')
    with pytest.raises(ConfigError, match=rf"{path}:2: invalid JSON in engine.deepspeed_config"):
        train_ds_config(EngineConfig(deepspeed_config=str(path)), OptimConfig(), BATCH, 10)
    with pytest.raises(ConfigError, match="cannot read"):
        train_ds_config(EngineConfig(deepspeed_config=str(tmp_path / "nope.json")), OptimConfig(), BATCH, 10)


def test_accelerate_plugin_is_picked_up(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    config = train_ds_config(EngineConfig(zero_stage=3), OptimConfig(), BATCH, 10)
    assert zero_stage(config) == 2 and config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert torch_dtype(config) == torch.bfloat16 and config["train_batch_size"] == 16


def test_frozen_config_follows_training():
    train = train_ds_config(EngineConfig(zero_stage=3, dtype="bf16"), OptimConfig(), BATCH, 10)
    frozen = frozen_ds_config(train, offload=True)
    assert zero_stage(frozen) == 3 and frozen["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "optimizer" not in frozen and torch_dtype(frozen) == torch.bfloat16
    replica = frozen_ds_config(train_ds_config(EngineConfig(zero_stage=1), OptimConfig(), BATCH, 10), offload=True)
    assert zero_stage(replica) == 0 and replica["zero_optimization"]["offload_param"]["device"] == "none"


def test_engine_config_validation():
    with pytest.raises(ConfigError, match="engine.offload_param: parameter offload needs zero_stage=3"):
        from ds_realloc.dataflow.experiments import SFTConfig

        load_config(SFTConfig, None, ["engine.zero_stage=2", "engine.offload_param=true"])
