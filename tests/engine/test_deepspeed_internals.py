"""The DeepSpeed internals ds_realloc patches or reads are checked, and a change fails with their name."""

import pytest

from ds_realloc.engine import deepspeed_compat
from ds_realloc.engine.deepspeed_compat import DeepSpeedInternalChanged, check_internals


def test_the_installed_deepspeed_has_every_guarded_internal():
    check_internals()


@pytest.mark.parametrize("module_name,attribute", [(m, a) for m, a, _ in deepspeed_compat.GUARDED])
def test_a_removed_internal_fails_with_its_name(monkeypatch, module_name, attribute):
    import importlib

    monkeypatch.delattr(importlib.import_module(module_name), attribute)
    with pytest.raises(DeepSpeedInternalChanged, match=f"DeepSpeed internal {module_name}.{attribute} no longer "
                                                       f"exists; ds_realloc needs it"):
        check_internals()


def test_a_changed_zero3_partition_layout_fails_with_its_name(monkeypatch):
    from deepspeed.runtime.zero.partition_parameters import Init

    monkeypatch.setattr(Init, "_padding_size", lambda self, param: 0)
    with pytest.raises(DeepSpeedInternalChanged, match="Init._padding_size pads differently"):
        check_internals()
