"""The execution-plan search: per MFC a mesh and a strategy (and, for training, a ZeRO stage and a
micro-batch size), minimising the simulated step time with every rank's memory as a hard limit.

Candidates are the legal allocations of each MFC on aligned sub-meshes (power-of-two slices of a
node, or runs of whole nodes), filtered by what the layouts accept (heads, KV heads, vocabulary,
experts) and by the rows of a step. Small spaces are searched exhaustively; larger ones by
simulated annealing from the best of the default allocation and a per-MFC greedy start, with a
fixed seed, so every run (and every rank) finds the same plan. Sub-results (a call's time and
memory, a reallocation, a batch move) are memoised, so one evaluation is a replay of ~20 operations.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from ds_realloc.dataflow.allocation import Allocation
from ds_realloc.dataflow.mfc import MFC, MFCKind
from ds_realloc.layout.layout import Layout
from ds_realloc.layout.mesh import DeviceMesh, Strategy
from ds_realloc.planner import cost
from ds_realloc.planner.calibrated import stage_key, table_for
from ds_realloc.planner.estimate import (INFEASIBLE_S, Choice, Estimate, Evaluator, RoleModel, TrainSetting,
                                         Workload, with_scores)
from ds_realloc.planner.profile import DeviceProfile
from ds_realloc.utils.errors import ConfigError

EXHAUSTIVE_LIMIT = 20_000  # plans; above it, simulated annealing
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Plan:
    choices: dict[str, Choice]
    estimate: Estimate
    evaluated: int
    exhaustive: bool
    search_s: float

    @property
    def allocations(self) -> dict[str, Allocation]:
        return {name: c.allocation for name, c in self.choices.items()}


def aligned_meshes(world: int, gpus_per_node: int) -> list[DeviceMesh]:
    """Power-of-two slices of one node aligned to their size, and runs of whole nodes."""
    meshes = []
    per_node = min(gpus_per_node, world)
    size = 1
    while size <= per_node:
        meshes += [DeviceMesh(tuple(range(start, start + size))) for start in range(0, world - size + 1, size)
                   if start // gpus_per_node == (start + size - 1) // gpus_per_node]
        size *= 2
    nodes = -(-world // gpus_per_node)
    for count in range(2, nodes + 1):
        for first in range(0, nodes - count + 1):
            ranks = tuple(range(first * gpus_per_node, min((first + count) * gpus_per_node, world)))
            meshes.append(DeviceMesh(ranks))
    return meshes


def _powers_of_two_dividing(n: int, limit: int) -> list[int]:
    return [d for d in (2 ** i for i in range(0, 12)) if d <= limit and n % d == 0]


def _fits_layout(role: RoleModel, mesh: DeviceMesh, strategy: Strategy) -> bool:
    try:
        Layout(role.spec, mesh, strategy, fused=True).buffers(mesh.ranks[0])
    except ConfigError:
        return False
    return True


def inference_candidates(mfc: MFC, role: RoleModel, meshes: Sequence[DeviceMesh], work: Workload,
                         profile: DeviceProfile) -> list[Choice]:
    out = []
    for mesh in meshes:
        for tp in _powers_of_two_dividing(mesh.size, profile.gpus_per_node):
            strategy = Strategy(dp=mesh.size // tp, tp=tp)
            if work.rows % strategy.dp == 0 and _fits_layout(role, mesh, strategy):
                out.append(Choice(Allocation(mfc, mesh, strategy)))
    return out


def train_candidates(mfc: MFC, meshes: Sequence[DeviceMesh], work: Workload, base: TrainSetting,
                     engine_choices: bool, stages: Sequence[int] = ZERO_STAGES) -> list[Choice]:
    """A training MFC's meshes; with `engine_choices` also every ZeRO stage of `stages` and micro-batch size,
    else the configured ones (engine.zero_stage, train.micro_batch_size)."""
    out = []
    for mesh in meshes:
        if work.rows % (mesh.size * work.minibatches):
            continue
        minibatch_rows = work.rows // (mesh.size * work.minibatches)
        micros = _powers_of_two_dividing(minibatch_rows, minibatch_rows) if engine_choices else \
            [min(base.micro_batch, minibatch_rows)]
        for stage in stages if engine_choices else (base.zero_stage,):
            for micro in micros:
                if minibatch_rows % micro:
                    continue
                setting = TrainSetting(stage, micro, base.offload_optimizer, base.offload_param)
                out.append(Choice(Allocation(mfc, mesh, Strategy(dp=mesh.size, zero3=stage == 3)), setting))
    return out


def _anneal(cost_of, sizes: Mapping[str, int], on_mesh: Mapping[str, Mapping[DeviceMesh, list[int]]],
           meshes: Mapping[str, list[DeviceMesh]], start: dict[str, int], seed: int, budget_s: float,
           iterations: int) -> dict[str, int]:
    """Simulated annealing over one option index per searched MFC. A proposal changes one MFC's option, or
    (one time in three) moves every MFC onto one mesh at once, so that co-located plans are reached without
    passing through the costly half-moved ones; a worse plan is accepted with probability
    exp(-increase / temperature), the temperature falling geometrically with the progress: the share of
    the iterations or of the time budget spent, whichever is ahead (a search the budget stops still
    cools down to a descent, where one paced by its iterations alone stayed near its first heat)."""
    rng = random.Random(seed)
    state, current = dict(start), cost_of(start)
    best, best_cost = dict(state), current
    scale = current if current < INFEASIBLE_S else 1.0  # until a plan that fits sets the scale of step times
    began = time.perf_counter()
    movable = [n for n, size in sizes.items() if size > 1]
    for i in range(iterations):
        spent = (time.perf_counter() - began) / budget_s if budget_s > 0 else math.inf
        if not movable or spent >= 1.0:
            break
        temperature = scale * 0.05 * (1e-3 ** max(i / iterations, spent))
        name = rng.choice(movable)
        proposal = dict(state, **{name: rng.randrange(sizes[name])})
        if rng.random() < 1 / 3:
            mesh = rng.choice(meshes[name])
            proposal.update({n: rng.choice(by_mesh[mesh]) for n, by_mesh in on_mesh.items() if mesh in by_mesh})
        value = cost_of(proposal)
        if value <= current or rng.random() < math.exp(-(value - current) / temperature):
            state, current = proposal, value
            if value < best_cost:
                if best_cost >= INFEASIBLE_S > value:
                    scale = value
                best, best_cost = dict(proposal), value
    return best


def _descend(cost_of, sizes: Mapping[str, int], start: dict[str, int], deadline: float = math.inf,
             rounds: int = 3) -> dict[str, int]:
    """Coordinate descent: each MFC in turn takes its best option with the others fixed, until nothing improves
    (or the deadline passes)."""
    state, current = dict(start), cost_of(start)
    for _ in range(rounds):
        improved = False
        for name, size in sizes.items():
            for index in range(size):
                if time.perf_counter() > deadline:
                    return state
                proposal = dict(state, **{name: index})
                value = cost_of(proposal)
                if value < current:
                    state, current, improved = proposal, value, True
        if not improved:
            break
    return state


def search(mfcs: Sequence[MFC], roles: Mapping[str, RoleModel], work: Workload, profile: DeviceProfile, world: int,
           default: Mapping[str, Choice], fixed: Sequence[str] = (), base_train: TrainSetting = TrainSetting(),
           seed: int = 0, budget_s: float = 50.0, iterations: int = 30_000, engine_choices: bool = False) -> Plan:
    """The best plan found. `default` is a complete plan (the runner's default allocation); MFCs named in
    `fixed` (set by hand) and MFCs without a model of their own keep their default choice. With
    `engine_choices` training MFCs also choose their ZeRO stage and micro-batch size each."""
    began = time.perf_counter()
    evaluator = Evaluator(mfcs, roles, work, profile, world)
    meshes = aligned_meshes(world, profile.gpus_per_node)
    options: dict[str, list[Choice]] = {}
    for mfc in mfcs:
        role = roles.get(mfc.role)
        if mfc.name in fixed or role is None or mfc.kind is MFCKind.SCORE:
            continue
        if mfc.kind is MFCKind.TRAIN:
            options[mfc.name] = train_candidates(mfc, meshes, work, base_train, engine_choices,
                                                 measured_stages(profile, role, work.dtype))
        else:
            options[mfc.name] = inference_candidates(mfc, role, meshes, work, profile)
        if not options[mfc.name]:
            raise ConfigError(f"allocations.{mfc.name}: no allocation of {mfc.name} fits {world} ranks and "
                              f"{work.rows} rows per step")
    names = list(options)
    frozen = {n: c for n, c in default.items() if n not in options}

    def plan_of(state: Mapping[str, int]) -> dict[str, Choice]:
        return with_scores(mfcs, {**frozen, **{n: options[n][state[n]] for n in names}})

    sizes = {n: len(options[n]) for n in names}

    def cost_of(state: Mapping[str, int]) -> float:
        return evaluator.objective(plan_of(state))

    space = math.prod(sizes.values())
    if space <= EXHAUSTIVE_LIMIT:
        states = (dict(zip(names, indices)) for indices in itertools.product(*(range(sizes[n]) for n in names)))
        best_state = min(states, key=cost_of, default={})
    else:
        start = {n: next((i for i, c in enumerate(options[n]) if default.get(n) == c), 0) for n in names}
        on_mesh = {n: _indices_by_mesh(options[n]) for n in names}
        meshes_of = {n: list(on_mesh[n]) for n in names}
        # the whole search keeps to budget_s: a tenth for each first descent, from the default and from a
        # lean start (little memory per rank: large models), then the annealing from the better one, and a
        # fifth for the last descent
        deadline = began + budget_s
        first = min((_descend(cost_of, sizes, begin, began + share * budget_s)
                     for begin, share in ((start, 0.1), (_lean(options, start), 0.2))), key=cost_of)
        annealed = _anneal(cost_of, sizes, on_mesh, meshes_of, first, seed, max(0.0, deadline - 0.2 * budget_s -
                                                                              time.perf_counter()), iterations)
        best_state = _descend(cost_of, sizes, annealed, deadline)
    if cost_of(best_state) >= INFEASIBLE_S:
        raise ConfigError(_no_fit_message(roles, profile))
    choices = plan_of(best_state)
    return Plan(choices, evaluator.estimate(choices), evaluator.evaluated, space <= EXHAUSTIVE_LIMIT,
                time.perf_counter() - began)


def measured_stages(profile: DeviceProfile, role: RoleModel, dtype: str) -> tuple[int, ...]:
    """The ZeRO stages a search may choose for a role's engine: those whose calls the profile timed for this
    model (so that no stage is judged by the roofline against measured ones), else all."""
    table = table_for(profile, role.shape, dtype)
    if table is None:
        return ZERO_STAGES
    head = "lm" if role.lm_head else "value"
    return tuple(s for s in ZERO_STAGES if stage_key(s, table.fits, head, "train") and
                 stage_key(s, table.fits, head, "optimizer")) or ZERO_STAGES


def _lean(options: Mapping[str, Sequence[Choice]], start: Mapping[str, int]) -> dict[str, int]:
    """A start that spends little memory: every generate / inference call on the largest mesh with its largest
    tensor parallelism (the smallest shards and caches), training on its mesh in `start` with ZeRO-3 and the
    smallest micro-batch; a search from a default that overflows memory (large models) begins inside or
    near the plans that fit."""
    lean = dict(start)
    for name, choices in options.items():
        if choices and choices[0].train is None:
            lean[name] = max(range(len(choices)), key=lambda i: (choices[i].allocation.mesh.size,
                                                                 choices[i].allocation.strategy.tp))
        elif choices:  # the same mesh, ZeRO-3 and the smallest micro-batch (the fewest activations)
            mesh = choices[start[name]].allocation.mesh
            lean[name] = min(range(len(choices)), key=lambda i: (choices[i].allocation.mesh != mesh,
                                                                 -choices[i].train.zero_stage,
                                                                 choices[i].train.micro_batch))
    return lean


def _indices_by_mesh(options: Sequence[Choice]) -> dict[DeviceMesh, list[int]]:
    out: dict[DeviceMesh, list[int]] = {}
    for i, choice in enumerate(options):
        out.setdefault(choice.allocation.mesh, []).append(i)
    return out


def _no_fit_message(roles: Mapping[str, RoleModel], profile: DeviceProfile) -> str:
    """How many devices of this memory the models' states need at the least (ZeRO-3 over all of them)."""
    total = 0
    for role in roles.values():
        per_param = 2 + 2 + cost.ADAM_STATE_BYTES if role.trainable else 2
        total += role.shape.params * per_param
    gib = 2 ** 30
    needed = -(-total // profile.memory_bytes)
    return (f"no allocation fits in {profile.memory_bytes / gib:.0f} GiB per device ({profile.name}): the models' "
            f"weights, gradients and optimizer states alone take {total / gib:.1f} GiB, at least {needed} devices of "
            f"this memory before activations, KV caches and logits")
