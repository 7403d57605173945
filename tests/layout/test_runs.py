from hypothesis import given, settings, strategies as st

from ds_realloc.layout.runs import Run, clip, intersect, overlap


@st.composite
def runs(draw, max_full=400):
    length = draw(st.integers(1, 12))
    count = draw(st.integers(1, 12))
    full_stride = draw(st.integers(length, 3 * length + 5))
    local_stride = draw(st.integers(length, 2 * length + 3))
    full = draw(st.integers(0, 40))
    local = draw(st.integers(0, 20))
    return Run.make(full, full_stride, local, local_stride, length, count)


def _elements(run: Run) -> dict[int, int]:
    return dict(run.pairs())


@settings(max_examples=300)
@given(runs(), st.integers(0, 300), st.integers(0, 300))
def test_clip_keeps_exactly_the_elements_in_range(run, lo, hi):
    expected = {f: l for f, l in run.pairs() if lo <= f < hi}
    got = {}
    for part in clip(run, lo, hi):
        for f, l in part.pairs():
            assert f not in got
            got[f] = l
    assert got == expected and overlap(run, lo, hi) == len(expected)
    assert len(clip(run, lo, hi)) <= 3


@settings(max_examples=400)
@given(runs(), runs())
def test_intersect_copies_every_shared_element_once_to_the_right_place(src, dst):
    src_at, dst_at = _elements(src), _elements(dst)
    expected = {dst_at[f]: src_at[f] for f in src_at.keys() & dst_at.keys()}  # dst local -> src local
    got = {}
    for piece in intersect(src, dst):
        for j in range(piece.count):
            for e in range(piece.length):
                d = piece.dst + j * piece.dst_stride + e
                assert d not in got
                got[d] = piece.src + j * piece.src_stride + e
    assert got == expected


def test_dim1_shards_of_many_rows_stay_one_piece():
    rows, cols, tp = 8192, 8192, 8
    zero_partition = Run.make(0, 1, 0, 1, rows * cols // 128, 1)  # rank 0 of zero3:d128: 64 rows
    shard = Run.make(cols // tp, cols, 0, cols // tp, cols // tp, rows)  # tp rank 1 of a row-parallel weight
    [piece] = intersect(zero_partition, shard)
    assert (piece.count, piece.length, piece.src, piece.src_stride, piece.dst) == (64, 1024, 1024, 8192, 0)
