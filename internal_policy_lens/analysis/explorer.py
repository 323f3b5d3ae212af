"""A run's tables -> the JSON that the report's token explorer and logit-lens grid read.

Per embedded sample: its positions, input tokens, the entropy of every (site, layer) policy and
its top-k, plus the sample in context (question, response, reference answer, verdict of the
answer checker). Embeds the first samples only (``ReportConfig.max_samples`` and
``max_values``); ``cap`` says what was left out. Nothing here imports torch.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import ReportConfig
from ..data.answers import math_reward

PROB_DIGITS = 5
"""Significant digits of the embedded top-k probabilities: ranks 2-5 of a peaked policy keep
their size (1.2345e-07, not 0.00000)."""


def explorer_data(
    tokens: pd.DataFrame,
    topk: pd.DataFrame | None,
    cfg: ReportConfig,
    records: list[dict] | None = None,
) -> dict:
    """The explorer's JSON: per embedded sample, its tokens, entropies, top-k and context.

    Entropies are ``[positions][keys]`` (nats, 3 decimals), top-k ids and probabilities
    ``[positions][keys][K]``; ``keys`` lists the (site, layer) columns. ``default_key`` of a
    sample is the key whose entropy varies most over its positions (within ``cfg.site`` when
    given). ``records`` (``responses.jsonl``) add each sample's ``context``.
    """
    keys = tokens[["site", "layer"]].drop_duplicates().astype({"site": str})
    keys = [(s, int(layer)) for s, layer in keys.itertuples(index=False)]
    k = 0 if topk is None else int(topk["rank"].max())
    sites = list(dict.fromkeys(site for site, _ in keys))
    if cfg.site is not None and cfg.site not in sites:
        raise ValueError(f"site {cfg.site!r} is not in the run; it has {', '.join(sites)}")
    contexts = {str(r["sample_id"]): r for r in records or []}
    samples, used, vocab = [], 0, {}
    ids = sorted(tokens["sample_id"].unique(), key=lambda v: (str(type(v)), v))
    per_position = len(keys) * (1 + 2 * k)
    for sample in ids[: cfg.max_samples]:
        rows = tokens[tokens["sample_id"] == sample]
        wide = rows.pivot(index="position", columns=["site", "layer"], values="entropy")
        room = (cfg.max_values - used) // per_position
        if room <= 0 or (samples and room < len(wide)):
            break
        wide = wide[[(s, layer) for s, layer in keys]]  # [positions, keys]
        entry = _sample_entry(rows, wide, room, keys, cfg.site, vocab)
        if k:
            entry.update(_sample_topk(topk, sample, wide.index[:room], keys, k, vocab))
        record = contexts.get(str(entry["id"]))
        if record is not None:
            entry["context"] = sample_context(record, rows, complete=room >= len(wide))
        samples.append(entry)
        used += len(entry["positions"]) * per_position
    total_positions = tokens.drop_duplicates(["sample_id", "position"]).shape[0]
    return {
        "keys": keys,
        "sites": sites,
        "default_site": cfg.site or ("resid_post" if "resid_post" in sites else sites[0]),
        "topk": k,
        "vocab": {str(i): t for i, t in vocab.items()},
        "samples": samples,
        "cap": {
            "max_samples": cfg.max_samples,
            "max_values": cfg.max_values,
            "samples_shown": len(samples),
            "samples_total": len(ids),
            "positions_shown": sum(len(s["positions"]) for s in samples),
            "positions_total": int(total_positions),
        },
    }


def _sample_entry(rows, wide: pd.DataFrame, room: int, keys, site, vocab: dict) -> dict:
    """One sample's positions (its first ``room``), input tokens and entropies; fills ``vocab``."""
    first = rows.drop_duplicates("position").set_index("position").loc[wide.index]
    entry = {
        "id": _jsonable(rows["sample_id"].iloc[0]),
        "default_key": _most_varied(wide, keys, site),
        "positions": wide.index[:room].tolist(),
        "token_ids": first["token_id"].astype(int).tolist()[:room],
        "entropy": wide.iloc[:room].to_numpy().round(3).tolist(),
    }
    if "token" in first:
        vocab.update(zip(entry["token_ids"], first["token"].astype(str)))
    return entry


def sample_context(record: dict, rows: pd.DataFrame, *, complete: bool) -> dict:
    r"""The sample in context: question, response, reference answer and the checker's verdict.

    ``correct`` is :func:`~internal_policy_lens.data.answers.math_reward`'s verdict on the
    response's last ``\boxed{}`` (None without a reference answer). ``tail`` is the text of the
    response after the last analysed position's input token: the last token, which no analysed
    position takes as input (the last position predicts it); None where the token texts do not
    spell the response (a tokenizer whose pieces are not plain text) or the sample is cut.
    """
    response, answer = record.get("response"), record.get("answer")
    correct = None
    if response is not None and answer is not None:
        correct = math_reward(response, answer) == 1.0
    return {
        "prompt": prompt_text(record.get("prompt")),
        "response": response,
        "answer": answer,
        "correct": correct,
        "tail": _tail(response, rows) if complete else None,
    }


def prompt_text(prompt) -> str | None:
    """A prompt as text: a string as is, chat messages one ``role: content`` line each."""
    if prompt is None or isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


def _tail(response: str | None, rows: pd.DataFrame) -> str | None:
    if not response or "token" not in rows:
        return None
    text = rows.drop_duplicates("position").sort_values("position")["token"].astype(str)
    # The first analysed position is the prompt's last token (or earlier with --all-tokens):
    # find where the response starts inside the shown text, then what is left of the response.
    spelled = "".join(text)
    for start in np.cumsum([0, *text.str.len()])[:-1]:
        # The tail is what the response has beyond the shown text from this position on.
        if len(spelled) - start <= len(response) and response.startswith(spelled[start:]):
            return response[len(spelled) - start :] or None
    return None


def _most_varied(wide: pd.DataFrame, keys: list, site: str | None) -> int:
    """Index of the key whose entropy has the largest spread over the sample's positions."""
    spread = wide.std(ddof=0).fillna(-1.0).to_numpy()  # [keys]
    if site is not None:
        spread = np.where([s == site for s, _ in keys], spread, -np.inf)
    return int(np.argmax(spread))


def _sample_topk(topk, sample, positions, keys, k, vocab) -> dict:
    rows = topk[(topk["sample_id"] == sample) & topk["position"].isin(positions)]
    rows = rows.astype({"site": str}).set_index(["position", "site", "layer", "rank"])
    index = pd.MultiIndex.from_tuples(
        [(p, s, layer, r) for p in positions for s, layer in keys for r in range(1, k + 1)]
    )
    rows = rows.reindex(index)  # [positions * keys * K], NaN where a policy has fewer
    if "token" in rows:
        known = rows.dropna(subset=["token_id"])
        vocab.update(zip(known["token_id"].astype(int), known["token"].astype(str)))
    shape = (len(positions), len(keys), k)
    ids = rows["token_id"].fillna(-1).astype(int).to_numpy().reshape(shape)
    probs = [float(f"{p:.{PROB_DIGITS}g}") for p in rows["prob"].fillna(0.0).to_numpy(float)]
    probs = np.asarray(probs).reshape(shape)
    return {"topk_ids": ids.tolist(), "topk_probs": probs.tolist()}


def _jsonable(value):
    return value.item() if isinstance(value, np.generic) else value
