"""Strided runs: how the elements of a parameter map into a rank's flat buffer, and their intersections.

A shard of a parameter is described in the row-major flattening of the full tensor ("full"
coordinates): a dim-0 split is one contiguous span, a dim-1 split is one span per row. A `Run`
is a family of `count` equally spaced spans, so a dim-1 shard of any size is a single Run, and a
`Piece` (a strided copy between two buffers) is what intersecting two Runs yields. Everything here
is O(1) per Run, whatever the number of rows. Runs and Pieces are named tuples: plans for large
clusters hold hundreds of thousands of them.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple


class Run(NamedTuple):
    """Span j (0 <= j < count) holds full elements [full + j*full_stride, + length) at local elements
    [local + j*local_stride, + length)."""

    full: int
    full_stride: int
    local: int
    local_stride: int
    length: int
    count: int = 1

    @staticmethod
    def make(full: int, full_stride: int, local: int, local_stride: int, length: int, count: int) -> "Run":
        """A Run in canonical form: back-to-back spans on both sides merge into one span."""
        if count > 1 and full_stride == length and local_stride == length:
            length, count = length * count, 1
        if count == 1:
            full_stride = local_stride = length
        return Run(full, full_stride, local, local_stride, length, count)

    @property
    def numel(self) -> int:
        return self.length * self.count

    @property
    def full_end(self) -> int:
        """One past the last full element covered."""
        return self.full + (self.count - 1) * self.full_stride + self.length

    def pairs(self) -> Iterator[tuple[int, int]]:
        """(full index, local index) of every element (for tests)."""
        for j in range(self.count):
            for e in range(self.length):
                yield self.full + j * self.full_stride + e, self.local + j * self.local_stride + e


class Piece(NamedTuple):
    """A strided copy: `count` spans of `length` elements from src[src + j*src_stride] to dst[dst + j*dst_stride]."""

    src: int
    src_stride: int
    dst: int
    dst_stride: int
    length: int
    count: int = 1

    @property
    def numel(self) -> int:
        return self.length * self.count


def contiguous(full: int, length: int, local: int = 0) -> Run:
    return Run.make(full, length, local, length, length, 1)


def clip(run: Run, lo: int, hi: int) -> list[Run]:
    """The parts of `run` whose full indices lie in [lo, hi): at most a cut first span, the whole
    spans in between (one Run), and a cut last span."""
    if hi <= lo or run.numel == 0:
        return []
    L, S = run.length, run.full_stride
    j_min = max(0, (lo - L - run.full) // S + 1)
    j_max = min(run.count - 1, -(-(hi - run.full) // S) - 1)
    if j_min > j_max:
        return []

    def span(j: int) -> Run:
        """Span j cut to [lo, hi) (it is known to intersect)."""
        start = max(run.full + j * S, lo)
        end = min(run.full + j * S + L, hi)
        local = run.local + j * run.local_stride + start - run.full - j * S
        return Run.make(start, end - start, local, end - start, end - start, 1)

    if j_min == j_max:
        return [span(j_min)]
    head_cut = run.full + j_min * S < lo
    tail_cut = run.full + j_max * S + L > hi
    first, last = j_min + head_cut, j_max - tail_cut
    out = [span(j_min)] if head_cut else []
    if first <= last:
        out.append(Run.make(run.full + first * S, S, run.local + first * run.local_stride, run.local_stride, L,
                            last - first + 1))
    if tail_cut:
        out.append(span(j_max))
    return out


def _spans(run: Run) -> list[Run]:
    return [Run.make(run.full + j * run.full_stride, run.length, run.local + j * run.local_stride, run.length,
                     run.length, 1) for j in range(run.count)]


def intersect(src: Run, dst: Run) -> list[Piece]:
    """Copies moving the elements both Runs cover from the src buffer to the dst buffer."""
    if src.count == 1 and dst.count == 1:  # the common case (ZeRO-3 partitions, dim-0 shards)
        start, end = max(src.full, dst.full), min(src.full + src.length, dst.full + dst.length)
        if end <= start:
            return []
        return [Piece(src.local + start - src.full, end - start, dst.local + start - dst.full, end - start, end - start)]
    if src.count == 1:
        return [Piece(src.local + r.full - src.full, r.full_stride, r.local, r.local_stride, r.length, r.count)
                for r in clip(dst, src.full, src.full + src.length)]
    if dst.count == 1:
        return [Piece(r.local, r.local_stride, dst.local + r.full - dst.full, r.full_stride, r.length, r.count)
                for r in clip(src, dst.full, dst.full + dst.length)]
    if src.full_stride != dst.full_stride or max(src.length, dst.length) > src.full_stride:
        few, many = (src, dst) if src.count <= dst.count else (dst, src)
        pieces = []
        for span in _spans(few):
            pieces += intersect(span, many) if few is src else intersect(many, span)
        return pieces
    # Same stride S, spans shorter than S: span i of src meets span j = i + k of dst for at most two shifts k.
    S = src.full_stride
    d = dst.full - src.full
    pieces = []
    for k in (-(d // S) - 1, -(d // S), -(d // S) + 1):
        offset = d + k * S  # where dst span i+k starts, relative to src span i
        start, end = max(0, offset), min(src.length, offset + dst.length)
        i_lo, i_hi = max(0, -k), min(src.count, dst.count - k)
        if start >= end or i_lo >= i_hi:
            continue
        pieces.append(Piece(src.local + i_lo * src.local_stride + start, src.local_stride,
                            dst.local + (i_lo + k) * dst.local_stride + start - offset, dst.local_stride,
                            end - start, i_hi - i_lo))
    return pieces


def overlap(run: Run, lo: int, hi: int) -> int:
    """How many elements of `run` have full indices in [lo, hi)."""
    return sum(r.numel for r in clip(run, lo, hi))
