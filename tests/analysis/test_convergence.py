import numpy as np
import pandas as pd
import pytest

from internal_policy_lens.analysis.convergence import (
    abruptness,
    abruptness_array,
    convergence_summary,
    curve_rows,
    drop_depths,
    drop_depths_array,
    ffn_curve,
    find_stages,
    suggest_layer,
)
from internal_policy_lens.config import ConvergenceConfig


def synthetic_summary(ffn, post, start=None):
    """A summary table with a given mean FFN delta and mean resid_post entropy per layer."""
    start = post[0] if start is None else start
    rows = [("entropy", 0, "resid_pre", start)]
    rows += [("entropy", layer + 1, "resid_pre", h) for layer, h in enumerate(post[:-1])]
    rows += [("entropy", layer, "resid_post", h) for layer, h in enumerate(post)]
    rows += [("delta", layer, "ffn", d) for layer, d in enumerate(ffn)]
    frame = pd.DataFrame(rows, columns=["quantity", "layer", "name", "mean"])
    return frame.assign(std=0.1, count=500)


def progressive():
    # Qwen3-4B as the paper describes it (36 layers, 1-based): FFN dH > 0 in layers 1-6, ~0 in
    # 7-26, < 0 in 27-36; entropy falls steadily with depth. One noisy layer (12) pokes above tau.
    ffn = [0.6] * 6 + [0.02, -0.03] * 10 + [-0.5] * 10
    ffn[12] = 0.15
    post = list(np.linspace(10.0, 0.5, 37)[1:])  # H(d) = 10 - 9.5 d: 10% of the drop is late
    return synthetic_summary(ffn, post, start=10.0)


def abrupt():
    # Llama-like (32 layers): FFN dH weakly positive to layer 27, then strongly negative; entropy
    # flat at 10 nats until the last four layers.
    ffn = [0.3] * 28 + [-1.5] * 4
    post = [10.0] * 28 + [7.0, 4.0, 1.5, 0.2]
    return synthetic_summary(ffn, post)


def flat():
    ffn = [0.05, -0.04, 0.0, 0.08, -0.09, 0.01]
    return synthetic_summary(ffn, [5.0] * 6)


def test_progressive_profile():
    conv = convergence_summary(progressive())
    assert conv.n_layers == 36
    assert conv.stages == {
        "exploration": (0, 5),
        "integration": (6, 25),
        "convergence": (26, 35),
    }
    # H(0.9) = 10 - 9.5 * 0.9 = 1.45; share = (1.45 - 0.5) / (10 - 0.5) = 0.1
    assert conv.abruptness == pytest.approx(0.1)
    assert conv.entropy_start == 10.0 and conv.entropy_end == pytest.approx(0.5)
    assert conv.label == "progressive"
    assert conv.suggestion.layer == 5  # the paper's pick for Qwen3-4B (0-based)
    row = conv.row()
    assert row["exploration"] == "0-5" and row["convergence"] == "26-35"
    assert row["suggested_layer"] == 5 and row["label"] == "progressive"


def test_abrupt_profile():
    conv = convergence_summary(abrupt())
    assert conv.stages == {"exploration": (0, 27), "integration": None, "convergence": (28, 31)}
    # Depth 28/32 = 0.875 -> 10 nats, 29/32 = 0.906 -> 7 nats: H(0.9) = 10 - 3 * 0.8 = 7.6.
    assert conv.abruptness == pytest.approx((7.6 - 0.2) / (10 - 0.2))
    assert conv.label == "abrupt"
    suggestion = conv.suggestion
    assert suggestion.layer == 27
    assert "convergence stage" in suggestion.reason
    assert suggestion.evidence["layer"].tolist() == [25, 26, 27, 28, 29]
    assert suggestion.evidence["ffn_delta"].tolist() == [0.3, 0.3, 0.3, -1.5, -1.5]
    assert conv.row()["integration"] == ""


def test_flat_profile_has_no_exploration_stage():
    summary = flat()
    conv = convergence_summary(summary)
    assert conv.stages == {"exploration": None, "integration": (0, 5), "convergence": None}
    assert conv.label == "flat"
    suggestion = suggest_layer(summary)
    assert suggestion.layer is None
    assert "no exploration stage" in suggestion.reason and "0.08" in suggestion.reason
    assert "no layer suggested" in str(suggestion)
    assert conv.row()["suggested_layer"] is None


def test_thresholds_are_configurable():
    wide = ConvergenceConfig(tau=1.0)
    assert convergence_summary(progressive(), cfg=wide).stages["integration"] == (0, 35)
    assert suggest_layer(progressive(), wide).layer is None
    strict = ConvergenceConfig(abrupt_share=0.9)
    assert convergence_summary(abrupt(), cfg=strict).label == "progressive"
    # The late part can start elsewhere: from depth 0.5 the steady profile has lost half.
    start, end, share = abruptness(progressive(), 36, late_depth=0.5)
    assert share == pytest.approx(0.5) and start == 10.0


@pytest.mark.parametrize(
    "deltas,expected",
    [
        # A single dip inside exploration does not split it; the stage ends on a + layer.
        (
            [1, 0, 1, 0, 0, -1],
            {"exploration": (0, 2), "integration": (3, 4), "convergence": (5, 5)},
        ),
        # Negative at the bottom is not exploration; a tie goes to the longer convergence stage.
        ([-1, 0], {"exploration": None, "integration": None, "convergence": (0, 1)}),
        ([-1, -1, -1], {"exploration": None, "integration": None, "convergence": (0, 2)}),
        ([1, 1, 1], {"exploration": (0, 2), "integration": None, "convergence": None}),
    ],
)
def test_find_stages_edge_cases(deltas, expected):
    stages = find_stages(pd.Series(np.array(deltas, dtype=float) * 0.5), tau=0.1)
    assert stages == expected


def test_exploration_to_the_top_suggests_nothing():
    summary = synthetic_summary([0.5] * 4, [4.0, 3.0, 2.0, 1.0], start=5.0)
    suggestion = suggest_layer(summary)
    assert suggestion.layer is None and "last layer" in suggestion.reason


def test_layer_subsets_and_missing_sites():
    # Layers 0, 2, 4 only: stages are reported in real layer numbers.
    summary = synthetic_summary([0.5, 0.0, -0.5], [3.0, 2.0, 1.0])
    summary["layer"] = summary["layer"] * 2
    stages = convergence_summary(summary, n_layers=5).stages
    assert stages == {"exploration": (0, 0), "integration": (2, 2), "convergence": (4, 4)}
    no_residual = summary[summary["quantity"] == "delta"]
    conv = convergence_summary(no_residual, n_layers=5)
    assert conv.label is None and np.isnan(conv.abruptness)
    assert conv.notes == [
        "abruptness, label and drop depths need the sites resid_pre (layer 0) and resid_post "
        "(the last layer)"
    ]


def test_residual_sites_without_ffn_give_all_but_the_stages():
    # A tuned-lens run of resid_pre, resid_post and final: no FFN change, but the whole curve.
    residual = abrupt()
    residual = residual[residual["quantity"] == "entropy"]
    conv = convergence_summary(residual)
    assert conv.n_layers == 32 and conv.label == "abrupt"
    assert conv.abruptness == pytest.approx(convergence_summary(abrupt()).abruptness)
    assert conv.shape == convergence_summary(abrupt()).shape
    assert conv.stages is None and conv.ffn_delta.empty
    assert conv.suggestion.layer is None and "mlp_in and mlp_out" in conv.suggestion.reason
    assert str(conv.suggestion).startswith("no layer suggested: the summary has no FFN")
    assert "Empty DataFrame" not in str(conv.suggestion)
    row = conv.row()
    assert [row[s] for s in ("exploration", "integration", "convergence")] == [None] * 3
    assert row["suggested_layer"] is None and row["label"] == "abrupt"
    assert "need the sites mlp_in and mlp_out" in row["note"]
    with pytest.raises(ValueError, match="no FFN entropy change"):
        ffn_curve(residual)


def test_abruptness_outside_zero_one_is_explained():
    # Entropy rises from 0.003 to 0.041 nats (the norm lens on a tiny model): no drop to share.
    rising = synthetic_summary([0.0] * 10, [0.003] * 8 + [0.6, 0.041], start=0.003)
    conv = convergence_summary(rising)
    # share = (H(0.9) - H(1)) / (H(0) - H(1)) = (0.6 - 0.041) / (0.003 - 0.041) = -14.7
    assert conv.abruptness == pytest.approx(-14.71, abs=0.01) and conv.label == "flat"
    assert conv.notes == [
        "abruptness -14.7 measures nothing: the entropy does not fall by more than tau "
        "(H(0) 0.003, H(0.9) 0.600, H(1) 0.041 nats), hence the label flat"
    ]
    # Falls 10 -> 0 by depth 0.9, then rises to 2: share = (0 - 2) / (10 - 2) = -0.25.
    late_rise = synthetic_summary([0.0] * 10, [9, 8, 7, 6, 5, 4, 3, 1.5, 0, 2], start=10)
    conv = convergence_summary(late_rise)
    assert conv.abruptness == pytest.approx(-0.25)
    assert conv.notes == [
        "abruptness -0.25 < 0: the entropy rises after depth 0.9 (H(0) 10.000, H(0.9) 0.000, "
        "H(1) 2.000 nats)"
    ]
    # Rises 5 -> 12 by depth 0.9, then falls to 1: share = (12 - 1) / (5 - 1) = 2.75.
    hump = synthetic_summary([0.0] * 10, [6, 7, 8, 9, 10, 11, 11.5, 11.8, 12, 1], start=5)
    conv = convergence_summary(hump)
    assert conv.abruptness == pytest.approx(2.75)
    assert conv.notes[0].startswith("abruptness 2.75 > 1: the entropy at depth 0.9 is above")
    assert conv.row()["note"] == conv.notes[0]
    assert convergence_summary(progressive()).notes == []  # 0.1: a share, nothing to say
    assert convergence_summary(progressive()).row()["note"] == ""


def late_fall():
    # 10 layers, entropy flat at 10 nats, then 8, 4, 0 over the last three layers.
    return synthetic_summary([0.0] * 10, [10.0] * 7 + [8.0, 4.0, 0.0])


def test_drop_depths_by_hand():
    # H(depth): 10 up to 0.7, 8 at 0.8, 4 at 0.9, 0 at 1.0 (drop 10 nats).
    # 10%: level 9, crossed between 0.7 (10) and 0.8 (8): 0.7 + (10 - 9) / (10 - 8) * 0.1 = 0.75
    # 50%: level 5, between 0.8 (8) and 0.9 (4): 0.8 + (8 - 5) / (8 - 4) * 0.1 = 0.875
    # 90%: level 1, between 0.9 (4) and 1.0 (0): 0.9 + (4 - 1) / (4 - 0) * 0.1 = 0.975
    assert drop_depths(late_fall(), 10) == pytest.approx((0.75, 0.875, 0.975))


def test_shape_disagrees_with_label_on_a_late_fall():
    # The whole drop is made over the last 30% of the depth, but only 40% of it after depth 0.9
    # ((4 - 0) / 10): the label says progressive, the drop depths say abrupt and late.
    conv = convergence_summary(late_fall())
    assert conv.abruptness == pytest.approx(0.4)
    assert conv.label == "progressive"
    assert conv.shape == "abrupt-late"  # x90 - x10 = 0.225 < 0.5, x50 = 0.875
    row = conv.row()
    assert row["drop_depth_50"] == pytest.approx(0.875) and row["shape"] == "abrupt-late"


def test_shape_of_early_steady_and_missing_falls():
    # Linear fall H(d) = 10 - 9.5 d: x10 = 0.1, x90 = 0.9, spread 0.8.
    conv = convergence_summary(progressive())
    assert conv.drop_depths == pytest.approx((0.1, 0.5, 0.9))
    assert conv.shape == "progressive"
    # Drop made by the first layer: 10 -> 1 at depth 0.1 (of 10), then 1 -> 0.5 slowly. Drop 9.5:
    # level 9.05 at 0.1 * (10 - 9.05) / (10 - 1), level 5.25 at 0.1 * (10 - 5.25) / (10 - 1).
    early = synthetic_summary([0.0] * 10, [1.0] + list(np.linspace(1.0, 0.5, 10)[1:]), start=10)
    x10, x50, x90 = drop_depths(early, 10)
    assert x10 == pytest.approx(0.1 * 0.95 / 9) and x50 == pytest.approx(0.1 * 4.75 / 9)
    assert convergence_summary(early).shape == "abrupt-early"
    assert convergence_summary(flat()).shape == "flat"
    rising = synthetic_summary([0.0] * 4, [2.0, 3.0, 4.0, 5.0], start=1.0)
    assert all(np.isnan(x) for x in drop_depths(rising, 4))


def test_array_measures_equal_the_per_curve_ones_on_random_curves():
    """abruptness_array / drop_depths_array = abruptness / drop_depths of each curve's summary."""
    rng = np.random.default_rng(3)
    for n_layers, late in [(7, 0.9), (10, 0.9), (12, 0.5), (5, 0.0), (5, 1.0)]:
        # Falling, rising, flat, wiggling and all-NaN curves (a resample without the group).
        values = np.sort(rng.uniform(0, 12, (40, n_layers + 1)), axis=1)[:, ::-1].copy()
        values[5:10] = rng.uniform(0, 12, (5, n_layers + 1))
        values[10:12] = values[10:12, ::-1]
        values[12] = 3.0
        values[13] = np.nan
        summaries = [synthetic_summary([0.0] * n_layers, list(v[1:]), start=v[0]) for v in values]
        curve = curve_rows(summaries[0], n_layers)
        depth, rows = curve
        np.testing.assert_allclose(depth, np.arange(n_layers + 1) / n_layers)
        stacked = np.stack([s["mean"].to_numpy()[rows] for s in summaries])  # [curves, depths]
        start, end, share = abruptness_array(depth, stacked, late)
        depths = drop_depths_array(depth, stacked)
        for k, summary in enumerate(summaries):
            expected = abruptness(summary, n_layers, late)
            found = (start[k], end[k], share[k])
            np.testing.assert_allclose(found, expected, rtol=0, atol=1e-12, equal_nan=True)
            np.testing.assert_allclose(
                depths[k], drop_depths(summary, n_layers), rtol=0, atol=1e-12, equal_nan=True
            )
        assert np.isfinite(share[:12]).all() and np.isnan(depths[13]).all()
        assert np.isfinite(depths[:5]).all() and np.isnan(depths[10:13]).all()
