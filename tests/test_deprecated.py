"""The deprecated aliases that deprecated.py installs: each warns and hands out the object of its new home."""
import pytest

import mergemodules as mm
from mergemodules import deprecated, methods
from mergemodules.methods import awd


def test_with_awd_from_its_old_home_warns_and_is_the_registry_one():
    with pytest.warns(DeprecationWarning, match="mergemodules.methods.awd.with_awd is deprecated: import it from"):
        old = awd.with_awd
    assert old is methods.with_awd and old("ta", alpha=0.5).transform.alpha == 0.5


def test_an_unknown_name_of_an_old_home_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="'mergemodules.methods.awd' has no attribute 'nothing'"):
        awd.nothing  # noqa: B018


def test_installing_twice_changes_nothing():
    deprecated.install()
    with pytest.warns(DeprecationWarning, match="mergemodules.masks.plot_masks is deprecated"):
        assert mm.masks.plot_masks is mm.plotting.plot_masks


def test_task_vector_source_is_now_task_vector_provider():
    for home in (methods, methods.base):
        with pytest.warns(DeprecationWarning, match="TaskVectorSource is deprecated: use TaskVectorProvider"):
            assert home.TaskVectorSource is methods.TaskVectorProvider
    with pytest.raises(AttributeError, match="'mergemodules.methods' has no attribute 'nothing'"):
        methods.nothing  # noqa: B018
