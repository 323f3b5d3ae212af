import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from internal_policy_lens import plots
from internal_policy_lens.lens.sites import MODULES, SITES

PACKAGE = Path(plots.__file__).parent


def synthetic_tokens(n_layers=6, n_positions=30, n_samples=2, extras=True, seed=0):
    """An entropy table shaped like tokens.parquet, with entropy falling with depth."""
    rng = np.random.default_rng(seed)
    rows = []
    text = "Let x = $5$; then\n2x = 10. "
    for sample in range(n_samples):
        for position in range(n_positions):
            for layer in range(n_layers):
                for site in SITES:
                    if site == "final" and layer != n_layers - 1:
                        continue
                    rows.append((sample, position, text[position % len(text)], layer, site))
    frame = pd.DataFrame(rows, columns=["sample_id", "position", "token", "layer", "site"])
    frame["token_id"] = frame["position"] % 17
    depth = (frame["layer"] + 1) / n_layers
    frame["entropy"] = (8.0 * (1 - depth) + rng.gamma(2.0, 0.3, len(frame))).astype("float32")
    frame["site"] = pd.Categorical(frame["site"], categories=SITES)
    if extras:
        frame["next_token_rank"] = rng.integers(1, 500, len(frame)) // (frame["layer"] + 1) + 1
        frame["kl_internal_final"] = (4.0 * (1 - depth) + rng.random(len(frame))).astype("float32")
        # A property of the (token, layer): the same value on every site's row, NaN on final.
        keys = ["sample_id", "position", "layer"]
        per_layer = frame[keys].drop_duplicates()
        per_layer["cos_attn"] = np.tanh(rng.normal(-0.3, 0.4, len(per_layer)))
        per_layer["cos_ffn"] = np.tanh(rng.normal(0.5 * depth.loc[per_layer.index], 0.3))
        frame = frame.merge(per_layer, on=keys, how="left")
        frame.loc[frame["site"] == "final", ["cos_attn", "cos_ffn"]] = np.nan
    return frame


def synthetic_deltas(tokens):
    wide = tokens[tokens["site"] != "final"].pivot_table(
        index=["sample_id", "position", "layer"], columns="site", values="entropy", observed=True
    )
    parts = [
        (wide[b] - wide[a]).rename("delta").reset_index().assign(module=module)
        for module, (a, b) in MODULES.items()
    ]
    return pd.concat(parts, ignore_index=True)


def pixels(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(float)


def assert_drawn(fig):
    image = pixels(fig)
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert image.std() > 10  # real content, not a blank canvas
    assert (image.reshape(-1, 3) != 255).any(axis=1).mean() > 0.02
    corner = image[:3, :3].reshape(-1, 3)
    assert (corner == 255).all()  # white background


@pytest.fixture(scope="module")
def tables():
    tokens = synthetic_tokens()
    return tokens, synthetic_deltas(tokens)


@pytest.mark.parametrize("spread", ["std", "iqr"])
def test_entropy_flow(tables, spread):
    fig = plots.entropy_flow(tables[0], spread=spread, title="model")
    assert_drawn(fig)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "entropy (nats)"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:4] == ["resid_pre", "attn_out", "mlp_out", "resid_post"]
    assert plots.SPREADS[spread] in fig.legends[0].get_title().get_text()
    # The resid_post line is the per-layer mean of the table.
    tokens = tables[0]
    expected = tokens[tokens.site == "resid_post"].groupby("layer")["entropy"].mean()
    line = ax.get_lines()[3]
    np.testing.assert_allclose(line.get_ydata(), expected.to_numpy(), rtol=1e-6)


def test_entropy_bands_are_quantiles_and_stay_non_negative():
    # Skewed entropies near zero (as in a converged layer): a s.d. band reaches below zero.
    tokens = synthetic_tokens()
    tokens["entropy"] = np.random.default_rng(1).exponential(0.05, len(tokens)).astype("float32")
    tokens.loc[tokens.index[::50], "entropy"] = 6.0
    fig = plots.entropy_flow(tokens)
    assert "25th–75th percentile" in fig.legends[0].get_title().get_text()
    ax = fig.axes[0]
    bands = [c for c in ax.collections if len(c.get_paths())]
    assert len(bands) == 4
    site = tokens["site"].astype(str)
    for band, name in zip(bands, ["resid_pre", "attn_out", "mlp_out", "resid_post"]):
        edges = band.get_paths()[0].vertices[:, 1]
        assert edges.min() >= 0.0
        q75 = tokens[site == name].groupby("layer")["entropy"].quantile(0.75)
        np.testing.assert_allclose(edges.max(), q75.max(), rtol=1e-6)
    std = plots.entropy_flow(tokens, spread="std").axes[0].collections[0]
    assert std.get_paths()[0].vertices[:, 1].min() < 0  # what the quantile band avoids


def test_entropy_change_with_stages(tables):
    stages = {"exploration": (0, 1), "integration": (2, 3), "convergence": (4, 5)}
    fig = plots.entropy_change(tables[1], stages=stages)
    assert_drawn(fig)
    ax = fig.axes[0]
    assert "nats" in ax.get_ylabel()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("exploration" in label for label in labels)
    assert any(label.startswith("FFN: H(mlp_out)") for label in labels)
    assert any(np.allclose(line.get_ydata(), 0.0) for line in ax.get_lines())  # zero line


def test_token_heatmap_long_sample_has_readable_labels():
    tokens = synthetic_tokens(n_layers=4, n_positions=300, n_samples=1, extras=False)
    fig = plots.token_heatmap(tokens, site="mlp_out")
    assert_drawn(fig)
    ax = fig.axes[0]
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    assert 10 <= len(labels) <= 40
    boxes = [t.get_window_extent() for t in labels]
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))
    assert fig.axes[1].get_ylabel() == "entropy (nats)"  # the colour bar


def test_token_heatmap_falls_back_to_token_ids_and_checks_the_sample():
    tokens = synthetic_tokens(n_layers=3, n_positions=12, extras=False).drop(columns="token")
    fig = plots.token_heatmap(tokens, sample_id="1")
    assert_drawn(fig)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][:3] == ["0", "1", "2"]
    with pytest.raises(ValueError, match="no rows for sample '7'"):
        plots.token_heatmap(tokens, sample_id="7")


def test_token_label():
    assert plots.token_label(" the") == "␣the"
    assert plots.token_label("\n") == "\\n"
    assert plots.token_label("$x$") == r"\$x\$"  # not mathtext
    assert plots.token_label("") == "∅"
    assert plots.token_label("abcdefghijklmnop") == "abcdefghi…"


def test_next_token_extras(tables):
    fig = plots.next_token_extras(tables[0])
    assert_drawn(fig)
    rank_ax, kl_ax = fig.axes[:2]
    assert rank_ax.get_yscale() == "log"
    assert "nats" in kl_ax.get_ylabel()
    with pytest.raises(ValueError, match="--extras"):
        plots.next_token_extras(synthetic_tokens(extras=False))


@pytest.mark.parametrize("spread", ["std", "iqr"])
def test_residual_cosine(tables, spread):
    tokens = tables[0]
    fig = plots.residual_cosine(tokens, spread=spread)
    assert_drawn(fig)
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    zero = [line for line in ax.get_lines() if list(line.get_ydata()) == [0.0, 0.0]]
    assert len(zero) == 1  # the zero line
    unique = tokens[tokens.site == "resid_post"]  # one row per (token, layer)
    for column, (label, _) in plots.COSINE_LABELS.items():
        expected = unique.groupby("layer")[column].mean()
        np.testing.assert_allclose(lines[label].get_ydata(), expected.to_numpy())
        np.testing.assert_array_equal(lines[label].get_xdata(), expected.index)
    (band_attn, band_ffn) = ax.collections  # the two bands
    low = band_attn.get_paths()[0].vertices[:, 1].min()
    assert low == pytest.approx(
        unique.groupby("layer")["cos_attn"].quantile(0.25).min()
        if spread == "iqr"
        else (
            unique.groupby("layer")["cos_attn"].mean() - unique.groupby("layer")["cos_attn"].std()
        ).min()
    )
    with pytest.raises(ValueError, match="--extras"):
        plots.residual_cosine(synthetic_tokens(extras=False))


def test_compare_cosines_on_relative_depth():
    from internal_policy_lens.tables import summary_table

    parts = []
    for name, n_layers in (("model-a", 4), ("model-b", 9)):
        tokens = synthetic_tokens(n_layers=n_layers, n_positions=8)
        summary = summary_table(tokens, synthetic_deltas(tokens))
        parts.append(summary.assign(model=name, n_layers=n_layers))
    stacked = pd.concat(parts, ignore_index=True)
    fig = plots.compare_cosines(stacked)
    assert_drawn(fig)
    attn_ax, ffn_ax = fig.axes[:2]
    lines = [line for line in ffn_ax.get_lines() if len(line.get_xdata()) > 2]
    for line, (name, n_layers) in zip(lines, (("model-a", 4), ("model-b", 9))):
        assert line.get_xdata()[-1] == pytest.approx(1.0) and len(line.get_xdata()) == n_layers
        rows = stacked[(stacked.model == name) & (stacked.quantity == "cosine")]
        np.testing.assert_allclose(line.get_ydata(), rows[rows.name == "ffn"]["mean"])
    with pytest.raises(ValueError, match="--extras"):
        plots.compare_cosines(stacked[stacked.quantity != "cosine"])


def test_compare_runs_on_relative_depth():
    from internal_policy_lens.tables import summary_table

    parts = []
    for name, n_layers in (("model-a", 4), ("model-b", 9)):
        tokens = synthetic_tokens(n_layers=n_layers, n_positions=8, extras=False)
        summary = summary_table(tokens, synthetic_deltas(tokens))
        parts.append(summary.assign(model=name, n_layers=n_layers))
    fig = plots.compare_runs(pd.concat(parts, ignore_index=True))
    assert_drawn(fig)
    entropy_ax = fig.axes[0]
    lines = entropy_ax.get_lines()
    assert [line.get_label() for line in lines] == ["model-a", "model-b"]
    for line, n_layers in zip(lines, (4, 9)):
        x = line.get_xdata()
        assert x[0] == 0.0 and x[-1] == pytest.approx(1.0) and len(x) == n_layers + 1
    assert lines[0].get_color() != lines[1].get_color()


def test_missing_data_is_a_clear_error(tables):
    with pytest.raises(ValueError, match="none of the sites"):
        plots.entropy_flow(tables[0][tables[0].site == "final"])
    with pytest.raises(ValueError, match="unknown spread"):
        plots.entropy_flow(tables[0], spread="mad")


@pytest.mark.parametrize("name", ["plots.py", "convergence.py", "figures.py"])
def test_plotting_modules_never_import_torch(name):
    tree = ast.parse((PACKAGE / name).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not any(m == "torch" or m.startswith("torch.") for m in imported)
    assert not imported & {"models", "tables", "hooks", "lens"}  # no model code either
