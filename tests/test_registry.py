import pytest

from algorithms.selectors import SELECTORS
from estimators import METRICS
from estimators.registry import Registry, RegistryError


def test_lazy_entries_resolve_on_first_use():
    reg = Registry("thing")
    reg.register("path", "pathlib:Path")
    assert reg._entries["path"] == "pathlib:Path"
    from pathlib import Path

    assert reg.get("path") is Path


def test_unknown_name_suggests_close_names():
    with pytest.raises(RegistryError, match=r"unknown metric 'angualr'\. Did you mean 'angular'\?"):
        METRICS.get("angualr")
    with pytest.raises(RegistryError, match="Did you mean 'topk'"):
        SELECTORS.get("top-k")


def test_duplicate_registration_names_both_origins():
    reg = Registry("metric")
    reg.register("x", "a:b", origin="pkg-one")
    with pytest.raises(RegistryError, match="pkg-one.*pkg-two"):
        reg.register("x", "c:d", origin="pkg-two")


def test_wildcards_and_decorator():
    reg = Registry("selector")

    @reg.register("greedy_fast")
    class A:
        pass

    reg.register("greedy_slow", A)
    reg.register("topk", A)
    assert reg.list("greedy_*") == ["greedy_fast", "greedy_slow"]
    assert "topk" in reg and len(reg) == 3


def test_builtin_metrics_declare_orientation():
    for name in METRICS:
        cls = METRICS.get(name)
        assert isinstance(cls.higher_is_important, bool)
        assert cls.name == name
