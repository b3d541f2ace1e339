"""Tests of metann.utils.SubDict."""
from __future__ import annotations

import re
from collections.abc import MutableMapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metann.utils import SubDict


def test_view_reads_and_writes_through():
    sup = {"a": 1, "b": 2, "c": 3, "d": 4}
    sub = SubDict(sup, keys=["c", "a"])
    assert isinstance(sub, MutableMapping)
    assert dict(sub) == {"a": 1, "c": 3}
    assert list(sub) == ["a", "c"]  # keep_order: the super dict's order
    assert len(sub) == 2 and "b" not in sub and "a" in sub
    sub["a"] = 10
    assert sup["a"] == 10 and sub["a"] == 10
    sup["c"] = 30
    assert sub["c"] == 30
    with pytest.raises(KeyError):
        sub["b"]  # in the super dict, but not in the view
    assert sub.get("b") is None
    assert repr(sub) == "SubDict({'a': 10, 'c': 30})"


def test_keep_order_false_iterates_in_the_order_of_keys():
    sup = {"a": 1, "b": 2, "c": 3}
    sub = SubDict(sup, keys=["c", "a"], keep_order=False)
    assert list(sub) == ["c", "a"]
    sub["b"] = 20
    assert list(sub) == ["c", "a", "b"]
    assert SubDict(sup, keys=["c", "a"], keep_order=True).keys() == {"a", "c"}


def test_new_keys_are_added_to_both_and_deleted_from_both():
    sup = {"a": 1, "b": 2, "c": 3}
    sub = SubDict(sup, keys=["c"])
    sub["a"] = 5  # present in the super dict: becomes visible, in the super dict's order
    sub["z"] = 26  # new everywhere
    assert list(sub) == ["a", "c", "z"]
    assert sup == {"a": 5, "b": 2, "c": 3, "z": 26}
    del sub["c"]
    assert "c" not in sup and list(sub) == ["a", "z"]
    with pytest.raises(KeyError):
        del sub["b"]  # not visible: the super dict keeps it
    assert sup["b"] == 2
    assert sub.pop("z") == 26 and "z" not in sup
    sub.update({"b": 7})
    assert dict(sub) == {"a": 5, "b": 7}


def test_update_keys_drops_keys_the_super_dict_lost():
    sup = {"a": 1, "b": 2, "c": 3}
    sub = SubDict(sup, keys=["a", "b"])
    del sup["a"]
    assert list(sub) == ["b"] and len(sub) == 1  # lost keys are hidden at once
    sup["a"] = 9  # ... and come back (now last in the super dict) until update_keys forgets them
    assert list(sub) == ["b", "a"] and sub["a"] == 9
    del sup["a"]
    sub.update_keys()
    sup["a"] = 9
    assert list(sub) == ["b"]


def test_unknown_keys_are_refused_with_their_names():
    with pytest.raises(KeyError, match=re.escape("`SubDict` keys ['x', 'y'] are not in the super dict")):
        SubDict({"a": 1}, keys=["y", "a", "x"])


def test_keep_order_follows_the_super_dicts_current_order():
    sup = {"a": 1, "b": 2}
    sub = SubDict(sup, keys=["a", "b"])
    del sup["a"]
    sub["a"] = 5  # re-inserted: now last in the super dict
    assert list(sup) == ["b", "a"]
    assert list(sub) == ["b", "a"]
    assert list(SubDict(sup, keys=["a", "b"], keep_order=False)) == ["a", "b"]


def test_empty_view_and_generator_keys():
    sup = {"a": 1, "b": 2}
    assert dict(SubDict(sup)) == {}
    assert dict(SubDict(sup, keys=(k for k in sup if k != "a"))) == {"b": 2}


_KEYS = st.sampled_from("abcd")  # few keys, so operations collide often


@settings(max_examples=300, deadline=None)
@given(
    initial=st.dictionaries(_KEYS, st.integers(), min_size=1),
    data=st.data(),
    keep_order=st.booleans(),
    ops=st.lists(st.tuples(st.sampled_from(["set", "del", "super_set", "super_del", "update_keys"]), _KEYS, st.integers()), max_size=12),
)
def test_subdict_behaves_like_a_filtered_dict(initial, data, keep_order, ops):
    sup = dict(initial)
    visible = data.draw(st.lists(st.sampled_from(sorted(sup)), unique=True))
    sub = SubDict(sup, keys=visible, keep_order=keep_order)
    order = list(visible)  # model of the visible keys, in `keys` order
    for op, key, value in ops:
        if op == "set":
            sub[key] = value
            if key not in order:
                order.append(key)
        elif op == "del":
            if key in order and key in sup:
                del sub[key]
                order.remove(key)
                assert key not in sup
            else:
                with pytest.raises(KeyError):
                    del sub[key]
        elif op == "super_set":
            sup[key] = value  # a known key becomes visible again, a new one stays hidden
        elif op == "super_del":
            sup.pop(key, None)
        else:
            sub.update_keys()
            order = [k for k in order if k in sup]
        expected = [k for k in order if k in sup]
        if keep_order:
            expected = [k for k in sup if k in expected]
        assert list(sub) == expected
        assert dict(sub) == {k: sup[k] for k in expected}
        assert len(sub) == len(expected)
