"""Timeline pictures and the profile's link fit."""

import xml.etree.ElementTree as ET

import pytest

from ds_realloc.planner.measure import _fit
from ds_realloc.planner.simulate import CALL, MOVE, REALLOC, Op, play
from ds_realloc.planner.timeline import timeline_svg


def test_the_svg_has_a_box_per_rank_and_operation_on_one_time_scale():
    predicted = play([Op("actor_gen", REALLOC, (0, 1), 0.5), Op("actor_gen", CALL, (0, 1), 2.0),
                      Op("actor_train", MOVE, (1,), 0.1), Op("actor_train", CALL, (0,), 1.0)], world=2)
    measured = play([Op("actor_gen", CALL, (0, 1), 3.0)], world=2)
    svg = timeline_svg([("predicted", predicted.spans), ("measured", measured.spans)], world=2)
    root = ET.fromstring(svg)
    rects = root.findall("{http://www.w3.org/2000/svg}rect")
    assert len(rects) == 2 + 2 + 1 + 1 + 2
    titles = [r.find("{http://www.w3.org/2000/svg}title").text for r in rects]
    assert "realloc:actor_gen on rank 1: 0.000-0.500 s" in titles and "actor_gen on rank 0: 0.000-3.000 s" in titles
    widths = {t: float(r.get("width")) for t, r in zip(titles, rects)}
    scale = 900 / 3.5  # the longest timeline (the prediction's 3.5 s) spans the width; both share the scale
    assert widths["actor_gen on rank 0: 0.000-3.000 s"] == pytest.approx(3.0 * scale, abs=0.1)
    assert widths["actor_gen on rank 0: 0.500-2.500 s"] == pytest.approx(2.0 * scale, abs=0.1)
    assert "predicted (3.500 s)" in svg and "measured (3.000 s)" in svg


def test_the_link_fit_recovers_latency_and_bandwidth():
    sizes = [1 << 12, 1 << 16, 1 << 20, 1 << 24]
    link = _fit(sizes, [2e-5 + s / 5e9 for s in sizes])
    assert link.bandwidth == pytest.approx(5e9) and link.latency == pytest.approx(2e-5)


def _recorded_run(folder, world=2):
    """A run folder as the runner leaves it: config.json, timeline/run.json and one file per rank."""
    import json

    from ds_realloc.dataflow.catalog import find_experiment
    from ds_realloc.utils.config import load_config, to_dict

    ppo = find_experiment("ppo")
    cfg = load_config(ppo.config_cls, None, ["model.path=tiny-llama"])
    (folder / "timeline").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(to_dict(cfg)))
    (folder / "timeline" / "run.json").write_text(json.dumps({"command": "ppo", "world": world}))
    for rank in range(world):
        lines = []
        for step in (1, 2):
            base = 10.0 * step
            spans = [{"mfc": "actor_gen", "kind": "realloc", "start": base, "end": base + 0.5},
                     {"mfc": "actor_gen", "kind": "call", "start": base + 0.5, "end": base + 2.0}]
            if rank == 0:
                spans.append({"mfc": "actor_train", "kind": "call", "start": base + 2.0, "end": base + 5.0})
            lines.append(json.dumps({"step": step, "rank": rank, "start": base + 0.01 * rank, "end": base + 5.0,
                                     "zero_unix": 0.0, "memory_start_bytes": 100, "memory_peak_bytes": 300,
                                     "spans": spans}))
        (folder / "timeline" / f"rank{rank}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_a_recorded_run_draws_its_last_step_from_zero(tmp_path):
    from ds_realloc.planner.timeline import measured_spans

    step, spans, world = measured_spans(_recorded_run(tmp_path))
    assert (step, world) == (2, 2)
    assert min(s.start for s in spans) == 0.0
    train = [s for s in spans if s.mfc == "actor_train"]
    assert [(s.rank, s.start, s.end) for s in train] == [(0, 2.0, 5.0)]
    with pytest.raises(ValueError, match="step 7 was not recorded; recorded steps: 1-2"):
        measured_spans(tmp_path, 7)


def test_timeline_command_writes_the_measured_and_predicted_panels(tmp_path, capsys):
    """`ds-realloc timeline RUN_DIR --plan` on a fake profile: both panels, one lane per rank each."""
    import json

    from ds_realloc.cli import main
    from ds_realloc.planner.profile import BUILTIN

    run = _recorded_run(tmp_path / "run")
    profile = tmp_path / "fake.json"
    profile.write_text(json.dumps(dict(BUILTIN["h100"].to_json(), name="fake", gpus_per_node=2)))
    with pytest.raises(SystemExit) as done:
        main(["timeline", str(run), "--plan", f"device={profile}", f"out={tmp_path / 't.svg'}"])
    assert done.value.code == 0 and "step 2 on 2 ranks beside the planner's prediction" in capsys.readouterr().out
    svg = (tmp_path / "t.svg").read_text()
    assert "measured, step 2 (5.000 s)" in svg and "predicted by the planner" in svg
    ET.fromstring(svg)
    with pytest.raises(SystemExit) as done:
        main(["timeline", str(tmp_path / "nothing")])
    assert done.value.code != 0 and "no timeline files" in capsys.readouterr().err
