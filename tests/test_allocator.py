"""qft.allocator: glibc's thresholds fixed once per process, the user's own settings win."""

import ctypes
import platform

import pytest

import qft.allocator as allocator

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize("name", allocator.USER_SETTINGS)
def test_user_settings_win(monkeypatch, name):
    monkeypatch.setattr(allocator, "_tuned", None)
    assert allocator.tune_allocator({name: "1"}) is False
    assert allocator._tuned is None  # nothing attempted


@pytest.mark.skipif(not glibc, reason="glibc only")
def test_tunes_once_on_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_tuned", None)
    calls = []
    real = ctypes.CDLL

    class Spy:
        def __init__(self, name):
            self._lib = real(name)
            self.gnu_get_libc_version = self._lib.gnu_get_libc_version
            self.mallopt = self

        def __call__(self, param, value):
            calls.append((param, value))
            return self._lib.mallopt(param, value)

    monkeypatch.setattr(allocator.ctypes, "CDLL", Spy)
    assert allocator.tune_allocator({}) is True
    assert calls == [(-3, allocator.MMAP_THRESHOLD), (-1, allocator.TRIM_THRESHOLD)]
    assert allocator.tune_allocator({}) is True  # once: no second mallopt
    assert len(calls) == 2


def test_not_glibc_changes_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_tuned", None)

    loads = []

    class NotGlibc:
        def __init__(self, name):
            loads.append(name)

    monkeypatch.setattr(allocator.ctypes, "CDLL", NotGlibc)
    assert allocator.tune_allocator({}) is False
    assert allocator._tuned is False
    assert allocator.tune_allocator({}) is False  # once: the C library is not looked up again
    assert loads == [None]
