"""PPO on four ranks with every model function call on its own mesh: generation on d2t2 over all
ranks, the actor trained with ZeRO-3 on ranks 0-1 while the critic trains on ranks 2-3, the frozen
reference and reward models offloaded to CPU while idle. The weights each generation runs on must
be, bit for bit, the actor's trained weights at that moment (after the previous step)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from ds_realloc.layout.mesh import DeviceMesh, Strategy
from ds_realloc.models.hf_io import save_hf_folder
from ds_realloc.models.presets import resolve_model_path
from tests.comm.oracle import expected_buffers
from tests.distributed import run_ranks

STEPS = 3
ALLOCATIONS = {"actor_gen": ("0-3", "d2t2"), "actor_train": ("0-1", ""), "critic_inf": ("2-3", "d2"),
               "critic_train": ("2-3", ""), "ref_inf": ("0-3", "d4"), "rew_inf": ("0-3", "d2t2")}


def _reward_model(folder: Path) -> Path:
    """A tiny random reward model saved as an HF sequence classifier (what `ds-realloc rm` writes)."""
    base = resolve_model_path("tiny-llama")
    config = AutoConfig.from_pretrained(base, num_labels=1)
    torch.manual_seed(0)
    save_hf_folder(AutoModelForSequenceClassification.from_config(config), AutoTokenizer.from_pretrained(base), folder)
    return folder


def _ppo_recording_generation_weights(rank: int, world: int, out: str, reward: str) -> None:
    """Run PPO; whenever the actor is reallocated into the generation layout, save this rank's
    inference buffers and (ranks 0-1) the actor's full ZeRO-3 weights gathered at that moment."""
    import deepspeed

    from ds_realloc.dataflow.rlhf import PPO
    from ds_realloc.dataflow.runner import run_experiment
    from ds_realloc.engine.hybrid import HybridEngine
    from ds_realloc.utils.config import load_config

    original = HybridEngine._weights
    calls = {"n": 0}

    def recording(self, layout, version, stats):
        placed, buffers = original(self, layout, version, stats)
        if self.src.mesh.ranks == (0, 1) and layout.strategy == Strategy(dp=2, tp=2):  # the actor, generating
            call = calls["n"]
            calls["n"] += 1
            saved = {"buffers": {name: t.clone() for name, t in buffers.items()}}
            if self.module is not None:
                params = list(self.module.parameters())
                with deepspeed.zero.GatheredParameters(params):
                    saved["full"] = {name: p.detach().clone() for name, p in self.module.named_parameters()}
            torch.save(saved, Path(out) / f"call{call}_rank{rank}.pt")
        return placed, buffers

    HybridEngine._weights = recording
    from ds_realloc.algorithms import functional

    gae, gae_calls = functional.gae_packed, []

    def counting_gae(*args, **kwargs):  # who computes advantages, and how often
        gae_calls.append(1)
        return gae(*args, **kwargs)

    functional.gae_packed = counting_gae
    # old_logprobs=rollout: the critic's values come from critic_inf on its own (reallocated) layout
    overrides = [f"output.dir={out}/run", "model.path=tiny-llama", f"reward.model={reward}", "ref.offload=true",
                 "algo.old_logprobs=rollout",
                 "train.batch_size=8", "train.micro_batch_size=2", f"train.max_steps={STEPS}",
                 "rollout.eval_prompts=8", "rollout.max_new_tokens=8", "rollout.eval_max_new_tokens=8",
                 "engine.dtype=fp32", "critic.optim.lr=1e-3", "optim.lr=1e-3"]
    for mfc, (mesh, strategy) in ALLOCATIONS.items():
        overrides.append(f"allocations.{mfc}.mesh={mesh}")
        if strategy:
            overrides.append(f"allocations.{mfc}.strategy={strategy}")
    from ds_realloc.dataflow.rlhf import PPOConfig

    run_experiment(PPO, load_config(PPOConfig, None, overrides))
    (Path(out) / f"gae_calls_rank{rank}.json").write_text(json.dumps(len(gae_calls)))


def test_generation_runs_on_the_trained_weights_of_the_previous_step(tmp_path):
    reward = _reward_model(tmp_path / "reward")
    run_ranks(_ppo_recording_generation_weights, 4, str(tmp_path), str(reward), timeout=360)

    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    for mfc, (mesh, _) in ALLOCATIONS.items():
        assert f"{mfc} " in log and f"@[{mesh}]" in log
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 1]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for row in steps:  # every call ran and was timed; the actor's weights moved into d2t2 every step
        for mfc in ALLOCATIONS:
            assert row[f"time/{mfc}_s"] > 0
        assert row["realloc/actor_gen_recv_bytes"] > 0

    # every rank recorded its spans of every step on the aligned clock: calls on their meshes, in order
    from ds_realloc.dataflow.spans import read_timeline

    timeline = read_timeline(tmp_path / "run")
    assert sorted(timeline) == [1, 2, 3] and all([r["rank"] for r in recs] == [0, 1, 2, 3] for recs in timeline.values())
    for records in timeline.values():
        for record in records:
            calls = {s["mfc"]: s for s in record["spans"] if s["kind"] == "call"}
            mine = {mfc for mfc, (mesh, _) in ALLOCATIONS.items() if record["rank"] in
                    (range(4) if mesh == "0-3" else (range(0, 2) if mesh == "0-1" else range(2, 4)))}
            assert set(calls) == mine | {"rl_targets"}
            assert all(record["start"] <= s["start"] <= s["end"] <= record["end"] for s in record["spans"])
            assert calls["actor_gen"]["end"] <= calls.get("actor_train", calls.get("critic_train"))["start"]
            realloc = [s for s in record["spans"] if s["kind"] == "realloc" and s["mfc"] == "actor_gen"]
            assert len(realloc) == 1 and realloc[0]["end"] <= calls["actor_gen"]["start"]
            assert record["memory_peak_bytes"] >= record["memory_start_bytes"] > 0
    # the ranks' clocks agree: all of a step's actor_gen calls (one TP/DP layout over all ranks) start together
    for records in timeline.values():
        starts = [next(s["start"] for s in r["spans"] if s["mfc"] == "actor_gen" and s["kind"] == "call")
                  for r in records]
        assert max(starts) - min(starts) < 0.5

    # advantages and returns are computed once a step (rl_targets, each rank its rows) for both trainings
    assert [json.loads((tmp_path / f"gae_calls_rank{r}.json").read_text()) for r in range(4)] == [STEPS] * 4

    # calls: eval before training, the generations of steps 1..3, eval after training
    calls = sorted({int(p.name.split("_")[0][4:]) for p in tmp_path.glob("call*_rank0.pt")})
    assert calls == list(range(STEPS + 2))
    spec = _actor_layout()
    fulls = []
    for call in calls:
        full = torch.load(tmp_path / f"call{call}_rank0.pt")["full"]
        assert all(torch.equal(full[n], t) for n, t in torch.load(tmp_path / f"call{call}_rank1.pt")["full"].items())
        for rank in range(4):
            got = torch.load(tmp_path / f"call{call}_rank{rank}.pt")["buffers"]
            want = expected_buffers(spec, rank, full, torch.float32)
            assert got.keys() == want.keys()
            for name in want:
                assert torch.equal(got[name], want[name]), (call, rank, name)
        fulls.append(full)
    # eval before training and step 1 generate with the initial weights; each later step with new ones
    initial = load_file(resolve_model_path("tiny-llama") / "model.safetensors")
    assert all(torch.equal(fulls[0][n], initial[n].float()) for n in fulls[0])
    assert all(torch.equal(fulls[0][n], fulls[1][n]) for n in fulls[0])
    for before, after in zip(fulls[1:], fulls[2:]):
        assert any(not torch.equal(before[n], after[n]) for n in before)
    final = load_file(tmp_path / "run" / "hf" / "actor" / "model.safetensors")
    assert all(torch.equal(fulls[-1][n], final[n]) for n in final)


def _actor_layout():
    from ds_realloc.layout.layout import Layout
    from ds_realloc.layout.model import model_spec

    config = AutoConfig.from_pretrained(resolve_model_path("tiny-llama"))
    return Layout(model_spec(config), DeviceMesh((0, 1, 2, 3)), Strategy(dp=2, tp=2), fused=True)
