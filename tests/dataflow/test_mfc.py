import pytest

from ds_realloc.dataflow.catalog import builtin_experiments
from ds_realloc.dataflow.mfc import MFC, MFCKind, dataset_keys, topological_order
from ds_realloc.utils.errors import ConfigError

T, I, G = MFCKind.TRAIN, MFCKind.INFERENCE, MFCKind.GENERATE


def test_order_follows_keys_not_listing_order():
    mfcs = [MFC("actor_train", "actor", T, ("seq", "ref", "rew")), MFC("rew_inf", "reward", I, ("seq",), ("rew",)),
            MFC("ref_inf", "ref", I, ("seq",), ("ref",)), MFC("actor_gen", "actor", G, ("prompt",), ("seq",))]
    assert [m.name for m in topological_order(mfcs)] == ["actor_gen", "rew_inf", "ref_inf", "actor_train"]
    assert dataset_keys(mfcs) == {"prompt"}


def test_graph_errors_name_the_mfcs():
    with pytest.raises(ConfigError, match="cycle among: a, b"):
        topological_order([MFC("a", "x", I, ("kb",), ("ka",)), MFC("b", "y", I, ("ka",), ("kb",))])
    with pytest.raises(ConfigError, match="MFCs 'a' and 'b' both write key 'k'"):
        topological_order([MFC("a", "x", I, (), ("k",)), MFC("b", "y", I, (), ("k",))])
    with pytest.raises(ConfigError, match="MFCs 'a' and 'b' both train role 'x'"):
        topological_order([MFC("a", "x", T, ()), MFC("b", "x", T, ())])


def test_builtin_experiments_are_valid_graphs():
    for experiment in builtin_experiments().values():
        order = topological_order(experiment.mfcs(experiment.config_cls()))
        assert dataset_keys(order) == {experiment.sample_key}
        assert order[-1].kind is MFCKind.TRAIN
