"""How a model converges: FFN stages, abruptness and the BuPO layer. Pure pandas.

Everything here reads a summary table (:func:`~internal_policy_lens.tables.summary_table` or a run
folder's ``summary.csv``: columns ``quantity, layer, name, mean``), so a 36-layer model's answer
costs a few hundred rows, however many tokens were analysed.

Stages. Each layer's mean FFN entropy change ``d`` (nats) is classed ``+`` (``d > tau``,
exploration), ``0`` (``|d| <= tau``, integration) or ``-`` (``d < -tau``, convergence). The stages
are the split of the layers into three consecutive, possibly empty, ranges (exploration, then
integration, then convergence) that agrees with the most per-layer classes. Exploration always ends
on a ``+`` layer and convergence starts on a ``-`` layer; ties go to the longer exploration stage,
then to the longer convergence stage. Noise inside a stage (a single ``0`` among ``+`` layers) thus
does not split it.

Abruptness. ``H(x)`` is the mean entropy of the residual stream at relative depth ``x``: the
``resid_pre`` of layer 0 sits at depth 0 and the ``resid_post`` of layer ``l`` at depth
``(l + 1) / L``, with linear interpolation between layer boundaries. The total drop is
``H(0) - H(1)``; abruptness is the share of it that happens in the last 10% of depth,
``(H(0.9) - H(1)) / (H(0) - H(1))`` (when 0.9 L is an integer: the drop made by layers
``l >= 0.9 L``). A steady fall gives about 0.1; a fall confined to the top layers gives about 1.

Label. ``abrupt`` when abruptness >= ``abrupt_share`` (default 0.5: at least half of the drop
happens in the last tenth of the depth), else ``progressive``; ``flat`` when the total drop is at
most ``tau`` (nothing to locate).

Drop depths and shape. The label above reads one point of the curve: a drop made entirely over the
last 20% of the depth is labelled ``progressive`` (e.g. 40% of it after depth 0.9), and a drop made
in the first two layers too. The drop depths ``x10, x50, x90`` say where the curve first has made
10%, 50% and 90% of its drop; the shape is ``progressive`` when ``x90 - x10 >=
progressive_spread`` (default 0.5: the middle 80% of the drop spans at least half the depth),
else ``abrupt-late`` (``x50 >= 0.5``) or ``abrupt-early``; ``flat`` as above.

Missing sites. The stages and the suggested layer need the FFN change (sites ``mlp_in`` and
``mlp_out``); abruptness, label and drop depths need layer 0's ``resid_pre`` and the last layer's
``resid_post``. A summary with one but not the other gets what it allows, and a note says what is
missing. A note also explains an abruptness outside [0, 1], which a curve that does not fall
steadily gives (a share of a drop it does not make).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..config import ConvergenceConfig

STAGES: tuple[str, ...] = ("exploration", "integration", "convergence")
DROP_SHARES: tuple[float, ...] = (0.1, 0.5, 0.9)
_CLASS_NAMES = {1: "exploration", 0: "integration", -1: "convergence"}
NO_FFN = (
    "the summary has no FFN entropy change: the FFN stages and the suggested layer need the "
    "sites mlp_in and mlp_out (add them to ipl entropy --sites)"
)


@dataclass
class LayerSuggestion:
    """The BuPO layer picked by the paper's rule, with the evidence for it."""

    layer: int | None
    """0-based layer index, or None when no layer qualifies."""
    reason: str
    """One sentence: why this layer (or why none)."""
    evidence: pd.DataFrame
    """Layers around the choice: ``layer``, ``ffn_delta`` (mean, nats), ``class``, ``stage``."""
    tau: float
    """The threshold used (nats)."""

    def __str__(self) -> str:
        head = (
            f"suggested BuPO layer: {self.layer} (0-based)"
            if self.layer is not None
            else "no layer suggested"
        )
        if self.evidence.empty:
            return f"{head}: {self.reason}"
        return f"{head}: {self.reason}\n{self.evidence.to_string(index=False)}"


@dataclass
class Convergence:
    """A model's convergence profile (see the module docstring for every definition)."""

    n_layers: int
    tau: float
    stages: dict[str, tuple[int, int] | None] | None
    """Per stage, its first and last layer (0-based, inclusive), or None when empty; None
    instead of the dict when the summary has no FFN entropy change."""
    ffn_delta: pd.Series = field(repr=False)
    """Mean FFN entropy change per layer (nats), indexed by layer (empty without FFN sites)."""
    entropy_start: float
    """H(0): mean entropy of layer 0's ``resid_pre`` (nats); NaN when not analysed."""
    entropy_end: float
    """H(1): mean entropy of the last layer's ``resid_post`` (nats); NaN when not analysed."""
    abruptness: float
    """Share of the drop ``H(0) - H(1)`` that happens in the last 10% of depth."""
    label: str | None
    """``progressive``, ``abrupt``, ``flat``, or None when the entropies are missing."""
    drop_depths: tuple[float, ...]
    """Depths by which 10%, 50% and 90% of the drop are made (:func:`drop_depths`)."""
    shape: str | None
    """The label the drop depths give (:func:`drop_shape`)."""
    suggestion: LayerSuggestion = field(repr=False)
    notes: list[str] = field(default_factory=list)
    """What is missing and why, and how to read an abruptness outside [0, 1] (a sentence each)."""

    def row(self) -> dict:
        """One flat row for a CSV: stage ranges as ``"first-last"`` strings.

        A stage range is "" when the stage is empty, None when the summary has no FFN change;
        ``note`` joins :attr:`notes`.
        """
        if self.stages is None:  # no FFN change: the stages are unknown, not empty
            ranges = dict.fromkeys(STAGES)
        else:
            ranges = {
                name: "" if span is None else f"{span[0]}-{span[1]}"
                for name, span in self.stages.items()
            }
        return {
            "n_layers": self.n_layers,
            "tau": self.tau,
            **ranges,
            "suggested_layer": self.suggestion.layer,
            "entropy_start": self.entropy_start,
            "entropy_end": self.entropy_end,
            "entropy_drop": self.entropy_start - self.entropy_end,
            "abruptness": self.abruptness,
            "label": self.label,
            **{f"drop_depth_{round(q * 100)}": x for q, x in zip(DROP_SHARES, self.drop_depths)},
            "shape": self.shape,
            "note": "; ".join(self.notes),
        }


def ffn_curve(summary: pd.DataFrame) -> pd.Series:
    """Mean FFN entropy change per layer (nats) from a summary table, indexed by layer."""
    rows = summary[(summary["quantity"] == "delta") & (summary["name"].astype(str) == "ffn")]
    if rows.empty:
        raise ValueError(NO_FFN)
    return rows.set_index("layer")["mean"].astype(float).sort_index().rename("ffn_delta")


def classify(curve: pd.Series, tau: float) -> pd.Series:
    """+1 where the value is > tau, -1 where < -tau, 0 otherwise (same index)."""
    values = curve.to_numpy()
    return pd.Series(np.where(values > tau, 1, np.where(values < -tau, -1, 0)), index=curve.index)


def find_stages(curve: pd.Series, tau: float) -> dict[str, tuple[int, int] | None]:
    """Split the layers into exploration, integration and convergence ranges.

    Args:
        curve: mean FFN entropy change (nats) indexed by 0-based layer.
        tau: half-width of the integration band (nats).

    Returns:
        Per stage, (first layer, last layer) inclusive, or None when the stage is empty. The
        split maximises agreement with :func:`classify`; see the module docstring for ties.
    """
    classes = classify(curve, tau).to_numpy()
    n = len(classes)
    counts = {c: np.concatenate([[0], np.cumsum(classes == c)]) for c in (1, 0, -1)}
    ends = [0] + [i + 1 for i in range(n) if classes[i] == 1]  # exploration = layers [0, a)
    starts = [i for i in range(n) if classes[i] == -1] + [n]  # convergence = layers [b, n)
    best = max(
        (
            counts[1][a] + counts[0][b] - counts[0][a] + counts[-1][n] - counts[-1][b],
            a,
            -b,
        )
        for a in ends
        for b in starts
        if b >= a
    )
    a, b = best[1], -best[2]
    layers = curve.index.to_list()
    bounds = {"exploration": (0, a), "integration": (a, b), "convergence": (b, n)}
    return {
        name: (int(layers[lo]), int(layers[hi - 1])) if hi > lo else None
        for name, (lo, hi) in bounds.items()
    }


def curve_rows(summary: pd.DataFrame, n_layers: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Depths of the residual-stream curve (module docstring) and the summary rows behind them.

    Returns ``(depth, rows)``: ascending depths and, for each, the position in ``summary`` of
    its row; None without layer 0's ``resid_pre`` or the last layer's ``resid_post``.
    """
    quantity, names = summary["quantity"].to_numpy(), summary["name"].astype(str).to_numpy()
    layer = summary["layer"].to_numpy()
    pre = np.flatnonzero((quantity == "entropy") & (names == "resid_pre") & (layer == 0))
    post = np.flatnonzero((quantity == "entropy") & (names == "resid_post"))
    depth = np.concatenate([[0.0] * len(pre), (layer[post] + 1) / n_layers])
    rows = np.concatenate([pre, post])
    order = np.argsort(depth, kind="stable")
    depth, rows = depth[order], rows[order]
    if len(depth) < 2 or depth[0] != 0.0 or not np.isclose(depth[-1], 1.0):
        return None
    return depth, rows


def _entropy_curve(summary: pd.DataFrame, n_layers: int):
    """(depth, H) of the residual stream (module docstring), or None without both ends."""
    curve = curve_rows(summary, n_layers)
    if curve is None:
        return None
    depth, rows = curve
    return depth, summary["mean"].to_numpy()[rows].astype(float)


def abruptness(
    summary: pd.DataFrame, n_layers: int, late_depth: float = 0.9
) -> tuple[float, float, float]:
    """H(0), H(1) and the share of the drop H(0) - H(1) made after ``late_depth``.

    See the module docstring for the definition; NaN where the summary lacks layer 0's
    ``resid_pre`` or the last layer's ``resid_post``.
    """
    curve = _entropy_curve(summary, n_layers)
    if curve is None:
        return float("nan"), float("nan"), float("nan")
    depth, value = curve
    start, end = float(value[0]), float(value[-1])
    late = float(np.interp(late_depth, depth, value))
    share = (late - end) / (start - end) if start != end else float("nan")
    return start, end, share


def drop_depths(
    summary: pd.DataFrame, n_layers: int, shares: tuple[float, ...] = DROP_SHARES
) -> tuple[float, ...]:
    """The relative depth by which each share of the drop ``H(0) - H(1)`` is first made.

    ``x_q`` is the first depth where ``H(x) <= H(0) - q (H(0) - H(1))`` (linear between layer
    boundaries); NaN for every share when the curve is missing or does not fall.
    """
    curve = _entropy_curve(summary, n_layers)
    if curve is None or curve[1][0] <= curve[1][-1]:
        return tuple(float("nan") for _ in shares)
    depth, value = curve
    out = []
    for share in shares:
        level = value[0] - share * (value[0] - value[-1])
        i = int(np.argmax(value <= level))  # value[0] > level, so i >= 1
        step = (value[i - 1] - level) / (value[i - 1] - value[i])
        out.append(float(depth[i - 1] + step * (depth[i] - depth[i - 1])))
    return tuple(out)


def abruptness_array(
    depth: np.ndarray, values: np.ndarray, late_depth: float = 0.9
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`abruptness` of many curves at once: H(0), H(1) and the late share of each row.

    Args:
        depth: ``[points]`` ascending depths from 0 to 1 (:func:`curve_rows`).
        values: ``[curves, points]`` the entropy at each depth, one curve per row.
        late_depth: the depth from which the drop counts as late.
    """
    start, end = values[:, 0], values[:, -1]
    # np.interp's arithmetic, row by row: the point itself, else the slope from the left point.
    j = np.clip(np.searchsorted(depth, late_depth, side="right") - 1, 0, len(depth) - 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (values[:, j + 1] - values[:, j]) / (depth[j + 1] - depth[j])
        late = slope * (late_depth - depth[j]) + values[:, j]
        if late_depth <= depth[0] or depth[j] == late_depth:
            late = values[:, j]
        elif late_depth >= depth[-1]:
            late = values[:, -1]
        share = np.where(start != end, (late - end) / (start - end), np.nan)
    return start, end, share


def drop_depths_array(
    depth: np.ndarray, values: np.ndarray, shares: tuple[float, ...] = DROP_SHARES
) -> np.ndarray:
    """:func:`drop_depths` of many curves at once: ``[curves, shares]``, NaN where none falls.

    Args:
        depth: ``[points]`` ascending depths from 0 to 1 (:func:`curve_rows`).
        values: ``[curves, points]`` the entropy at each depth, one curve per row.
        shares: the shares of the drop whose depths are wanted.
    """
    out = np.full((len(values), len(shares)), np.nan)
    falls = values[:, 0] > values[:, -1]  # False for NaN curves too
    curves = values[falls]  # [falling curves, points]
    rows = np.arange(len(curves))
    for k, share in enumerate(shares):
        level = curves[:, 0] - share * (curves[:, 0] - curves[:, -1])  # [falling curves]
        i = np.argmax(curves <= level[:, None], axis=1)  # curves[:, 0] > level, so i >= 1
        above, below = curves[rows, i - 1], curves[rows, i]
        step = (above - level) / (above - below)
        out[falls, k] = depth[i - 1] + step * (depth[i] - depth[i - 1])
    return out


def drop_shape(depths: tuple[float, ...], drop: float, cfg: ConvergenceConfig) -> str | None:
    """``progressive``, ``abrupt-late``, ``abrupt-early`` or ``flat`` from :func:`drop_depths`.

    Progressive when the middle 80% of the drop spans at least ``cfg.progressive_spread`` of the
    depth; otherwise abrupt, late when half the drop is made above mid-depth, else early.
    """
    if np.isnan(drop):
        return None
    if drop <= cfg.tau:
        return "flat"
    x10, x50, x90 = depths
    if x90 - x10 >= cfg.progressive_spread:
        return "progressive"
    return "abrupt-late" if x50 >= 0.5 else "abrupt-early"


def suggest_layer(summary: pd.DataFrame, cfg: ConvergenceConfig | None = None) -> LayerSuggestion:
    """The BuPO layer of the paper's rule: the last exploration layer before integration.

    The paper's rule: the last layer (from the bottom) whose mean FFN entropy change is > 0
    before the integration stage; here "> 0" means "> tau" and the stages come from
    :func:`find_stages`.
    The paper's pick for Qwen3-4B is index 5 of 36.

    Returns:
        The layer (0-based) and the evidence (mean FFN delta two layers either side of it), or
        ``layer=None`` with the reason when the model has no exploration stage, when its
        exploration stage reaches the last layer (nothing comes after it), or when the summary
        has no FFN entropy change (no evidence then).
    """
    cfg = cfg or ConvergenceConfig()
    try:
        curve = ffn_curve(summary)
    except ValueError as err:
        columns = ["layer", "ffn_delta", "class", "stage"]
        return LayerSuggestion(None, str(err), pd.DataFrame(columns=columns), cfg.tau)
    stages = find_stages(curve, cfg.tau)
    classes = classify(curve, cfg.tau)
    exploration = stages["exploration"]
    if exploration is None:
        top = curve.idxmax()
        return LayerSuggestion(
            None,
            f"no exploration stage: no bottom layer has mean FFN entropy change > tau = "
            f"{cfg.tau:g} nats (largest: {curve[top]:+.3f} at layer {top})",
            _evidence(curve, classes, stages, curve.index[0]),
            cfg.tau,
        )
    layer = exploration[1]  # an exploration stage always ends on a layer classed +
    if layer == curve.index[-1]:
        return LayerSuggestion(
            None,
            f"every stage above exploration is empty: mean FFN entropy change stays > tau = "
            f"{cfg.tau:g} nats up to the last layer, so no layer precedes an integration stage",
            _evidence(curve, classes, stages, layer),
            cfg.tau,
        )
    after = "integration" if stages["integration"] else "convergence"
    return LayerSuggestion(
        layer,
        f"last layer with mean FFN entropy change > tau = {cfg.tau:g} nats "
        f"({curve[layer]:+.3f}) before the {after} stage",
        _evidence(curve, classes, stages, layer),
        cfg.tau,
    )


def _evidence(curve, classes, stages, layer, width: int = 2) -> pd.DataFrame:
    position = curve.index.get_loc(layer)
    part = curve.iloc[max(position - width, 0) : position + width + 1]
    spans = [(name, span) for name, span in stages.items() if span is not None]
    stage_of = {lay: name for name, (lo, hi) in spans for lay in part.index if lo <= lay <= hi}
    return pd.DataFrame(
        {
            "layer": part.index.astype(int),
            "ffn_delta": part.to_numpy().round(4),
            "class": [_CLASS_NAMES[c] for c in classes.loc[part.index]],
            "stage": [stage_of[lay] for lay in part.index],
        }
    )


def convergence_label(start: float, end: float, share: float, cfg: ConvergenceConfig) -> str | None:
    """``progressive``, ``abrupt`` or ``flat`` from :func:`abruptness` (module docstring)."""
    if np.isnan(start):
        return None
    if start - end <= cfg.tau:
        return "flat"
    return "abrupt" if share >= cfg.abrupt_share else "progressive"


def convergence_summary(
    summary: pd.DataFrame, n_layers: int | None = None, cfg: ConvergenceConfig | None = None
) -> Convergence:
    """Stages, abruptness, label and suggested layer of one model (module docstring).

    Args:
        summary: a summary table (``summary_table`` or ``summary.csv``).
        n_layers: the model's layer count (default: the highest layer in ``summary`` + 1).
        cfg: thresholds; default :class:`~internal_policy_lens.config.ConvergenceConfig`.
    """
    cfg = cfg or ConvergenceConfig()
    n_layers = n_layers or int(summary["layer"].max()) + 1
    suggestion = suggest_layer(summary, cfg)
    try:
        curve = ffn_curve(summary)
        stages = find_stages(curve, cfg.tau)
        notes = []
    except ValueError as err:  # no FFN sites: everything else still comes from the residual
        curve, stages, notes = pd.Series(dtype=float, name="ffn_delta"), None, [str(err)]
    start, end, share = abruptness(summary, n_layers, cfg.late_depth)
    label = convergence_label(start, end, share, cfg)
    if np.isnan(start):
        notes.append(
            "abruptness, label and drop depths need the sites resid_pre (layer 0) and "
            "resid_post (the last layer)"
        )
    note = _abruptness_note(start, end, share, cfg)
    depths = drop_depths(summary, n_layers)
    return Convergence(
        n_layers=n_layers,
        tau=cfg.tau,
        stages=stages,
        ffn_delta=curve,
        entropy_start=start,
        entropy_end=end,
        abruptness=share,
        label=label,
        drop_depths=depths,
        shape=drop_shape(depths, start - end, cfg),
        suggestion=suggestion,
        notes=notes + ([note] if note else []),
    )


def _abruptness_note(start: float, end: float, share: float, cfg: ConvergenceConfig) -> str | None:
    """Why an abruptness reads as it does, when it is no share in [0, 1] of a real drop."""
    if np.isnan(share):
        return None
    drop, late = start - end, end + share * (start - end)  # late: H(late_depth)
    heights = f"H(0) {start:.3f}, H({cfg.late_depth:g}) {late:.3f}, H(1) {end:.3f} nats"
    if drop <= cfg.tau:
        return (
            f"abruptness {share:.3g} measures nothing: the entropy does not fall by more than "
            f"tau ({heights}), hence the label flat"
        )
    if share < 0:
        return (
            f"abruptness {share:.3g} < 0: the entropy rises after depth {cfg.late_depth:g} "
            f"({heights})"
        )
    if share > 1:
        return (
            f"abruptness {share:.3g} > 1: the entropy at depth {cfg.late_depth:g} is above its "
            f"start ({heights}): it rises before it falls"
        )
    return None
