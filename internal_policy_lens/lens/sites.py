"""Site names: the one naming scheme used by hooks, tables, plots and the trainer.

A *site* is a vector in a decoder layer that can be read as a policy (definitions for every family
in :mod:`internal_policy_lens.model.families`, which also says where each is read). ``final`` is
the model's own output policy: the final norm's output, which the unembedding (and the model's
output head transformation) turns into the model's logits; it is stored with layer = L - 1.
``resid_mid`` does not exist in a parallel block (GPT-NeoX): its rows are absent there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

SiteKey = tuple[str, int]
"""A (site, layer) pair: the key of a captured vector and of a policy."""

SITES: tuple[str, ...] = (
    "resid_pre",
    "attn_in",
    "attn_out",
    "resid_mid",
    "mlp_in",
    "mlp_out",
    "resid_post",
    "final",
)

# Entropy change per module (paper Eqs. 8, 11-13): delta = H(output site) - H(input site).
MODULES: dict[str, tuple[str, str]] = {
    "layer": ("resid_pre", "resid_post"),
    "attn": ("attn_in", "attn_out"),
    "ffn": ("mlp_in", "mlp_out"),
}


COSINE_COLUMNS: tuple[str, ...] = ("cos_attn", "cos_ffn")
"""Per token and layer: how each module's write lines up with the stream it is added to."""


def source_key(site: str, layer: int) -> SiteKey:
    """The (site, layer) that carries the same vector: ``resid_pre[l]`` is ``resid_post[l-1]``."""
    return ("resid_post", layer - 1) if site == "resid_pre" and layer > 0 else (site, layer)


def resolve_sites(sites: Iterable[str] | str | None) -> tuple[str, ...]:
    """Validate site names and return them in canonical order (:data:`SITES`).

    Raises:
        ValueError: naming the unknown site and listing the valid ones.
    """
    if sites is None:
        return SITES
    if isinstance(sites, str):
        sites = [s.strip() for s in sites.split(",") if s.strip()]
    wanted = set(sites)
    unknown = sorted(wanted - set(SITES))
    if unknown:
        raise ValueError(f"unknown site(s) {', '.join(unknown)}; valid sites: {', '.join(SITES)}")
    if not wanted:
        raise ValueError(f"no site given; valid sites: {', '.join(SITES)}")
    return tuple(s for s in SITES if s in wanted)


def resolve_layers(layers: Iterable[int] | str | None, n_layers: int) -> tuple[int, ...]:
    """Validate 0-based layer indices (negative ones count from the top) and sort them.

    ``layers`` may be a string such as ``"0,3,5-7"``.

    Raises:
        ValueError: naming the layer that is out of range.
    """
    if layers is None:
        return tuple(range(n_layers))
    if isinstance(layers, str):
        layers = parse_layers(layers)
    out = set()
    for layer in layers:
        index = layer + n_layers if layer < 0 else layer
        if not 0 <= index < n_layers:
            raise ValueError(
                f"layer {layer} is out of range: the model has {n_layers} layers "
                f"(valid: 0..{n_layers - 1}, or negative from the top)"
            )
        out.add(index)
    if not out:
        raise ValueError("no layer given")
    return tuple(sorted(out))


def parse_layers(text: str) -> Sequence[int]:
    """``"0,3,5-7"`` -> ``[0, 3, 5, 6, 7]`` (no range check; see :func:`resolve_layers`).

    Raises:
        ValueError: for text that is not integers and low-high ranges.
    """
    values: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:] and not part.startswith("-"):
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError(
                        f"layer range {part!r} is empty: write it low-high, e.g. '{hi}-{lo}'"
                    )
                values.extend(range(lo, hi + 1))
            else:
                values.append(int(part))
        except ValueError as err:
            if "layer range" in str(err):
                raise
            raise ValueError(
                f"cannot read layer {part!r}: use integers and ranges, e.g. '0,3,5-7'"
            ) from None
    if not values:
        raise ValueError(f"no layer given in {text!r}; use integers and ranges, e.g. '0,3,5-7'")
    return values
