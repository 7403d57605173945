"""A step's predicted time and memory for one execution plan: the cost terms placed on the meshes.

Each MFC's call is costed from its allocation (rows per data-parallel group, tensor parallelism,
ZeRO stage and micro-batches for the training engines), each reallocation from our own plan
(`ReallocPlan`, memoised per layout pair: the bytes the busiest destination rank receives), and the
step is played with the runner's semantics (`simulate.play`). Memory per rank is what stays
resident (training states, frozen engines' partitions, kept inference copies) plus the largest
transient of any call the rank runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Mapping, NamedTuple, Sequence

from ds_realloc.comm.batches import route
from ds_realloc.dataflow.allocation import Allocation
from ds_realloc.dataflow.mfc import MFC, MFCKind
from ds_realloc.layout.layout import Layout
from ds_realloc.layout.mesh import DeviceMesh, Strategy
from ds_realloc.layout.model import ModelSpec
from ds_realloc.layout.plan import ReallocPlan, max_weight_assignment
from ds_realloc.planner import calibrated, cost
from ds_realloc.planner.cost import ModelShape
from ds_realloc.planner.profile import DeviceProfile, Link
from ds_realloc.planner.simulate import CALL, MOVE, REALLOC, Op, Timeline, play, step_ops

DEEPSPEED_CHAT = frozenset({MFCKind.GENERATE, MFCKind.INFERENCE})  # every call on its engine (gather-once generation)
OPENRLHF = frozenset({MFCKind.INFERENCE})  # its own TP generation engines; scoring by ZeRO-3 forwards
INFEASIBLE_S = 1e9  # the objective of every plan that overflows some rank's memory starts here
ROW_KEY_BYTES = 8  # an int64 per token of a token-level key (ids, log-probs, values, advantages)


@dataclass(frozen=True)
class Workload:
    """What one step computes: `rows` samples of `prompt_len` prompt and `new_tokens` completion tokens."""

    rows: int
    prompt_len: int
    new_tokens: int
    minibatches: int = 1
    epochs: int = 1
    dtype: str = "bf16"

    @property
    def length(self) -> int:
        return self.prompt_len + self.new_tokens


@dataclass(frozen=True)
class RoleModel:
    spec: ModelSpec
    shape: ModelShape
    trainable: bool
    lm_head: bool = True  # False: a value head (critic, reward model), no logits
    offload: bool = False  # a frozen role kept on the host: its inference copy is made at every call


@dataclass(frozen=True)
class TrainSetting:
    """How a training MFC's engine runs: ZeRO stage, rows per micro-batch per rank, offload."""

    zero_stage: int = 3
    micro_batch: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False


@dataclass(frozen=True)
class Estimate:
    timeline: Timeline
    call_s: dict[str, float]  # per MFC, its call alone
    realloc_s: dict[str, float]
    peak_bytes: tuple[int, ...]  # per rank
    resident_bytes: tuple[int, ...] = field(default=())

    @property
    def step_s(self) -> float:
        return self.timeline.makespan


def mesh_link(ranks: Sequence[int], profile: DeviceProfile) -> Link:
    """The link a collective over `ranks` crosses: NVLink-class inside one node, the network across nodes."""
    nodes = {r // profile.gpus_per_node for r in ranks}
    return profile.intra_node if len(nodes) <= 1 else profile.inter_node


def _tp_link(allocation: Allocation, profile: DeviceProfile) -> Link:
    group = allocation.dp_groups[0]
    return mesh_link(group, profile)


def call_seconds(mfc: MFC, allocation: Allocation, role: RoleModel | None, work: Workload,
                 train: TrainSetting | None, profile: DeviceProfile, on_engine: frozenset = frozenset()) -> float:
    """The time of one MFC's call on its allocation (the slowest of its identical data-parallel groups).
    Kinds in `on_engine` run on the role's own DeepSpeed engine, with no reallocation (DeepSpeed-Chat's
    mechanism, `engine.inference=zero3`): generation gathers the whole model from the ZeRO-3 partitions
    once and generates on every rank, inference runs ZeRO-3 forwards."""
    if role is None:
        return 0.0  # a reward function or the RL targets: no model
    shape, dtype, kind = role.shape, work.dtype, mfc.kind
    if kind.on_engine:
        return _engine_seconds(mfc, allocation, role, work, train or TrainSetting(), profile)
    if kind in on_engine:
        engine = train or TrainSetting(micro_batch=max(1, work.rows // allocation.mesh.size))
        if kind is MFCKind.GENERATE:
            rows = work.rows // allocation.mesh.size
            gather = cost.all_gather_s(cost.weight_bytes(shape, dtype), allocation.mesh.size,
                                       mesh_link(allocation.mesh.ranks, profile))
            return gather + cost.generate_s(shape, rows, work.prompt_len, work.new_tokens, 1, profile, dtype)
        score = MFC(mfc.name, mfc.role, MFCKind.SCORE, mfc.input_keys, mfc.output_keys)
        return _engine_seconds(score, allocation, role, work, engine, profile)
    s = allocation.strategy
    rows = work.rows // s.dp
    measured = _measured_call(kind, role, rows, s.tp, work, profile)
    if measured is not None:
        return measured
    link = _tp_link(allocation, profile)
    if kind is MFCKind.GENERATE:
        return cost.generate_s(shape, rows, work.prompt_len, work.new_tokens, s.tp, profile, dtype, link)
    return cost.score_s(shape, rows, work.length, s.tp, profile, dtype, logits=role.lm_head, link=link)


def _head(role: RoleModel) -> str:
    return "lm" if role.lm_head else "value"


def _measured_call(kind: MFCKind, role: RoleModel, rows: int, tp: int, work: Workload,
                   profile: DeviceProfile) -> float | None:
    """A generate / inference call's time from the profile's measured table of this model (None without one)."""
    table = calibrated.table_for(profile, role.shape, work.dtype)
    if table is None:
        return None
    if kind is MFCKind.GENERATE:
        return calibrated.generate_s(table, role.shape, rows, work.prompt_len, work.new_tokens, tp)
    return calibrated.score_s(table, role.shape, _head(role), rows * work.length, tp)


def running_micro_batch(train: TrainSetting, work: Workload, ranks: int) -> int:
    """The rows per micro-batch an engine on `ranks` runs: its setting, at most a minibatch's share per rank."""
    return max(1, min(train.micro_batch, work.rows // ranks // work.minibatches))


def _engine_seconds(mfc: MFC, allocation: Allocation, role: RoleModel, work: Workload, train: TrainSetting,
                    profile: DeviceProfile) -> float:
    """A DeepSpeed engine's forward (SCORE) or update (TRAIN) over the step's rows, ZeRO collectives included:
    the compute measured per micro-batch where the profile timed this model (the collectives too where it
    timed an engine data-parallel over as many ranks), else the roofline."""
    shape, dtype, ranks = role.shape, work.dtype, allocation.mesh.size
    rows = work.rows // ranks
    micro = running_micro_batch(train, work, ranks)
    micro_batches = max(1, -(-rows // micro))
    link = mesh_link(allocation.mesh.ranks, profile)
    gather = cost.all_gather_s(cost.weight_bytes(shape, dtype), ranks, link) if train.zero_stage == 3 else 0.0
    table = calibrated.table_for(profile, shape, dtype)

    def measured(kind: str, dp: int = 1) -> float | None:
        if table is None or train.offload_param:
            return None
        return calibrated.engine_s(table, shape, _head(role), train.zero_stage, kind, micro * work.length, dp)

    steps = work.epochs * work.minibatches
    if ranks > 1:  # timed data-parallel over this many ranks: the ZeRO collectives are in the times
        if mfc.kind is MFCKind.SCORE and (forward := measured("engine_score", ranks)) is not None:
            return micro_batches * forward
        micro_s, step_s = measured("train", ranks), measured("optimizer", ranks)
        if mfc.kind is MFCKind.TRAIN and micro_s is not None and step_s is not None:
            return work.epochs * micro_batches * micro_s + steps * step_s
    if mfc.kind is MFCKind.SCORE:
        forward = measured("engine_score")
        if forward is None:
            flops = cost.forward_flops(shape, rows * work.length, cost.causal_context(work.length),
                                       rows * work.length if role.lm_head else 0)
            return cost.matmul_s(flops, profile, dtype) + micro_batches * gather
        return micro_batches * (forward + gather)
    per_step_micro = max(1, micro_batches // work.minibatches)
    traffic = cost.zero_traffic_s(shape, train.zero_stage, ranks, per_step_micro, link, dtype)
    micro_s, step_s = measured("train"), measured("optimizer")
    if micro_s is None or step_s is None:
        compute = work.epochs * cost.train_compute_s(shape, rows, work.length, profile, dtype, logits=role.lm_head)
        optimizer = cost.optimizer_s(shape, train.zero_stage, ranks, train.offload_optimizer, profile, dtype)
        return compute + steps * (traffic + optimizer)
    optimizer = step_s / (ranks if train.zero_stage >= 1 else 1)  # timed on one rank: its share of the states
    return work.epochs * micro_batches * micro_s + steps * (traffic + optimizer)


class Traffic(NamedTuple):
    """What a reallocation moves: its ranks, the busiest destination's elements, its messages, and per rank
    the most elements one bucket (one pipeline unit) holds in send and receive buffers at once."""

    ranks: tuple[int, ...]
    received: int
    messages: int
    bucket: tuple[tuple[int, int], ...]


@lru_cache(maxsize=4096)
def _plan_traffic(spec: ModelSpec, src: Layout, dst: Layout) -> Traffic:
    """Our plan's own traffic."""
    stats = ReallocPlan.build(spec, src, dst).stats()
    ranks = tuple(sorted({r for r, v in stats.recv.items() if v} | {r for r, v in stats.send.items() if v}))
    return Traffic(ranks, max(stats.recv.values(), default=0), stats.messages,
                   tuple(sorted((r, v) for r, v in stats.bucket.items() if v)))


EXACT_PLAN_RANKS = 16  # up to this many ranks a plan builds in milliseconds; above, the analytic bound


def truncated(spec: ModelSpec, layers: int) -> ModelSpec:
    """The model with only its first `layers` transformer layers (embeddings and head kept)."""
    last = spec.num_layers + 1
    params = tuple(p if p.unit <= layers else replace(p, unit=layers + 1)
                   for p in spec.params if p.unit <= layers or p.unit == last)
    return ModelSpec(spec.family, params, layers, spec.tied_head)


def _uniform(spec: ModelSpec) -> bool:
    """Whether every transformer layer has the same parameters (shapes, shard rules)."""
    layers: dict[int, list] = {}
    for p in spec.params:
        layers.setdefault(p.unit, []).append((p.shape, p.rule, p.experts))
    return len({tuple(layers.get(u, ())) for u in range(1, spec.num_layers + 1)}) <= 1


def layer_scaled(traffic, spec: ModelSpec, src: Layout, dst: Layout) -> Traffic:
    """`traffic` of the whole model from its 1- and 2-layer truncations: ZeRO-3 partitions each parameter
    on its own and tensor-parallel shards each layer alike, so with identical layers every rank's bytes
    grow by the same amount per layer and a bucket (one layer) is the same. A test checks it against the
    whole model's exact plans (equal, but for the bucket of whole replicas sending outside their mesh:
    the plan spreads the units over the senders a little differently, within 15%). Pipeline layouts,
    and models whose layers differ, take the whole model."""
    if spec.num_layers <= 2 or max(src.strategy.pp, dst.strategy.pp) > 1 or not _uniform(spec):
        return traffic(spec, src, dst)
    one, two = (traffic(*_on(truncated(spec, k), src, dst)) for k in (1, 2))
    if not two.ranks:
        return two
    received = one.received + (spec.num_layers - 1) * (two.received - one.received)
    return Traffic(two.ranks, received, two.messages, two.bucket)


def _on(spec: ModelSpec, src: Layout, dst: Layout) -> tuple[ModelSpec, Layout, Layout]:
    return (spec, replace(src, model=spec, _cache={}), replace(dst, model=spec, _cache={}))


def _covered_below(run, x: int) -> int:
    """Elements of a Run's spans that lie below flat index x."""
    rel = x - run.full
    if rel <= 0:
        return 0
    if run.count == 1:
        return min(rel, run.length)
    spans = min(rel // run.full_stride, run.count)
    partial = min(run.length, rel - spans * run.full_stride) if spans < run.count else 0
    return spans * run.length + max(0, partial)


def _received(dst: Layout, tp_rank: int, interval) -> int:
    """Elements tensor-parallel rank `tp_rank`'s shards need that lie outside `interval(param)` (its local span)."""
    total = 0
    for buffer in dst.buffers_of_key(dst.shard_key(0, tp_rank, 0)):
        for member in buffer.members:
            lo, hi = interval(member.param)
            for run in member.runs:
                total += run.numel - (_covered_below(run, hi) - _covered_below(run, lo))
    return total


def analytic_traffic(spec: ModelSpec, src: Layout, dst: Layout, samples: int = 8) -> Traffic:
    """What `_plan_traffic` reports, computed from the two layouts without building the plan: in each
    tensor-parallel group the shards go to the ranks that hold most of them already (as the plan
    places them), and a rank receives what its shard needs beyond its own ZeRO-3 partition (nothing
    from a whole replica, all of it on a rank outside the source mesh). Evaluated on `samples`
    data-parallel groups spread over the destination (the layouts are regular); a test checks it
    against the exact plan. Bucket buffers are estimated (`bucket_estimate`)."""
    home = set(src.ranks)
    numel = {p.name: p.numel for p in spec.params}
    h, s = src.strategy.dp, dst.strategy

    def received(rank: int, tp_rank: int) -> int:
        if rank in home and not src.strategy.zero3:
            return 0  # a whole replica: everything is local
        if rank not in home:
            return _received(dst, tp_rank, lambda name: (0, 0))
        i = src.mesh.index(rank)

        def interval(name: str) -> tuple[int, int]:
            size = -(-numel[name] // h)
            return i * size, min((i + 1) * size, numel[name])

        return _received(dst, tp_rank, interval)

    busiest = 0
    for dp in sorted(set(range(0, s.dp, max(1, s.dp // samples))) | {s.dp - 1}):
        group = [dst.mesh.ranks[s.index(dp, k, 0)] for k in range(s.tp)]
        need = [_received(dst, k, lambda name: (0, 0)) for k in range(s.tp)]
        matrix = [[received(rank, k) for k in range(s.tp)] for rank in group]
        assignment = max_weight_assignment([[need[k] - row[k] for k in range(s.tp)] for row in matrix])
        busiest = max([busiest] + [row[k] for row, k in zip(matrix, assignment)])
    if not busiest:
        return Traffic((), 0, 0, ())
    ranks = tuple(sorted(home | set(dst.ranks)))
    return Traffic(ranks, busiest, len(dst.ranks) * min(h, len(ranks)), bucket_estimate(spec, src, dst))


def bucket_estimate(spec: ModelSpec, src: Layout, dst: Layout) -> tuple[tuple[int, int], ...]:
    """Per rank, the elements one bucket of the plan holds, from the layouts: a destination rank receives
    its shard of the largest unit; a ZeRO-3 source rank sends its partition of the unit to every
    data-parallel replica of the destination, a whole replica its share of the ranks outside the source
    mesh. Pessimistic where a shard overlaps the rank's own partition; a test bounds it against the exact
    plan's."""
    largest = max(spec.unit_numel())
    home, h, s = set(src.ranks), src.strategy.dp, dst.strategy
    outside = len(set(dst.ranks) - home)
    out = []
    for rank in sorted(home | set(dst.ranks)):
        received = -(-largest // s.tp) if rank in dst.ranks and (rank not in home or src.strategy.zero3) else 0
        sent = 0
        if rank in home:
            sent = -(-largest // h) * s.dp if src.strategy.zero3 else -(-outside // h) * -(-largest // s.tp)
        out.append((rank, received + sent))
    return tuple(out)


def source_layout(role: RoleModel, home: DeviceMesh, train: TrainSetting | None) -> Layout:
    """Where a role's weights live between calls: its engine's ZeRO-3 partitions, or whole replicas
    (ZeRO 0-2), on its home mesh."""
    zero3 = train is None or train.zero_stage == 3
    return Layout(role.spec, home, Strategy(dp=home.size, zero3=zero3))


def realloc_op(mfc: MFC, allocation: Allocation, role: RoleModel, home: DeviceMesh, train: TrainSetting | None,
               work: Workload, profile: DeviceProfile) -> tuple[Op | None, dict[int, int]]:
    """The weights' move into the call's layout in a steady-state step (None when nothing moves: a frozen,
    resident role keeps its copy between steps), and the bytes of its bucket buffers per rank."""
    if not role.trainable and not role.offload:
        return None, {}
    dst = Layout(role.spec, allocation.mesh, allocation.strategy, fused=True)
    src = source_layout(role, home, train)
    traffic = _plan_traffic if len(set(home.ranks) | set(allocation.mesh.ranks)) <= EXACT_PLAN_RANKS \
        else analytic_traffic
    ranks, received, messages, bucket = layer_scaled(traffic, role.spec, src, dst)
    if not ranks:
        return None, {}
    link = mesh_link(sorted(set(ranks) | set(home.ranks)), profile)
    per_rank_messages = max(1, messages // max(1, len(allocation.mesh.ranks)))
    op = Op(mfc.name, REALLOC, ranks, cost.transfer_s(received * cost.BYTES[work.dtype], link, per_rank_messages))
    return op, {r: n * cost.BYTES[work.dtype] for r, n in bucket}


def move_ops(mfc: MFC, allocations: Mapping[str, Allocation], producers: Mapping[str, str | None], work: Workload,
             profile: DeviceProfile) -> list[Op]:
    """The input rows an MFC's groups lack, one operation per producing MFC (its senders and receivers)."""
    consumer = allocations[mfc.name].split(work.rows)
    ops = []
    for producer in sorted({producers[k] for k in mfc.input_keys if producers.get(k)}):
        keys = sum(1 for k in mfc.input_keys if producers[k] == producer)
        messages = route(allocations[producer].split(work.rows), consumer)
        if not messages:
            continue
        ranks = tuple(sorted({m.src for m in messages} | {m.dst for m in messages}))
        rows = max(sum(len(m.rows) for m in messages if m.dst == r) for r in ranks)
        nbytes = rows * keys * work.length * ROW_KEY_BYTES
        ops.append(Op(mfc.name, MOVE, ranks, cost.transfer_s(nbytes, mesh_link(ranks, profile), len(messages))))
    return ops


def home_meshes(mfcs: Sequence[MFC], allocations: Mapping[str, Allocation]) -> dict[str, DeviceMesh]:
    """Each role's engine mesh, as the runner places it: its training call's, else its first call's."""
    homes: dict[str, DeviceMesh] = {}
    for mfc in mfcs:
        if mfc.kind is MFCKind.TRAIN or mfc.role not in homes:
            homes[mfc.role] = allocations[mfc.name].mesh
    return homes


def resident_bytes(roles: Mapping[str, RoleModel], homes: Mapping[str, DeviceMesh], mfcs: Sequence[MFC],
                   allocations: Mapping[str, Allocation], train: Mapping[str, TrainSetting], world: int,
                   dtype: str, on_engine: frozenset = frozenset()) -> list[int]:
    """What stays on each rank between calls: training states by ZeRO stage, frozen engines' ZeRO-3
    partitions (none when offloaded) and the inference copies frozen, resident roles keep."""
    out = [0] * world
    trainer = {m.role: m.name for m in mfcs if m.kind is MFCKind.TRAIN}
    for name, role in roles.items():
        home = homes.get(name)
        if home is None:
            continue
        if role.trainable:  # the gradient bucket's pages, once touched by the first backward, stay
            setting = train.get(trainer[name], TrainSetting())
            per_rank = cost.train_state_bytes(role.shape, setting.zero_stage, home.size, setting.offload_optimizer,
                                              setting.offload_param, dtype) + \
                cost.gradient_bucket_bytes(role.shape, setting.zero_stage, dtype)
        else:
            per_rank = 0 if role.offload else cost.weight_bytes(role.shape, dtype) // home.size
        for r in home.ranks:
            out[r] += per_rank
    for mfc in mfcs:
        role = roles.get(mfc.role)
        if role is None or role.trainable or role.offload or mfc.kind.on_engine or mfc.kind in on_engine:
            continue
        tp = allocations[mfc.name].strategy.tp
        for r in allocations[mfc.name].mesh.ranks:
            out[r] += cost.weight_bytes(role.shape, dtype) // tp
    return out


MASTER_BYTES = 4  # of ADAM_STATE_BYTES: the fp32 master weights, made when the engine is built (m and v at its first step)


def startup_bytes(roles: Mapping[str, RoleModel], homes: Mapping[str, DeviceMesh], mfcs: Sequence[MFC],
                  train: Mapping[str, TrainSetting], world: int, dtype: str) -> list[int]:
    """What each rank holds right after start-up: the engines' weights (partitions or replicas) and, for
    trained roles, the fp32 master weights (and under ZeRO-3 the gradient partitions, zeroed when the
    engine is built); Adam's moments, the gradient bucket's pages and inference copies come later."""
    out = [0] * world
    trainer = {m.role: m.name for m in mfcs if m.kind is MFCKind.TRAIN}
    for name, role in roles.items():
        home = homes.get(name)
        if home is None:
            continue
        if role.trainable:
            setting = train.get(trainer[name], TrainSetting())
            weights = cost.weight_bytes(role.shape, dtype) // (home.size if setting.zero_stage == 3 else 1)
            master = 0 if setting.zero_stage == 0 and not setting.offload_optimizer else \
                role.shape.params * MASTER_BYTES // (home.size if setting.zero_stage >= 1 else 1)
            gradients = cost.weight_bytes(role.shape, dtype) // home.size if setting.zero_stage == 3 else 0
            per_rank = (0 if setting.offload_param else weights) + master + gradients
        else:
            per_rank = 0 if role.offload else cost.weight_bytes(role.shape, dtype) // home.size
        for r in home.ranks:
            out[r] += per_rank
    return out


def _measured_train_bytes(role: RoleModel, setting: TrainSetting, tokens: int, work: Workload,
                          profile: DeviceProfile | None) -> int | None:
    """A training micro-batch's transient memory from the profile's measurement of this model (None
    without one, or with offload, which the profile does not measure)."""
    table = None if profile is None else calibrated.table_for(profile, role.shape, work.dtype)
    if table is None or setting.offload_optimizer or setting.offload_param:
        return None
    measured = calibrated.train_transient_bytes(table, role.shape, _head(role), setting.zero_stage, tokens)
    return None if measured is None else round(measured)


def transient_bytes(mfc: MFC, allocation: Allocation, role: RoleModel, work: Workload,
                    train: TrainSetting | None, on_engine: frozenset = frozenset(),
                    profile: DeviceProfile | None = None) -> int:
    """What one call adds on each of its ranks while it runs (on top of the resident states); with
    a generation `on_engine` holds the whole gathered model, an inference `on_engine` is an engine forward;
    a training micro-batch's is the profile's measurement where it has one."""
    dtype = work.dtype
    if mfc.kind is MFCKind.GENERATE and mfc.kind in on_engine:
        rows = work.rows // allocation.mesh.size
        return cost.inference_peak_bytes(role.shape, rows, work.length, 1, dtype, rows)
    if mfc.kind.on_engine or mfc.kind in on_engine:
        setting = train or TrainSetting(micro_batch=max(1, work.rows // allocation.mesh.size))
        micro, length = setting.micro_batch, work.length
        if mfc.kind is MFCKind.TRAIN:
            tokens = running_micro_batch(setting, work, allocation.mesh.size) * length
            measured = _measured_train_bytes(role, setting, tokens, work, profile)
            if measured is not None:
                return measured
            states = cost.train_state_bytes(role.shape, setting.zero_stage, allocation.mesh.size,
                                            setting.offload_optimizer, setting.offload_param, dtype)
            return cost.train_peak_bytes(role.shape, setting.zero_stage, allocation.mesh.size, micro, length,
                                         setting.offload_optimizer, setting.offload_param, dtype,
                                         role.lm_head) - states - cost.gradient_bucket_bytes(role.shape,
                                                                                             setting.zero_stage,
                                                                                             dtype)
        gathered = role.shape.layer_params // role.shape.layers * cost.BYTES[dtype] if setting.zero_stage == 3 else 0
        logits = cost.logits_bytes(micro * length, role.shape.vocab, backward=False) if role.lm_head else 0
        return logits + gathered
    s = allocation.strategy
    rows = work.rows // s.dp
    logit_tokens = rows if mfc.kind is MFCKind.GENERATE else (rows * work.length if role.lm_head else 0)
    copy = cost.inference_peak_bytes(role.shape, rows, work.length, s.tp, dtype, logit_tokens)
    if not role.trainable and not role.offload:  # the kept copy is resident already
        copy -= cost.weight_bytes(role.shape, dtype) // s.tp
    return copy


@dataclass(frozen=True)
class Choice:
    """One MFC's allocation and, for a training MFC, how its engine runs."""

    allocation: Allocation
    train: TrainSetting | None = None

    def __str__(self) -> str:
        a = self.allocation
        label = f"{a.strategy}@[{a.mesh}]"
        if self.train is not None:
            label += f" zero{self.train.zero_stage} micro{self.train.micro_batch}"
        return label


class Evaluator:
    """Estimates of whole plans from memoised per-MFC pieces (the same numbers `estimate_step` gives)."""

    def __init__(self, mfcs: Sequence[MFC], roles: Mapping[str, RoleModel], work: Workload, profile: DeviceProfile,
                 world: int, on_engine: frozenset = frozenset()):
        self.mfcs, self.roles, self.work, self.profile, self.world = list(mfcs), roles, work, profile, world
        self.on_engine = on_engine  # kinds of call that run on their role's engine, no reallocation (baselines)
        self.trainer = {m.role: m.name for m in mfcs if m.kind is MFCKind.TRAIN}
        self.producers: dict[str, str | None] = {k: None for m in mfcs for k in m.input_keys}
        self.producers.update({k: m.name for m in mfcs for k in m.output_keys})
        self._calls: dict = {}
        self._reallocs: dict = {}
        self._moves: dict = {}
        self.evaluated = 0

    def _setting(self, mfc: MFC, choices: Mapping[str, Choice]) -> TrainSetting | None:
        role = self.roles.get(mfc.role)
        if role is None or not role.trainable:
            return None
        return choices[self.trainer[mfc.role]].train

    def _call(self, mfc: MFC, choice: Choice, setting: TrainSetting | None) -> tuple[float, int]:
        key = (mfc.name, choice.allocation.mesh, choice.allocation.strategy, setting)
        if key not in self._calls:
            role = self.roles.get(mfc.role)
            seconds = call_seconds(mfc, choice.allocation, role, self.work, setting, self.profile,
                                   self.on_engine)
            extra = 0 if role is None else transient_bytes(mfc, choice.allocation, role, self.work, setting,
                                                           self.on_engine, self.profile)
            self._calls[key] = (seconds, extra)
        return self._calls[key]

    def _realloc(self, mfc: MFC, choice: Choice, home: DeviceMesh,
                 setting: TrainSetting | None) -> tuple[Op | None, dict[int, int]]:
        key = (mfc.name, choice.allocation.mesh, choice.allocation.strategy, home, setting)
        if key not in self._reallocs:
            self._reallocs[key] = realloc_op(mfc, choice.allocation, self.roles[mfc.role], home, setting, self.work,
                                             self.profile)
        return self._reallocs[key]

    def _move(self, mfc: MFC, allocations: Mapping[str, Allocation]) -> list[Op]:
        sources = tuple(sorted({self.producers[k] for k in mfc.input_keys if self.producers.get(k)}))
        key = (mfc.name, allocations[mfc.name].dp_groups, tuple(allocations[s].dp_groups for s in sources))
        if key not in self._moves:
            self._moves[key] = move_ops(mfc, allocations, self.producers, self.work, self.profile)
        return self._moves[key]

    def estimate(self, choices: Mapping[str, Choice]) -> Estimate:
        self.evaluated += 1
        allocations = {name: c.allocation for name, c in choices.items()}
        homes = home_meshes(self.mfcs, allocations)
        calls, reallocs, moves = {}, {}, {}
        transient = [0] * self.world
        call_s, realloc_s = {}, {}
        for mfc in self.mfcs:
            choice, setting = choices[mfc.name], self._setting(mfc, choices)
            seconds, extra = self._call(mfc, choice, setting)
            calls[mfc.name] = Op(mfc.name, CALL, choice.allocation.mesh.ranks, seconds)
            call_s[mfc.name] = seconds
            moves[mfc.name] = self._move(mfc, allocations)
            if mfc.role in self.roles and not mfc.kind.on_engine and mfc.kind not in self.on_engine:
                op, buckets = self._realloc(mfc, choice, homes[mfc.role], setting)
                if op is not None:
                    reallocs[mfc.name], realloc_s[mfc.name] = op, op.seconds
                for r, nbytes in buckets.items():  # every rank of the move holds one bucket's buffers
                    transient[r] = max(transient[r], nbytes)
            for r in choice.allocation.mesh.ranks:
                transient[r] = max(transient[r], extra)
        settings = {self.trainer[r]: choices[self.trainer[r]].train for r in self.trainer}
        resident = resident_bytes(self.roles, homes, self.mfcs, allocations, settings, self.world, self.work.dtype,
                                  self.on_engine)
        timeline = play(step_ops(self.mfcs, calls, reallocs, moves), self.world)
        return Estimate(timeline, call_s, realloc_s, tuple(a + b for a, b in zip(resident, transient)),
                        tuple(resident))

    def objective(self, choices: Mapping[str, Choice]) -> float:
        """The step time; when some rank's memory overflows, INFEASIBLE_S plus the worst overflow as a fraction
        of the device memory: never chosen over a plan that fits, but the search can walk towards one that does."""
        estimate = self.estimate(choices)
        overflow = max(estimate.peak_bytes) - self.profile.memory_bytes
        if overflow > 0:
            return INFEASIBLE_S + overflow / self.profile.memory_bytes
        return estimate.step_s


def with_scores(mfcs: Sequence[MFC], choices: Mapping[str, Choice]) -> dict[str, Choice]:
    """`choices` with every SCORE call on its trainer's allocation (it runs on that engine)."""
    trainer = {m.role: m.name for m in mfcs if m.kind is MFCKind.TRAIN}
    out = dict(choices)
    for m in mfcs:
        if m.kind is MFCKind.SCORE:
            t = choices[trainer[m.role]]
            out[m.name] = Choice(Allocation(m, t.allocation.mesh, t.allocation.strategy), t.train)
    return out


def estimate_step(mfcs: Sequence[MFC], allocations: Mapping[str, Allocation], roles: Mapping[str, RoleModel],
                  work: Workload, train: Mapping[str, TrainSetting], profile: DeviceProfile, world: int,
                  on_engine: frozenset = frozenset()) -> Estimate:
    """The predicted steady-state step of an execution plan given as allocations and training settings."""
    choices = {m.name: Choice(allocations[m.name], train.get(m.name) if m.kind is MFCKind.TRAIN else None)
               for m in mfcs}
    return Evaluator(mfcs, roles, work, profile, world, on_engine).estimate(choices)
