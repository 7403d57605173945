"""An algorithm defined outside the package runs like a built-in one: `ds-realloc module:NAME`."""

from tests.cli.helpers import TINY_RUN, metrics, run_cli, summary, write_jsonl

TOY_ALGORITHM = '''
"""A toy algorithm: sequence-mean negative log-likelihood of the answers (SFT weighs tokens, this weighs rows)."""
from dataclasses import dataclass

import torch

from ds_realloc.algorithms.functional import token_logprobs
from ds_realloc.algorithms.interface import TrainInterface, add_metric, to_device, train_micro_batches
from ds_realloc.data.datasets import pad_sequences
from ds_realloc.dataflow.config import RunConfig
from ds_realloc.dataflow.experiment import Experiment, RoleSpec
from ds_realloc.dataflow.mfc import MFC, MFCKind


@dataclass(frozen=True)
class SequenceMeanNLL(TrainInterface):
    micro_batch_size: int
    pad_id: int

    def _losses(self, model, seqs):
        t = to_device(pad_sequences(seqs, self.pad_id), model.device)
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        mask = t["loss_mask"][:, 1:]
        return -(token_logprobs(logits, t["input_ids"]) * mask).sum(-1) / mask.sum(-1), t

    def train_step(self, engine, batch):
        def loss_of(rows, metrics):
            losses, t = self._losses(engine, batch["seq"][rows])
            add_metric(metrics, "row_nll", float(losses.detach().sum()), float(len(losses)))
            return losses.sum(), float(t["attention_mask"].sum())

        return train_micro_batches(engine, len(batch["seq"]), self.micro_batch_size, loss_of,
                                   lambda rows: rows.stop - rows.start)

    @torch.no_grad()
    def evaluate(self, model, batch):
        losses, _ = self._losses(model, batch["seq"])
        valid = torch.tensor(batch["valid"], dtype=losses.dtype)
        return {"row_nll": (float((losses.cpu() * valid).sum()), float(valid.sum()))}


TOY = Experiment(
    command="toy", summary="sequence-mean NLL (a toy algorithm outside ds_realloc)", config_cls=RunConfig,
    data_format="sft", sample_key="seq",
    mfcs=lambda cfg: (MFC("actor_train", "actor", MFCKind.TRAIN, ("seq",)),),
    roles=lambda cfg: [RoleSpec("actor", cfg.model.path, "model.path", "lm", trainable=True)],
    interfaces=lambda cfg, ctx: {"actor_train": SequenceMeanNLL(cfg.train.micro_batch_size, ctx.pad_id)},
    table=(("row_nll", "actor/row_nll"),))
'''


def test_an_algorithm_outside_the_package_runs_from_the_command_line(tmp_path):
    (tmp_path / "toy_algorithm.py").write_text(TOY_ALGORITHM)
    rows = [{"prompt": f"What is {a} + {b}?", "answer": f"{a + b}"} for a in range(4) for b in range(4)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "run"
    result = run_cli(["toy_algorithm:TOY", *TINY_RUN, f"data.train={data}", "data.eval=", "train.max_steps=2",
                      "optim.lr=1e-3", "output.save_hf=false", f"output.dir={out}"], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    steps = {row["step"]: row for row in metrics(out)}
    assert sorted(steps) == [1, 2]
    assert all(steps[s]["actor/row_nll"] > 0 and steps[s]["actor/grad_norm"] > 0 for s in (1, 2))
    assert steps[2]["actor/row_nll"] < steps[1]["actor/row_nll"]  # it trains
    assert summary(out)["command"] == "toy" and summary(out)["steps"] == 2


def test_a_module_that_is_not_an_experiment_is_named():
    from tests.cli.helpers import run_main

    result = run_main(["tests.cli.test_plugin:TOY_ALGORITHM"])
    assert result.returncode == 2
    assert "tests.cli.test_plugin.TOY_ALGORITHM is not a ds_realloc.dataflow.experiment.Experiment (got str)" in \
        result.stderr
    missing = run_main(["no_such_module_here:TOY"])
    assert missing.returncode == 2 and "cannot import module 'no_such_module_here'" in missing.stderr
