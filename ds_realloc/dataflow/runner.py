"""The SPMD runner: every rank walks the experiment's MFC graph in one fixed order, step by step.

For each MFC, every rank (1) moves the rows of the MFC's inputs that its data-parallel group lacks
from the mesh that produced them, (2) for generate / inference calls, takes part in moving the
role's weights into the MFC's layout (as a sender, a receiver or both), and (3) if it belongs to
the MFC's mesh, runs the interface on its rows. MFCs on disjoint meshes therefore run at the
same time without a scheduler. Evaluation walks the same graph on held-out rows (training calls
evaluate instead of stepping). The runner also owns what every algorithm shares: data order,
metrics, DeepSpeed checkpoints (`--resume`), the final HF checkpoints and summary.json.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoTokenizer

from ds_realloc.algorithms.interface import Metrics, add_metric
from ds_realloc.algorithms.rollout import GenerateInterface
from ds_realloc.comm.batches import exchange, route
from ds_realloc.data.datasets import ChatFormatter, load_records, tokenize_records
from ds_realloc.data.sampler import StepSampler
from ds_realloc.dataflow.allocation import Allocation, resolve_allocations
from ds_realloc.dataflow.experiments import Experiment, InterfaceContext
from ds_realloc.dataflow.metrics import MetricsWriter, reduce_max, reduce_metrics
from ds_realloc.dataflow.mfc import MFC, MFCKind, dataset_keys, topological_order
from ds_realloc.dataflow.roles import Role, build_roles
from ds_realloc.engine.checkpoint import load_training_state, save_hf_model, save_training_state
from ds_realloc.engine.zero_inference import ZeroInferenceCall
from ds_realloc.layout.model import model_spec
from ds_realloc.models.generate import GenerationConfig
from ds_realloc.models.inference import InferenceCall
from ds_realloc.models.presets import resolve_model_path
from ds_realloc.utils.config import to_dict
from ds_realloc.utils.dist import command_start_time, group_of, init_distributed, is_peer_failure, slots_per_host
from ds_realloc.utils.errors import ConfigError, PeerLost, UserError
from ds_realloc.utils.logging import get_logger, setup_logging
from ds_realloc.utils.memory import memory_stats

logger = get_logger(__name__)

_FRESH_RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "tensorboard", "checkpoints", "hf")
_ALWAYS = ("row", "step", "valid")  # keys of every MFC's batch besides its inputs

Store = dict[str, dict[int, Any]]  # key -> row -> value, the rows this rank holds


def run_dir(experiment: Experiment, cfg: Any) -> Path:
    return Path(cfg.output.dir or f"runs/{experiment.command}")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Run:
    """State of one run on one rank."""

    experiment: Experiment
    cfg: Any
    rank: int
    out: Path
    tokenizer: Any
    context: InterfaceContext
    train_set: list
    eval_set: list
    sampler: StepSampler
    total_steps: int
    rows: int  # samples per step (prompts x samples per prompt)
    roles: dict[str, Role]
    allocations: dict[str, Allocation]
    interfaces: dict[str, Any]
    order: list[MFC]
    writer: MetricsWriter
    step: int = 0
    eval_before: dict[str, float] = field(default_factory=dict)
    train_before_s: float = 0.0  # the training loop's seconds before a resume
    mfc_seconds: dict[str, list[float]] = field(default_factory=dict)
    doing: str = "start-up"  # what this rank is busy with, for the error when a peer dies

    # -- one MFC -------------------------------------------------------------------------------------

    def _weights(self, mfc: MFC) -> tuple[InferenceCall | ZeroInferenceCall | None, dict[str, float]]:
        """Every rank takes part in moving the role's weights into the MFC's layout (if it has a model).
        With `engine.inference=zero3` (DeepSpeed-Chat's mechanism, the baseline) nothing moves: the
        call runs on the role's own engine; this is the one place that switch is read."""
        role = self.roles.get(mfc.role)
        if role is None:
            return None, {}
        if self.cfg.engine.inference == "zero3":
            return (ZeroInferenceCall(role.module, role.ds_engine) if role.module is not None else None), {}
        allocation = self.allocations[mfc.name]
        start = time.perf_counter()
        kept = None if role.spec.trainable or role.spec.offload else role.version  # frozen, resident: keep
        model = role.hybrid.model_on(role.hybrid.layout(allocation.mesh, allocation.strategy), kept)
        timing = {f"realloc/{mfc.name}_s": time.perf_counter() - start,
                  f"realloc/{mfc.name}_recv_bytes": float(role.hybrid.last_stats.received_elements
                                                          * role.hybrid.dtype.itemsize)}
        return (InferenceCall(model) if model is not None else None), timing

    @contextlib.contextmanager
    def _train_states_offloaded(self, mfc: MFC) -> Iterator[None]:
        """With `rollout.offload_train_states`, this rank's training engines keep only their bf16/fp16
        partitions on the device while a generate MFC runs (the KV cache gets the memory)."""
        if mfc.kind is not MFCKind.GENERATE or not getattr(getattr(self.cfg, "rollout", None),
                                                             "offload_train_states", False):
            yield
            return
        engines = [role.engine for role in self.roles.values() if role.engine is not None]
        from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum

        states = (OffloadStateTypeEnum.optim_states, OffloadStateTypeEnum.hp_params, OffloadStateTypeEnum.lp_grads,
                  OffloadStateTypeEnum.contiguous_grad_buffer)
        for engine in engines:
            engine.offload_states(include=states)
        try:
            yield
        finally:
            for engine in engines:
                engine.reload_states()

    def route_inputs(self, mfc: MFC, store: Store, producers: dict[str, str | None], rows: int) -> None:
        """Move the MFC's input rows from the meshes that produced them to its data-parallel groups."""
        split = self.allocations[mfc.name].split(rows)
        for producer in sorted({producers[k] for k in mfc.input_keys if producers.get(k)}):
            keys = tuple(k for k in mfc.input_keys if producers[k] == producer)
            exchange(route(self.allocations[producer].split(rows), split), store, keys, store)

    def run_mfc(self, mfc: MFC, store: Store, rows: int, interface: Any,
                evaluating: bool = False) -> tuple[Metrics, dict[str, float]]:
        allocation = self.allocations[mfc.name]
        split = allocation.split(rows)
        call, timing = (None, {}) if mfc.kind.on_engine else self._weights(mfc)
        metrics: Metrics = {}
        if self.rank in allocation.mesh:
            begin = time.perf_counter()
            mine = list(split.rows_of(self.rank))
            batch = {key: [store[key][r] for r in mine] for key in (*mfc.input_keys, *_ALWAYS)}
            engine = self.roles[mfc.role].engine if mfc.kind.on_engine else None
            outputs = {}
            if mfc.kind is MFCKind.TRAIN and evaluating:
                metrics = interface.evaluate(engine, batch)
            elif mfc.kind is MFCKind.TRAIN:
                metrics = interface.train_step(engine, batch)
            elif mfc.kind is MFCKind.SCORE:
                with torch.no_grad():
                    outputs = interface.inference(engine, batch)
            else:
                with self._train_states_offloaded(mfc):
                    outputs = interface.inference(call, batch)
            for key, values in outputs.items():
                store.setdefault(key, {}).update(zip(mine, values))
            _sync()
            timing[f"time/{mfc.name}_s"] = time.perf_counter() - begin
            if split.groups[split.group_of(self.rank)][0] != self.rank:
                metrics = {}  # the tensor-parallel ranks of a group report once
        if mfc.kind is MFCKind.TRAIN and not evaluating:
            self.roles[mfc.role].version += 1  # on every rank: the role's weights changed
        return metrics, timing

    def _when(self, evaluating: bool) -> str:
        return "evaluation" if evaluating else f"step {self.step + 1}"

    def walk(self, mfcs: list[MFC], store: Store, rows: int, interfaces: dict[str, Any],
             evaluating: bool = False) -> tuple[Metrics, dict[str, float]]:
        """Run MFCs on a step's rows, wave by wave: a wave is every MFC whose inputs exist. A wave's
        inputs all move before any of its MFCs runs, so MFCs of one wave on disjoint meshes (PPO's
        actor and critic training) run at the same time; metrics prefixed by role, timings by MFC."""
        producers: dict[str, str | None] = {k: None for k in dataset_keys(mfcs)}
        metrics: Metrics = {}
        timings: dict[str, float] = {}
        pending = list(mfcs)
        while pending:
            wave = [m for m in pending if set(m.input_keys) <= producers.keys()]
            for mfc in wave:
                self.doing = f"moving the inputs of {mfc.name} ({self._when(evaluating)})"
                self.route_inputs(mfc, store, producers, rows)
            for mfc in wave:
                self.doing = f"{mfc.name} ({self._when(evaluating)})"
                mfc_metrics, timing = self.run_mfc(mfc, store, rows, interfaces[mfc.name], evaluating)
                prefix = f"eval/{mfc.role}/" if evaluating else f"{mfc.role}/"
                for name, value in mfc_metrics.items():
                    add_metric(metrics, name if "/" in name else prefix + name, *value)
                timings.update(timing)
            producers.update({key: mfc.name for mfc in wave for key in mfc.output_keys})
            pending = [m for m in pending if m not in wave]
        return metrics, timings

    def _store(self, samples: list, per_sample: int, valid: int | None = None) -> Store:
        """Rows of dataset samples (`per_sample` rows each); every rank holds the dataset keys of every row."""
        rows = len(samples) * per_sample
        valid = rows if valid is None else valid
        return {self.experiment.sample_key: {r: samples[r // per_sample] for r in range(rows)},
                "row": {r: r for r in range(rows)}, "step": {r: self.step for r in range(rows)},
                "valid": {r: r < valid for r in range(rows)}}

    # -- one step ------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        per_sample = self.rows // self.cfg.train.batch_size
        samples = [self.train_set[i] for i in self.sampler.global_batch(self.step)]
        start = time.perf_counter()
        metrics, timings = self.walk(self.order, self._store(samples, per_sample), self.rows, self.interfaces)
        timings.update(self._update_reference())
        step_time = time.perf_counter() - start
        self.doing = f"the metrics of step {self.step + 1}"
        values = reduce_metrics(metrics)
        extra = {**timings, **memory_stats(), "time/step_s": step_time}
        for role in self.roles.values():
            if role.engine is not None:
                extra[f"{role.spec.role}/lr"] = float(role.engine.get_lr()[0])
                grad_norm = role.engine.get_global_grad_norm()
                if grad_norm is not None:
                    extra[f"{role.spec.role}/grad_norm"] = float(grad_norm)
        values.update(reduce_max(extra))
        for role_name in self.roles:
            tokens = values.pop(f"{role_name}/tokens", None)
            if tokens is not None:
                values[f"{role_name}/tokens_per_s"] = tokens / values["time/step_s"]
        for name, seconds in values.items():
            if name.startswith("time/") and name != "time/step_s":
                self.mfc_seconds.setdefault(name.removeprefix("time/").removesuffix("_s"), []).append(seconds)
        return values

    def _reference_moves(self) -> bool:
        return bool(getattr(getattr(self.cfg, "ref", None), "ema", 0.0)) and "ref" in self.roles

    def _update_reference(self) -> dict[str, float]:
        """The reference EMA (`ref.ema`): the actor's new weights blended into the reference's partitions."""
        if not self._reference_moves():
            return {}
        ema = self.cfg.ref.ema
        self.doing = f"the reference EMA of step {self.step + 1}"
        start = time.perf_counter()
        actor, ref = self.roles["actor"], self.roles["ref"]
        stats = actor.hybrid.blend_into(ref.hybrid, ema)
        ref.version += 1  # on every rank: kept inference copies of the reference are stale
        return {"realloc/ref_ema_s": time.perf_counter() - start,
                "realloc/ref_ema_recv_bytes": float(stats.received_elements * actor.hybrid.dtype.itemsize)}

    # -- evaluation ----------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        if not self.eval_set:
            return {}
        if self.experiment.evaluation == "generation":
            return self._evaluate_generation()
        for role in self.roles.values():
            if role.engine is not None:
                role.engine.eval()
        metrics: Metrics = {}
        size = self.cfg.train.batch_size  # rows of a training step: they split over every mesh
        for first in range(0, len(self.eval_set), size):
            chunk = self.eval_set[first:first + size]
            padded = chunk + [chunk[0]] * (size - len(chunk))  # padding rows do not count (valid=False)
            chunk_metrics, _ = self.walk(self.order, self._store(padded, 1, len(chunk)), size, self.interfaces,
                                         evaluating=True)
            for name, value in chunk_metrics.items():
                add_metric(metrics, name, *value)
        for role in self.roles.values():
            if role.engine is not None:
                role.engine.train()
        return reduce_metrics(metrics)

    def _evaluate_generation(self) -> dict[str, float]:
        """Greedy completions of the held-out prompts, scored by the run's own reward MFC (its reward
        function or reward model): mean reward, and accuracy when every score is 0 or 1."""
        generate = next(m for m in self.order if m.kind is MFCKind.GENERATE)
        reward = next(m for m in self.order if m.output_keys == ("score",))
        prompts = self.eval_set[:self.cfg.rollout.eval_prompts or len(self.eval_set)]
        multiple = math.lcm(*(len(self.allocations[m.name].dp_groups) for m in (generate, reward)))
        rows = -(-len(prompts) // multiple) * multiple
        padded = prompts + [prompts[0]] * (rows - len(prompts))
        greedy = GenerateInterface(GenerationConfig(max_new_tokens=self.cfg.rollout.eval_max_new_tokens, greedy=True),
                                   self.context.eos_ids, self.context.pad_id)
        store = self._store(padded, 1, len(prompts))
        self.walk([generate, reward], store, rows, {generate.name: greedy, reward.name: self.interfaces[reward.name]})
        metrics: Metrics = {}
        split = self.allocations[reward.name].split(rows)
        if self.rank in self.allocations[reward.name].mesh and split.groups[split.group_of(self.rank)][0] == self.rank:
            mine = [r for r in split.rows_of(self.rank) if store["valid"][r]]
            scores = [float(store["score"][r]) for r in mine]
            add_metric(metrics, "eval/reward", sum(scores), float(len(mine)))
            add_metric(metrics, "eval/non_binary", float(sum(s not in (0.0, 1.0) for s in scores)), None)
            add_metric(metrics, "eval/response_length", float(sum(len(store["completion"][r]) for r in mine)),
                       float(len(mine)))
        values = reduce_metrics(metrics)
        if values.pop("eval/non_binary", 1.0) == 0:  # 0/1 rewards (a verifier): the mean is an accuracy
            values["eval/accuracy"] = values["eval/reward"]
        return values

    # -- checkpoints ---------------------------------------------------------------------------------

    def save_training_state(self, train_s: float) -> None:
        """Each trained role's DeepSpeed checkpoint under tag step<N>, then the run's own state
        (checkpoints/step<N>.json) and `checkpoints/latest`, which names the tag --resume loads."""
        tag = f"step{self.step}"
        self.doing = f"saving the checkpoint of step {self.step}"
        states = {name: i.state_dict() for name, i in self.interfaces.items() if hasattr(i, "state_dict")}
        for name, role in self.roles.items():
            if role.engine is not None:
                save_training_state(role.engine, self.out / "checkpoints" / name, tag, {"interfaces": states})
        if self._reference_moves():  # the EMA reference is state too: this rank's partitions of it
            ref = self.roles["ref"]
            if ref.hybrid.module is not None:
                folder = self.out / "checkpoints" / "ref" / tag
                folder.mkdir(parents=True, exist_ok=True)
                torch.save({n: t.cpu() for n, t in ref.hybrid.sources().items()}, folder / f"rank{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            state = {"step": self.step, "eval_before": self.eval_before, "train_s": train_s,
                     "versions": {name: role.version for name, role in self.roles.items()}}
            (self.out / "checkpoints" / f"{tag}.json").write_text(json.dumps(state))
            (self.out / "checkpoints" / "latest").write_text(tag)
        dist.barrier()

    def resume(self) -> None:
        latest = self.out / "checkpoints" / "latest"
        if not latest.is_file():
            raise UserError(f"--resume: {latest} does not exist; is {self.out} a run folder with a checkpoint?")
        tag = latest.read_text().strip()
        state = json.loads((self.out / "checkpoints" / f"{tag}.json").read_text())
        if self._reference_moves() and self.roles["ref"].hybrid.module is not None:
            saved = torch.load(self.out / "checkpoints" / "ref" / tag / f"rank{self.rank}.pt")
            for name, tensor in self.roles["ref"].hybrid.sources().items():
                tensor.copy_(saved[name])
        for name, role in self.roles.items():
            role.version = state["versions"][name]
            if role.engine is not None:
                client_state = load_training_state(role.engine, self.out / "checkpoints" / name, tag)
                for mfc_name, interface_state in client_state.get("interfaces", {}).items():
                    interface = self.interfaces.get(mfc_name)
                    if interface is not None and hasattr(interface, "load_state_dict"):
                        interface.load_state_dict(interface_state)
        self.step, self.eval_before, self.train_before_s = state["step"], state["eval_before"], state["train_s"]
        self.writer.truncate_after(self.step)
        logger.info("resumed %s at step %d from %s", self.experiment.command, self.step, self.out / "checkpoints")

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train (or resume), evaluate and save; a dead or hung peer rank stops this rank with an
        error naming the call it happened in, instead of a hang or a transport traceback."""
        try:
            return self._run()
        except Exception as error:
            if isinstance(error, UserError) or not is_peer_failure(error):
                raise
            checkpoint = self.out / "checkpoints" / "latest"
            resume = (f"--resume continues from {checkpoint.read_text().strip()}" if checkpoint.is_file() else
                      "no checkpoint was written yet (train.save_every)")
            raise PeerLost(f"rank {self.rank} lost contact with another rank during {self.doing}: a rank died or "
                           f"stopped answering, so this one stops too; {resume}. "
                           f"({str(error).splitlines()[0][:300]})") from None

    def _run(self) -> dict:
        if self.cfg.output.resume:
            self.resume()
        elif self.eval_set:
            self.eval_before = self.evaluate()
            self.writer.log(0, self.eval_before)
            logger.info("eval before training: %s", _fmt(self.eval_before))
        table = StepTable(self.experiment.table, self.rank == 0)
        eval_after = dict(self.eval_before)
        every_eval, every_save = self.cfg.train.eval_every, self.cfg.train.save_every
        train_s = self.train_before_s
        while self.step < self.total_steps:
            step_start = time.perf_counter()
            values = self.train_step()
            train_s += time.perf_counter() - step_start
            self.step += 1
            last = self.step == self.total_steps
            if (every_eval and self.step % every_eval == 0) or last:
                eval_after = self.evaluate()
                values.update(eval_after)
            self.writer.log(self.step, values)
            table.row(self.step, self.total_steps, values)
            if (every_save and self.step % every_save == 0) or last:
                self.save_training_state(train_s)
        if self.cfg.output.save_hf:
            for name, role in self.roles.items():
                if role.engine is not None:
                    save_hf_model(role.engine.module, self.tokenizer, self.out / "hf" / name,
                                  writer=role.mesh.ranks[0], group=role.group)
            dist.barrier()
        summary = {
            "command": self.experiment.command,
            "steps": self.step,
            "eval_before": self.eval_before,
            "eval_after": eval_after,
            "wall_s": time.time() - command_start_time(),  # the whole command: start-up, evaluations, saving
            "train_s": train_s,
            "allocations": {a.mfc.name: _placement(a, self.cfg) for a in self.allocations.values()},
            "mean_time_per_mfc_s": {name: sum(t) / len(t) for name, t in self.mfc_seconds.items()},
        }
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
            logger.info("eval after training: %s", _fmt(eval_after))
        self.writer.close()
        return summary


class StepTable:
    """One line per step on rank 0: the experiment's headline metrics and the time of every MFC."""

    def __init__(self, columns: tuple[tuple[str, str], ...], enabled: bool):
        self.columns, self.enabled, self.header_done = columns, enabled, False

    def row(self, step: int, total: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        times = sorted(k for k in values if k.startswith("time/") and k != "time/step_s")
        if not self.header_done:
            names = ["step", *(label for label, _ in self.columns), *(t[5:-2] + "_s" for t in times), "step_s"]
            logger.info(" | ".join(f"{n:>12}" for n in names))
            self.header_done = True
        cells = [f"{step}/{total}", *(_cell(values.get(key)) for _, key in self.columns),
                 *(_cell(values[t]) for t in times), _cell(values["time/step_s"])]
        logger.info(" | ".join(f"{c:>12}" for c in cells))


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))


def _load_split(experiment: Experiment, cfg: Any, formatter: ChatFormatter, split: str) -> list:
    spec = cfg.data.train if split == "train" else cfg.data.eval
    if not spec:
        return []
    records = load_records(spec, split, experiment.data_format)
    limit = cfg.data.max_prompt_len if experiment.data_format == "prompts" else cfg.data.max_seq_len
    return tokenize_records(records, experiment.data_format, formatter, limit, cfg.data.skip_bad_samples)


def _prepare_run_dir(out: Path, resume: bool, rank: int) -> None:
    """A fresh run replaces the outputs of an earlier run in the same folder; a resumed one appends."""
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            for name in _FRESH_RUN_OUTPUTS:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
    dist.barrier()


def _mesh_group(allocation: Allocation):
    """The process group of an MFC's mesh on its ranks (None elsewhere): for MFCs that run no model."""
    ranks = allocation.mesh.ranks
    return group_of(ranks) if dist.get_rank() in ranks else None


def _eos_ids(tokenizer, roles: dict[str, Role]) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id}
    for role in roles.values():
        eos = getattr(role.hf_config, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return tuple(sorted(i for i in ids if i is not None))


def check_training_rows(cfg: Any, allocations: dict[str, Allocation], rows: int, minibatches: int) -> None:
    """Every training rank's rows split into whole minibatches of whole micro-batches."""
    for allocation in allocations.values():
        if allocation.mfc.kind is not MFCKind.TRAIN:
            continue
        per_rank = rows // allocation.mesh.size
        per_minibatch = per_rank // minibatches
        micro = min(cfg.train.micro_batch_size, max(per_minibatch, 1))
        if per_rank % minibatches or per_minibatch % micro:
            split = f" x {minibatches} algo.minibatches" if minibatches > 1 else ""
            sequences = f" ({rows} sequences)" if rows != cfg.train.batch_size else ""
            raise ConfigError(f"allocations.{allocation.mfc.name}: train.batch_size={cfg.train.batch_size}"
                              f"{sequences} is not divisible by train.micro_batch_size="
                              f"{cfg.train.micro_batch_size} x {allocation.mesh.size} data-parallel ranks{split}")


def _placement(allocation: Allocation, cfg: Any) -> str:
    """`strategy@[mesh]`; training shows its ZeRO stage."""
    strategy = allocation.strategy
    label = f"zero{cfg.engine.zero_stage if cfg else 3}:d{allocation.mesh.size}" if allocation.mfc.kind.on_engine \
        else f"d{strategy.dp}t{strategy.tp}"
    return f"{label}@[{allocation.mesh}]"


def plan_run(experiment: Experiment, cfg: Any, world: int) -> tuple[dict[str, Path], dict[str, Allocation], int]:
    """Each role's model folder, the allocation of every MFC (in topological order) and the rows per
    step, validated before any process starts work."""
    specs = experiment.roles(cfg)
    paths = {spec.role: resolve_model_path(spec.path, spec.path_field) for spec in specs}
    models = {s.role: model_spec(AutoConfig.from_pretrained(paths[s.role]), value_head=s.head == "value")
              for s in specs}
    per_prompt = experiment.samples_per_prompt(cfg)
    rows = cfg.train.batch_size * per_prompt
    allocations = resolve_allocations(topological_order(experiment.mfcs(cfg)), world, cfg.allocation,
                                      cfg.allocations, models, rows, per_prompt if experiment.group_train_rows else 1,
                                      slots_per_host(world, cfg.launch.hostfile))
    minibatches = experiment.optimizer_steps_per_step(cfg) // getattr(getattr(cfg, "algo", None), "epochs", 1)
    check_training_rows(cfg, allocations, rows, minibatches)
    if cfg.engine.inference == "zero3":
        check_engine_inference(allocations, {s.role for s in specs})
    return paths, allocations, rows


def check_engine_inference(allocations: dict[str, Allocation], roles: set[str]) -> None:
    """engine.inference=zero3 runs each generate / inference call on its model's engine: one replica per
    rank on the mesh the model trains on (or, frozen, its first call's)."""
    meshes: dict[str, Allocation] = {}
    for allocation in allocations.values():
        mfc = allocation.mfc
        if mfc.role in roles and (mfc.kind is MFCKind.TRAIN or mfc.role not in meshes):
            meshes[mfc.role] = allocation
    for allocation in allocations.values():
        mfc = allocation.mfc
        if mfc.role not in roles or mfc.kind.on_engine:
            continue
        home = meshes[mfc.role].mesh
        if allocation.mesh != home or allocation.strategy.tp != 1:
            raise ConfigError(f"allocations.{mfc.name}: engine.inference=zero3 runs {mfc.name} on the {mfc.role} "
                              f"engine itself, so it needs that engine's mesh [{home}] with d{home.size}; got "
                              f"{_placement(allocation, None)}")


def run_experiment(experiment: Experiment, cfg: Any) -> dict:
    """Run an experiment on this rank (all ranks call this with the same config)."""
    rank, world = init_distributed(cfg.launch.dist_timeout_s)
    out = run_dir(experiment, cfg)
    setup_logging(rank, out / "logs")
    _prepare_run_dir(out, cfg.output.resume, rank)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    torch.manual_seed(cfg.train.seed)
    paths, allocations, rows = plan_run(experiment, cfg, world)
    specs = experiment.roles(cfg)
    order = [allocation.mfc for allocation in allocations.values()]  # topological
    steps_per_step = experiment.optimizer_steps_per_step(cfg)
    tokenizer = AutoTokenizer.from_pretrained(paths[specs[0].role])
    formatter = ChatFormatter(tokenizer, cfg.data.chat_template)
    train_set = _load_split(experiment, cfg, formatter, "train")
    eval_set = _load_split(experiment, cfg, formatter, "eval")
    sampler = StepSampler(len(train_set), cfg.train.batch_size, cfg.train.seed)
    total_steps = cfg.train.max_steps or cfg.train.epochs * sampler.steps_per_epoch
    logger.info("%s: %d training samples, %d eval samples, %d steps of %d rows on %d ranks; %s", experiment.command,
                len(train_set), len(eval_set), total_steps, rows, world,
                "; ".join(f"{a.mfc.name} {_placement(a, cfg)}" for a in allocations.values()))
    roles = build_roles(specs, paths, order, allocations, cfg, rows, total_steps * steps_per_step,
                        tokenizer.pad_token_id)
    context = InterfaceContext(tokenizer, tokenizer.pad_token_id, _eos_ids(tokenizer, roles),
                               {m.name: roles[m.role].group if m.role in roles else _mesh_group(allocations[m.name])
                                for m in order})
    run = Run(experiment, cfg, rank, out, tokenizer, context, train_set, eval_set, sampler, total_steps, rows, roles,
              allocations, experiment.interfaces(cfg, context), order, MetricsWriter(out, rank == 0))
    return run.run()
