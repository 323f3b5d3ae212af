"""What ``ipl fit-lens`` says about the lens it fitted (no model: the fit's record is given)."""

import warnings

import pytest

from internal_policy_lens.commands import lens as commands
from internal_policy_lens.config import FitLensConfig


def _fitted(monkeypatch, norm: list[float], tuned: list[float]) -> None:
    """Make the fit return a lens.json record with these held-out KLs per translator."""
    evaluation = [
        {"layer": i, "site": "resid_post", "lens": lens, "kl_final_internal": kl}
        for lens, kls in (("norm", norm), ("tuned", tuned))
        for i, kl in enumerate(kls)
    ]
    meta = {
        "heldout": {"evaluation": evaluation},
        "translators": [f"resid_post.{i}" for i in range(len(norm))],
        "fit_seconds": 1.0,
    }
    monkeypatch.setattr(commands, "run_fit_lens", lambda cfg, progress: meta)


def test_a_tuned_lens_worse_than_the_norm_lens_is_warned_about(monkeypatch, tmp_path):
    _fitted(monkeypatch, norm=[2.0, 1.0, 0.0], tuned=[1.0, 4.0, 0.5])
    with pytest.warns(UserWarning, match=r"mean KL 1\.8333 > 1\.0000 nats; worse at 2 of 3") as w:
        text = commands.fit(FitLensConfig(out=str(tmp_path)), progress=False)
    assert "lower --lr" in str(w[0].message)
    assert "norm 1.0000, tuned 1.8333 nats" in text


def test_a_tuned_lens_better_than_the_norm_lens_is_not_warned_about(monkeypatch, tmp_path):
    _fitted(monkeypatch, norm=[2.0, 1.0, 0.0], tuned=[1.0, 1.5, 0.1])  # mean 0.8667 < 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = commands.fit(FitLensConfig(out=str(tmp_path)), progress=False)
    assert "norm 1.0000, tuned 0.8667 nats" in text
