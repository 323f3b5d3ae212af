"""The tuned-lens commands' summaries: fit-lens and eval-lens."""

from __future__ import annotations

from ..config import EvalLensConfig, FitLensConfig


def fit_lens(cfg: FitLensConfig, progress: bool) -> str:
    """Fit (or find complete) the lens; say where it is and its held-out KL against norm."""
    from ..runs.lens import run_fit_lens

    meta = run_fit_lens(cfg, progress=progress)
    reused = bool(meta.get("reused"))
    lines = []
    if reused:
        lines.append(
            f"Nothing to do: {cfg.out}/ holds this lens, complete (same configuration, finished "
            f"{meta.get('finished')}); nothing was changed. Pass --force to fit it again."
        )
    evaluation = meta["heldout"]["evaluation"]
    kl = {
        lens: [r["kl_to_final"] for r in evaluation if r["lens"] == lens]
        for lens in ("norm", "tuned")
    }
    lines.append(
        f"{'has' if reused else 'wrote'} {len(meta['translators'])} translators "
        f"{'in' if reused else 'to'} {cfg.out}/ ({meta['fit_seconds']} s); "
        f"held-out mean KL(final || lens) over them: norm {sum(kl['norm']) / len(kl['norm']):.4f}, "
        f"tuned {sum(kl['tuned']) / len(kl['tuned']):.4f} nats"
    )
    return "\n".join(lines)


def eval_lens(cfg: EvalLensConfig) -> str:
    """Evaluate the three lenses; the KL table, and where the results went."""
    from ..runs.lens import kl_text, run_eval_lens

    table = run_eval_lens(cfg)
    lines = ["KL(final || lens), nats, per site and layer:", kl_text(table)]
    if cfg.out is not None:
        lines.append(f"results in {cfg.out}/: lens_eval.csv and lens_eval.png/.pdf")
    return "\n".join(lines)
