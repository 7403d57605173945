"""The simulator follows the runner's rule: an operation starts when all its ranks are free."""

from ds_realloc.dataflow.mfc import MFC, MFCKind
from ds_realloc.planner.simulate import CALL, MOVE, REALLOC, Op, play, step_ops, waves

G, I, T = MFCKind.GENERATE, MFCKind.INFERENCE, MFCKind.TRAIN
MFCS = [MFC("gen", "actor", G, ("prompt",), ("completion",)), MFC("ref", "ref", I, ("completion",), ("ref",)),
        MFC("rew", "reward", I, ("completion",), ("score",)),
        MFC("train_a", "actor", T, ("completion", "ref", "score")), MFC("train_c", "critic", T, ("completion", "score"))]


def test_calls_on_disjoint_ranks_overlap_and_shared_ranks_wait():
    timeline = play([Op("a", CALL, (0, 1), 2.0), Op("b", CALL, (2, 3), 5.0), Op("c", CALL, (1, 2), 1.0),
                     Op("d", CALL, (0,), 0.5)], world=4)
    assert timeline.of_mfc("c") == (5.0, 6.0)  # waits for rank 2, busy with b until 5
    assert timeline.of_mfc("d") == (2.0, 2.5)  # rank 0 is free at 2: it does not wait for c
    assert timeline.makespan == 6.0 and timeline.busy == (2.5, 3.0, 6.0, 5.0)


def test_the_step_follows_the_runners_waves():
    assert [[m.name for m in wave] for wave in waves(MFCS)] == [["gen"], ["ref", "rew"], ["train_a", "train_c"]]
    calls = {m.name: Op(m.name, CALL, (0,), 1.0) for m in MFCS}
    reallocs = {"gen": Op("gen", REALLOC, (0, 1), 0.5)}
    moves = {"train_a": [Op("train_a", MOVE, (0, 1), 0.1)], "train_c": [Op("train_c", MOVE, (1,), 0.1)]}
    names = [op.name for op in step_ops(MFCS, calls, reallocs, moves)]
    assert names == ["realloc:gen", "gen", "ref", "rew", "move:train_a", "move:train_c", "train_a", "train_c"]
