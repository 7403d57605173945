"""`ds-realloc plan <command>`: the planner's allocation for a command's config on a cluster, with its
predicted per-MFC and step times, memory per rank, and the same predictions for named baselines.

Baselines, played through the same cost model:
- `deepspeed_chat`: every call on every rank, with DeepSpeed-Chat's mechanism (generation gathers the
  ZeRO-3 model once and runs on each rank's rows; reference / reward / critic inference are ZeRO-3
  forwards of their engines; training ZeRO-3 on all ranks).
- `openrlhf`: OpenRLHF's documented split: generation engines, the actor (with the reference) and the
  critic (with the reward model) on separate thirds of the cluster (whole nodes from 3 nodes on;
  each share rounded down to a power of two, the rest to generation); inference as ZeRO-3 forwards;
  generation weights synchronised by our plan (a lower bound of its broadcast, in its favour).
- `default`: this project's default allocation (the runner's when nothing is set).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ds_realloc.dataflow.allocation import Allocation
from ds_realloc.dataflow.experiment import Experiment
from ds_realloc.dataflow.mfc import MFC, MFCKind, topological_order
from ds_realloc.layout.mesh import DeviceMesh, Strategy
from ds_realloc.layout.model import NAMED_CONFIGS, model_spec
from ds_realloc.planner import cost
from ds_realloc.planner.cost import ModelShape
from ds_realloc.planner.estimate import (DEEPSPEED_CHAT, OPENRLHF, Choice, Estimate, Evaluator, RoleModel,
                                         TrainSetting, Workload, home_meshes, startup_bytes, with_scores)
from ds_realloc.planner.profile import DeviceProfile, load_profile
from ds_realloc.planner.search import Plan, search
from ds_realloc.utils.config import invalid, option


@dataclass
class PlanConfig:
    world: int = option(8, "devices in the cluster")
    gpus_per_node: int = option(0, "devices per node (0 = the profile's: 8 for the built-in GPUs)")
    device: str = option("h100", "h100, h200, a100, or a device profile JSON written by ds-realloc profile")
    prompt_len: int = option(0, "prompt tokens per sample (0 = data.max_prompt_len)")
    seed: int = option(0, "seed of the stochastic search (every run finds the same plan)")
    iterations: int = option(30_000, "proposals of the stochastic search")
    budget_s: float = option(50.0, "time limit of the stochastic search and its descents, seconds (a search that "
                                   "hits it depends on the machine's speed; small spaces finish after a fixed "
                                   "number of proposals)")

    def validate(self) -> None:
        if self.world < 1:
            raise invalid("world", "must be at least 1")
        if self.gpus_per_node < 0:
            raise invalid("gpus_per_node", "must be 0 (the profile's) or positive")


PLAN_FIELDS = tuple(f.name for f in dataclasses.fields(PlanConfig))


def _dtype(cfg) -> str:
    dtype = cfg.engine.dtype
    return "bf16" if dtype == "auto" else dtype


def _model_config(path: str, resolved) -> Any:
    if resolved is None:
        return NAMED_CONFIGS[path]
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolved)


def planning_inputs(experiment: Experiment, cfg, pcfg: PlanConfig):
    """What the search needs from a command's config: its MFCs, roles, workload, default plan and the
    MFCs the user fixed by hand (explicit settings always win)."""
    from ds_realloc.dataflow.setup import plan_run

    run = plan_run(experiment, cfg, pcfg.world, weights_free=True)
    specs = {s.role: s for s in experiment.roles(cfg)}
    roles = {}
    for name, spec in specs.items():
        config = _model_config(spec.path, run.paths[name])
        value = spec.head == "value"
        roles[name] = RoleModel(model_spec(config, value_head=value), ModelShape.of(config, value_head=value),
                                spec.trainable, lm_head=not value, offload=spec.offload)
    geometry = run.settings.geometry
    mfcs = topological_order(experiment.mfcs(cfg))
    work = Workload(geometry.rows, pcfg.prompt_len or cfg.data.max_prompt_len, cfg.rollout.max_new_tokens,
                    geometry.minibatches, geometry.epochs, _dtype(cfg))
    engine = cfg.engine
    default = {}
    for name, allocation in run.allocations.items():
        train = None
        if allocation.mfc.kind.on_engine:
            stage = engine.zero_stage if allocation.zero_stage is None else allocation.zero_stage
            micro = geometry.with_micro_batch(allocation.micro_batch_size).micro_batch(allocation.mesh.size)
            train = TrainSetting(stage, micro, engine.offload_optimizer, engine.offload_param)
        default[name] = Choice(allocation, train)
    fixed = [m.name for m in mfcs if m.name in cfg.allocations and _set_by_hand(cfg.allocations[m.name])]
    if cfg.allocation:
        fixed += [m.name for m in mfcs if m.kind in (MFCKind.GENERATE, MFCKind.INFERENCE)]
    base = TrainSetting(engine.zero_stage, cfg.train.micro_batch_size, engine.offload_optimizer, engine.offload_param)
    return mfcs, roles, work, default, sorted(set(fixed)), base


def _set_by_hand(config) -> bool:
    return bool(config.mesh or config.strategy or config.zero_stage != -1 or config.micro_batch_size)


def _on(mfc: MFC, mesh: DeviceMesh, train: TrainSetting | None, tp: int = 1) -> Choice:
    if mfc.kind is MFCKind.TRAIN:
        return Choice(Allocation(mfc, mesh, Strategy(dp=mesh.size, zero3=train.zero_stage == 3)), train)
    return Choice(Allocation(mfc, mesh, Strategy(dp=mesh.size // tp, tp=tp)))


def deepspeed_chat_plan(mfcs, work: Workload, world: int, base: TrainSetting) -> dict[str, Choice]:
    everyone = DeviceMesh(tuple(range(world)))
    micro = max(1, min(base.micro_batch, work.rows // (world * work.minibatches)))
    train = dataclasses.replace(base, zero_stage=3, micro_batch=micro)
    return with_scores(mfcs, {m.name: _on(m, everyone, train) for m in mfcs if m.kind is not MFCKind.SCORE})


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def openrlhf_meshes(world: int, gpus_per_node: int) -> tuple[DeviceMesh, DeviceMesh, DeviceMesh] | None:
    """(generation, actor, critic) meshes of OpenRLHF's 1:1:1 split, or None below 3 devices."""
    nodes = world // gpus_per_node
    unit = gpus_per_node if nodes >= 3 else 1
    units = nodes if nodes >= 3 else world
    if units < 3:
        return None
    share = _power_of_two_at_most(units // 3)
    actor = tuple(range(0, share * unit))
    critic = tuple(range(share * unit, 2 * share * unit))
    generation = _power_of_two_at_most(units - 2 * share)
    gen = tuple(range(2 * share * unit, (2 * share + generation) * unit))
    return DeviceMesh(gen), DeviceMesh(actor), DeviceMesh(critic)


def openrlhf_plan(mfcs, roles: Mapping[str, RoleModel], work: Workload, profile: DeviceProfile, world: int,
                  base: TrainSetting) -> dict[str, Choice] | None:
    meshes = openrlhf_meshes(world, profile.gpus_per_node)
    if meshes is None:
        return None
    gen_mesh, actor_mesh, critic_mesh = meshes
    home = {"actor": actor_mesh, "ref": actor_mesh, "critic": critic_mesh, "reward": critic_mesh}
    evaluator = Evaluator(mfcs, roles, work, profile, world, OPENRLHF)
    choices: dict[str, Choice] = {}
    for m in mfcs:
        if m.kind is MFCKind.SCORE:
            continue
        mesh = gen_mesh if m.kind is MFCKind.GENERATE else home.get(m.role, DeviceMesh(tuple(range(world))))
        if m.role not in roles:
            mesh = DeviceMesh(tuple(range(world)))
        rows = work.rows // (mesh.size * work.minibatches)
        if work.rows % mesh.size or (m.kind is MFCKind.TRAIN and rows < 1):
            return None
        train = dataclasses.replace(base, micro_batch=max(1, min(base.micro_batch, rows))) \
            if m.kind is MFCKind.TRAIN else None
        choices[m.name] = _on(m, mesh, train)
    choices = with_scores(mfcs, choices)
    generation = [m for m in mfcs if m.kind is MFCKind.GENERATE]
    for m in generation:  # its engines' tensor parallelism: the fastest that fits, as a user would tune it
        options = [tp for tp in (1, 2, 4, 8) if tp <= min(gen_mesh.size, profile.gpus_per_node)
                   and gen_mesh.size % tp == 0 and work.rows % (gen_mesh.size // tp) == 0]
        choices[m.name] = min((dict(choices, **{m.name: _on(m, gen_mesh, None, tp)}) for tp in options),
                              key=evaluator.objective)[m.name]
    return choices


def analytic_flops(mfcs, roles: Mapping[str, RoleModel], work: Workload) -> float:
    """A step's LLaMA analytic FLOPs, counted as ReaLHF's throughput figure counts them: the forward of
    every inference and generation token, 4 forwards per trained token (backward 2x, recomputation)."""
    total = 0.0
    tokens = work.rows * work.length
    for m in mfcs:
        role = roles.get(m.role)
        if role is None:
            continue
        if m.kind is MFCKind.GENERATE:
            total += cost.forward_flops(role.shape, work.rows * work.prompt_len,
                                        cost.causal_context(work.prompt_len), work.rows)
            total += sum(cost.forward_flops(role.shape, work.rows, work.prompt_len + t, work.rows)
                         for t in range(work.new_tokens - 1))
        else:
            forward = cost.forward_flops(role.shape, tokens, cost.causal_context(work.length),
                                         tokens if role.lm_head else 0)
            total += forward * (4 * work.epochs if m.kind is MFCKind.TRAIN else 1)
    return total


def estimate_config(experiment: Experiment, cfg, pcfg: PlanConfig, profile: DeviceProfile | None = None
                    ) -> tuple[Estimate, list[int]]:
    """The prediction for a config's own allocation (what a run of it does), and each rank's memory right
    after start-up (the level a run's peak memory is measured above)."""
    profile = profile or load_profile(pcfg.device)
    mfcs, roles, work, default, _, _ = planning_inputs(experiment, cfg, pcfg)
    kinds = DEEPSPEED_CHAT if cfg.engine.inference == "zero3" else frozenset()
    estimate = Evaluator(mfcs, roles, work, profile, pcfg.world, kinds).estimate(default)
    allocations = {name: c.allocation for name, c in default.items()}
    settings = {name: c.train for name, c in default.items() if c.train is not None}
    startup = startup_bytes(roles, home_meshes(mfcs, allocations), mfcs, settings, pcfg.world, work.dtype)
    return estimate, startup


def _summary(name: str, estimate: Estimate | None, flops: float) -> dict:
    if estimate is None:
        return {"name": name, "feasible": False}
    return {"name": name, "predicted_step_s": estimate.step_s, "predicted_mfc_s": estimate.call_s,
            "predicted_realloc_s": estimate.realloc_s, "predicted_peak_bytes_per_rank": list(estimate.peak_bytes),
            "predicted_pflops": flops / estimate.step_s / 1e15 if estimate.step_s else 0.0}


def allocations_yaml(plan: Plan) -> dict:
    """The chosen allocations as they go under `allocations:` in a config."""
    out = {}
    for name, choice in plan.choices.items():
        a = choice.allocation
        if a.mfc.kind is MFCKind.SCORE:
            continue  # runs on its trainer's engine
        if choice.train is None:
            out[name] = {"mesh": str(a.mesh), "strategy": f"d{a.strategy.dp}t{a.strategy.tp}"}
        else:
            out[name] = {"mesh": str(a.mesh), "strategy": f"d{a.mesh.size}", "zero_stage": choice.train.zero_stage,
                         "micro_batch_size": choice.train.micro_batch}
    return out


def plan_report(experiment: Experiment, cfg, pcfg: PlanConfig, profile: DeviceProfile | None = None) -> dict:
    """The planner's plan for a command's config on `pcfg`'s cluster (`profile`: the device, else `pcfg.device`)."""
    profile = profile or load_profile(pcfg.device)
    if pcfg.gpus_per_node:
        profile = dataclasses.replace(profile, gpus_per_node=pcfg.gpus_per_node)
    mfcs, roles, work, default, fixed, base = planning_inputs(experiment, cfg, pcfg)
    plan = search(mfcs, roles, work, profile, pcfg.world, default, fixed, base, pcfg.seed, pcfg.budget_s,
                  pcfg.iterations, engine_choices=True)
    flops = analytic_flops(mfcs, roles, work)
    baselines = {}
    limit = profile.memory_bytes

    def feasible(estimate: Estimate) -> Estimate | None:
        return estimate if max(estimate.peak_bytes) <= limit else None

    baselines["deepspeed_chat"] = feasible(Evaluator(mfcs, roles, work, profile, pcfg.world, DEEPSPEED_CHAT)
                                           .estimate(deepspeed_chat_plan(mfcs, work, pcfg.world, base)))
    openrlhf = openrlhf_plan(mfcs, roles, work, profile, pcfg.world, base)
    baselines["openrlhf"] = None if openrlhf is None else feasible(
        Evaluator(mfcs, roles, work, profile, pcfg.world, OPENRLHF).estimate(openrlhf))
    baselines["default"] = feasible(Evaluator(mfcs, roles, work, profile, pcfg.world).estimate(default))
    step = plan.estimate.step_s
    return {
        "command": experiment.command, "device": profile.name, "world": pcfg.world,
        "gpus_per_node": profile.gpus_per_node, "models": {r: m.shape.params for r, m in roles.items()},
        "workload": dataclasses.asdict(work), "fixed_by_config": fixed,
        "allocations": allocations_yaml(plan), **_summary("planner", plan.estimate, flops),
        "baselines": {name: (e.step_s if e is not None else None) for name, e in baselines.items()},
        "speedup_over": {name: (e.step_s / step if e is not None and step else None) for name, e in baselines.items()},
        "baseline_details": {name: _summary(name, e, flops) for name, e in baselines.items()},
        "analytic_flops_per_step": flops, "search_s": plan.search_s, "plans_evaluated": plan.evaluated,
        "exhaustive": plan.exhaustive, "realhf_heuristic": "not comparable: it places generation with "
        "pipeline parallelism (pp = max(2, nodes)), which this runner's generation does not run",
    }


def format_plan(report: dict) -> str:
    """The report as a person reads it: YAML to paste, then the predictions against the baselines."""
    import yaml

    gib = 2 ** 30
    lines = [f"# ds-realloc plan {report['command']}: {report['world']} x {report['device']} "
             f"({report['gpus_per_node']} per node), searched in {report['search_s']:.1f} s "
             f"({report['plans_evaluated']} plans, {'exhaustive' if report['exhaustive'] else 'annealing'})",
             yaml.safe_dump({"allocations": report["allocations"]}, sort_keys=False).rstrip(), "",
             f"predicted step {report['predicted_step_s']:.3f} s, {report['predicted_pflops']:.3f} PFLOP/s "
             f"(analytic), peak {max(report['predicted_peak_bytes_per_rank']) / gib:.1f} GiB per rank"]
    for name, seconds in report["predicted_mfc_s"].items():
        realloc = report["predicted_realloc_s"].get(name)
        lines.append(f"  {name:<16}{seconds:9.3f} s" + (f"  (+ realloc {realloc:.3f} s)" if realloc else ""))
    for name, seconds in report["baselines"].items():
        lines.append(f"baseline {name:<15}" + (f"{seconds:9.3f} s per step: planner {report['speedup_over'][name]:.2f}x"
                                              if seconds is not None else "   does not fit or does not apply"))
    return "\n".join(lines)
