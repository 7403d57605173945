"""What `ds-realloc profile` measures: its command-line settings."""

from __future__ import annotations

from dataclasses import dataclass

from ds_realloc.utils.config import invalid, option


@dataclass
class ProfileConfig:
    ranks: int = option(2, "ranks per host the profile is for (each gets cores / ranks threads)")
    out: str = option("", "where to write the profile JSON ('' = print it)")
    name: str = option("this-machine", "the profile's name")
    repeats: int = option(3, "timed repetitions per measurement (the median counts for a model's calls, the "
                                      "fastest for the device's peak rates)")
    model: str = option("", "also time this model's calls (a folder or preset, as model.path); the planner then "
                            "uses those times for models of its shape ('' = none)")
    dtype: str = option("auto", "dtype of the timed calls: auto (the runs' engine.dtype=auto), bf16 or fp32")
    rows: list[int] = option([1, 4, 16], "the row counts per rank the calls are timed at (at least two); a "
                                         "call's time is interpolated between them")
    prompt_len: int = option(64, "prompt tokens of the timed sequences")
    new_tokens: int = option(16, "generated tokens of the timed sequences (at least 3)")
    stages: list[int] = option([1, 2, 3], "ZeRO stages whose engines are timed (an untimed stage 1 or 2 takes the "
                                          "other's times)")

    def validate(self) -> None:
        if self.ranks < 1:
            raise invalid("ranks", "must be at least 1")
        if self.repeats < 1:
            raise invalid("repeats", "must be at least 1")
        if len(self.rows) < 2 or len(set(self.rows)) != len(self.rows) or min(self.rows) < 1:
            raise invalid("rows", f"must be at least two different positive row counts, got {self.rows}")
        if self.new_tokens < 3:
            raise invalid("new_tokens", "must be at least 3 (a decode step is timed as a difference of lengths)")
        if not self.stages or any(s not in (0, 1, 2, 3) for s in self.stages):
            raise invalid("stages", f"must be ZeRO stages 0-3, got {self.stages}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise invalid("dtype", f"must be auto, bf16 or fp32, got {self.dtype}")
