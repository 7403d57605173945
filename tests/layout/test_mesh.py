import pytest
from hypothesis import given, strategies as st

from ds_realloc.layout.mesh import DeviceMesh, Strategy, parse_mesh, parse_strategy
from ds_realloc.utils.errors import ConfigError


def test_mesh_strings():
    assert parse_mesh("0-7").ranks == tuple(range(8))
    assert parse_mesh("0,2,4,6").ranks == (0, 2, 4, 6)
    assert parse_mesh("0-1, 6-7").ranks == (0, 1, 6, 7)
    assert parse_mesh("node1:0-3", slots_per_host=[8, 8]).ranks == (8, 9, 10, 11)
    assert parse_mesh("worker-0:2,3", slots_per_host=[4]).ranks == (2, 3)
    assert parse_mesh("node0:0,2@node1:1", slots_per_host=[4, 4]).ranks == (0, 2, 5)
    for bad, message in [("3-1", "ends before it starts"), ("a", "cannot read"), ("0,0", "twice"),
                         ("node2:0", "host 2 .* does not exist")]:
        with pytest.raises(ConfigError, match=message):
            parse_mesh(bad, slots_per_host=[4, 4])
    with pytest.raises(ConfigError, match="slot 4 of host 0 does not exist"):
        parse_mesh("node0:3-4", slots_per_host=[4])


@given(st.lists(st.integers(0, 64), min_size=1, max_size=20, unique=True))
def test_mesh_prints_as_it_parses(ranks):
    mesh = DeviceMesh(tuple(ranks))
    assert parse_mesh(str(mesh)) == mesh


def test_strategy_strings_and_coordinates():
    assert parse_strategy("d2t4", 8) == Strategy(dp=2, tp=4) == parse_strategy("t4d2") == parse_strategy("m4d2p1")
    assert parse_strategy("zero3", 8) == Strategy(dp=8, zero3=True) == parse_strategy("zero3:d8", 8)
    assert parse_strategy("zero3:d4", 8).dp == 4  # two replicas of a 4-way partition
    s = Strategy(dp=2, tp=2, pp=2)
    # tp innermost (consecutive ranks), pp outermost
    assert [s.coords(i) for i in range(8)] == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0),
                                              (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 1)]
    assert all(s.index(*s.coords(i)) == i for i in range(8))
    for bad, message in [("d2x2", "cannot read"), ("t2t2", "twice"), ("d3", "needs 3 ranks"),
                         ("zero3:d3", "does not divide")]:
        with pytest.raises(ConfigError, match=message):
            parse_strategy(bad, 4)
