"""Timelines as pictures: one lane per rank, one box per operation (an MFC's call, its reallocation,
a batch move), as SVG: the view of a step users would rather look at than read.

The same drawing serves the simulator's prediction (`simulate.Timeline`) and a real run's measured
spans, side by side when both are given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Sequence

from ds_realloc.dataflow.spans import read_timeline, timeline_dir
from ds_realloc.planner.simulate import CALL, MOVE, REALLOC, Span
from ds_realloc.utils.config import option
from ds_realloc.utils.errors import UserError

LANE = 22  # pixels per rank
WIDTH = 900  # pixels for the longest timeline
LEFT = 70  # room for the lane labels
_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")


def _color(mfc: str, names: list[str], kind: str) -> str:
    if kind == MOVE:
        return "#bab0ac"
    base = _PALETTE[names.index(mfc) % len(_PALETTE)]
    return base if kind == CALL else base + "88"  # a reallocation: the call's colour, translucent


def _panel(spans: Sequence[Span], world: int, title: str, top: int, scale: float, names: list[str]) -> list[str]:
    out = [f'<text x="4" y="{top - 6}" font-weight="bold">{escape(title)}</text>']
    for rank in range(world):
        y = top + rank * LANE
        out.append(f'<text x="4" y="{y + 15}">rank {rank}</text>')
        out.append(f'<line x1="{LEFT}" y1="{y + LANE - 1}" x2="{LEFT + WIDTH}" y2="{y + LANE - 1}" stroke="#eee"/>')
    for s in spans:
        x, w = LEFT + s.start * scale, max(1.0, (s.end - s.start) * scale)
        y = top + s.rank * LANE + 2
        label = s.name if w > 7 * len(s.name) else ""
        out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{LANE - 5}" '
                   f'fill="{_color(s.mfc, names, s.kind)}"><title>{escape(s.name)} on rank {s.rank}: '
                   f'{s.start:.3f}-{s.end:.3f} s</title></rect>')
        if label:
            out.append(f'<text x="{x + 3:.1f}" y="{y + 13}" font-size="11" fill="white">{escape(label)}</text>')
    return out


def timeline_svg(panels: Sequence[tuple[str, Sequence[Span]]], world: int) -> str:
    """An SVG of one or more timelines (title, spans) over the same ranks and time scale."""
    end = max((s.end for _, spans in panels for s in spans), default=0.0) or 1.0
    scale = WIDTH / end
    names: list[str] = []
    for _, spans in panels:
        for s in spans:
            if s.mfc not in names:
                names.append(s.mfc)
    body, top = [], 24
    for title, spans in panels:
        body += _panel(spans, world, f"{title} ({max((s.end for s in spans), default=0.0):.3f} s)", top, scale, names)
        top += world * LANE + 34
    ticks = [f'<text x="{LEFT + WIDTH * f:.0f}" y="{top - 14}" font-size="10">{end * f:.2f} s</text>'
             for f in (0, 0.25, 0.5, 0.75, 1.0)]
    legend = [f'<text x="{LEFT + 120 * i}" y="{top + 6}" font-size="11" fill="{_color(n, names, CALL)}">{escape(n)}'
              f'</text>' for i, n in enumerate(names[:7])]
    legend.append(f'<text x="{LEFT}" y="{top + 22}" font-size="10">translucent: {REALLOC}; grey: {MOVE}</text>')
    height = top + 30
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{LEFT + WIDTH + 60}" height="{height}" '
            f'font-family="sans-serif" font-size="12">' + "".join(body + ticks + legend) + "</svg>\n")


def measured_spans(run_dir: Path, step: int = 0) -> tuple[int, list[Span], int]:
    """(step, spans, world) of a run's measured timeline: step `step` (0 = the last one recorded), its
    times shifted so the step starts at 0 on the earliest rank."""
    steps = read_timeline(run_dir)
    chosen = step or max(steps)
    if chosen not in steps:
        raise ValueError(f"{run_dir}: step {chosen} was not recorded; recorded steps: {min(steps)}-{max(steps)}")
    records = steps[chosen]
    origin = min(r["start"] for r in records)
    spans = [Span(s["mfc"] if s["kind"] == CALL else f"{s['kind']}:{s['mfc']}", s["mfc"], s["kind"], r["rank"],
                  s["start"] - origin, s["end"] - origin) for r in records for s in r["spans"]]
    return chosen, spans, max(r["rank"] for r in records) + 1


@dataclass
class TimelineConfig:
    step: int = option(0, "the step to draw (0 = the last one recorded)")
    out: str = option("", "the SVG file to write ('' = RUN_DIR/timeline.svg)")
    device: str = option("", "with --plan: the device profile to predict with ('' = this machine's, as measured by "
                             "ds-realloc profile and kept in the cache; or h100, h200, a100, a profile JSON)")


def predicted_spans(run_dir: Path, device: str) -> tuple[list[Span], float]:
    """The planner's timeline for the allocation a run used (its own config and world), and its step time."""
    from ds_realloc.dataflow.catalog import find_experiment
    from ds_realloc.planner.auto import machine_profile_path, typical_prompt_len
    from ds_realloc.planner.profile import load_profile
    from ds_realloc.planner.report import PlanConfig, estimate_config
    from ds_realloc.utils.config import load_config

    meta_path = timeline_dir(run_dir) / "run.json"
    if not meta_path.is_file():
        raise UserError(f"{meta_path}: missing; the run that wrote this folder recorded no command")
    meta = json.loads(meta_path.read_text())
    experiment = find_experiment(meta["command"])
    cfg = load_config(experiment.config_cls, run_dir / "config.json", [])
    world = meta["world"]
    path = device or str(machine_profile_path(world))
    if not device and not Path(path).is_file():
        raise UserError(f"--plan: no device profile of this machine at {path}; run 'ds-realloc profile "
                        f"ranks={world} model={cfg.model.path} out={path}' or pass device=h100|h200|a100|FILE")
    pcfg = PlanConfig(world=world, device=path, prompt_len=typical_prompt_len(experiment, cfg, world))
    estimate, _ = estimate_config(experiment, cfg, pcfg, load_profile(path))
    return list(estimate.timeline.spans), estimate.step_s


def draw_run(run_dir: str, cfg: TimelineConfig, with_plan: bool = False) -> str:
    """Write a run's measured timeline (and the prediction) as SVG; returns what was written."""
    folder = Path(run_dir)
    try:
        step, spans, world = measured_spans(folder, cfg.step)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    panels = [(f"measured, step {step}", spans)]
    if with_plan:
        panels.append(("predicted by the planner", predicted_spans(folder, cfg.device)[0]))
    out = Path(cfg.out) if cfg.out else folder / "timeline.svg"
    out.write_text(timeline_svg(panels, world))
    return f"wrote {out}: step {step} on {world} ranks" + (" beside the planner's prediction" if with_plan else "")
