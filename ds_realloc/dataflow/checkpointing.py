"""Resumable checkpoints of a run: each trained role's DeepSpeed checkpoint, the interfaces' state
(an adaptive KL coefficient, running value statistics), a moving reference's partitions, and the
loop's own state, all under one tag `step<N>`; `checkpoints/latest` names the tag `--resume` loads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ds_realloc.dataflow.experiment import Interface
from ds_realloc.dataflow.roles import Role
from ds_realloc.engine.checkpoint import load_training_state, save_training_state
from ds_realloc.utils.errors import UserError


@dataclass
class CheckpointManager:
    folder: Path  # <run>/checkpoints
    rank: int
    roles: dict[str, Role]
    interfaces: dict[str, Interface]
    reference_moves: bool  # ref.ema: the reference's partitions are state too

    def latest(self) -> str | None:
        path = self.folder / "latest"
        return path.read_text().strip() if path.is_file() else None

    def save(self, step: int, loop_state: dict) -> None:
        """Every rank writes its part; rank 0 writes the loop's state and then `latest`."""
        tag = f"step{step}"
        states = {name: state for name, interface in self.interfaces.items() if (state := interface.state_dict())}
        for name, role in self.roles.items():
            if role.engine is not None:
                save_training_state(role.engine, self.folder / name, tag, {"interfaces": states})
        reference = self._reference_sources()
        if reference is not None:
            (self.folder / "ref" / tag).mkdir(parents=True, exist_ok=True)
            torch.save({n: t.cpu() for n, t in reference.items()}, self.folder / "ref" / tag / f"rank{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            state = {**loop_state, "step": step, "versions": {name: role.version for name, role in self.roles.items()}}
            (self.folder / f"{tag}.json").write_text(json.dumps(state))
            (self.folder / "latest").write_text(tag)
        dist.barrier()

    def load(self) -> dict:
        """Restore every part of the latest checkpoint on this rank; returns the loop's state."""
        tag = self.latest()
        if tag is None:
            raise UserError(f"--resume: {self.folder / 'latest'} does not exist; is {self.folder.parent} a run folder "
                            f"with a checkpoint?")
        state = json.loads((self.folder / f"{tag}.json").read_text())
        reference = self._reference_sources()
        if reference is not None:
            saved = torch.load(self.folder / "ref" / tag / f"rank{self.rank}.pt")
            for name, tensor in reference.items():
                tensor.copy_(saved[name])
        for name, role in self.roles.items():
            role.version = state["versions"][name]
            if role.engine is not None:
                client_state = load_training_state(role.engine, self.folder / name, tag)
                for mfc_name, interface_state in client_state.get("interfaces", {}).items():
                    if mfc_name in self.interfaces:
                        self.interfaces[mfc_name].load_state_dict(interface_state)
        return state

    def _reference_sources(self) -> dict[str, torch.Tensor] | None:
        """This rank's partitions of a moving reference (None when it does not move or lives elsewhere)."""
        if not self.reference_moves or self.roles["ref"].hybrid.module is None:
            return None
        return self.roles["ref"].hybrid.sources()
