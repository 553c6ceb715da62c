"""qft.settings: the quantizer a method resolves to, and the names it reads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qft.errors import UserError
from qft.settings import DEFAULT_TCQ_STEP, default_lambda, quantizer_identity, resolve_quantizer, target_value


def test_defaults_without_settings():
    choice = resolve_quantizer("tcq8", {})
    assert choice.source == "default"
    assert (choice.quantizer.step, choice.quantizer.lam) == (DEFAULT_TCQ_STEP, default_lambda("tcq8", DEFAULT_TCQ_STEP))


@pytest.mark.parametrize("key", ["lambda_t", "lambda"])  # "lambda": settings written before the names were split
def test_a_recorded_lambda_t_is_read_under_both_names(key):
    settings = {"methods": {"tcq8": {"step": 0.5, key: 0.01}}}
    choice = resolve_quantizer("tcq8", settings)
    assert (choice.source, choice.quantizer.step, choice.quantizer.lam) == ("calibrated", 0.5, 0.01)
    assert resolve_quantizer("tcq8", settings, step_scale=2.0).quantizer.lam == pytest.approx(0.04)  # λ_T ∝ Δ²
    assert resolve_quantizer("tcq8", settings, lambda_t=0.2).quantizer.lam == 0.2  # explicit wins


def test_describe_names_lambda_t():
    assert resolve_quantizer("rdoq", {}).describe()["lambda_t"] == default_lambda("rdoq", 1.0)


def test_target_values():
    assert target_value("auto") == "auto" and target_value(1) == 1.0 and target_value("rd") == "rd"
    for bad in (True, -1, float("nan"), "x"):
        with pytest.raises(ValueError):
            target_value(bad)
    with pytest.raises(ValueError):
        target_value("auto", allow_auto=False)
    with pytest.raises(UserError, match="--target rd"):
        resolve_quantizer("tcq8", {}, target="rd")  # no training λ recorded


def test_importing_the_settings_and_the_options_needs_no_torch():
    code = "import sys, qft.settings, qft.commands._options; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_plain_rows_calibrated_or_explicit():
    """TCQ takes the calibrated plain rows unless given; other methods have none."""
    settings = {"methods": {"tcq8": {"step": 0.63, "lambda_mult": 0.2, "plain_rows": 12}}}
    assert resolve_quantizer("tcq8", settings, target=0).quantizer.plain_rows == 12
    assert resolve_quantizer("tcq8", settings, target=0, plain_rows=0).quantizer.plain_rows == 0
    assert resolve_quantizer("tcq8", {}, target=0).quantizer.plain_rows == 0
    assert resolve_quantizer("usq", settings).quantizer.plain_rows == 0
    assert resolve_quantizer("tcq8", settings, target=0).describe()["plain_rows"] == 12
    with pytest.raises(UserError, match="tcq4 and tcq8"):
        resolve_quantizer("usq", settings, plain_rows=12)
    with pytest.raises(UserError, match="plain_rows must be"):
        resolve_quantizer("tcq8", settings, target=0, plain_rows=40)
    # identities (finetuning cache, report cells) carry plain rows only when set
    assert "plain_rows" not in quantizer_identity(resolve_quantizer("tcq8", {}, target=0).quantizer)
    assert quantizer_identity(resolve_quantizer("tcq8", settings, target=0).quantizer)["plain_rows"] == 12
