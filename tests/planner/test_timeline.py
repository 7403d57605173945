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
