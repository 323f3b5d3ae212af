"""The per-token statistics of a policy, each declared once: the registry every part reads.

A :class:`Statistic` is one column of ``tokens.parquet`` (one value per token and policy): its
name, dtype, unit, definition and what computing it needs. The reduction backends
(:mod:`internal_policy_lens.lens.reduce`) each declare which statistics they compute, and the
dispatcher picks a backend by what a :class:`Request` asks for; the tables, the summary, the
figures and the report read their columns from here. Nothing here imports torch.

Adding a statistic: declare it here (:func:`register`), compute it in the backends that can
(at least ``rows``, which takes whole logits rows), and add its name to their ``COMPUTES``.

KL columns are named by their direction: ``kl_a_b`` is KL(a ‖ b) = Σ_v a(v) (log a(v) − log b(v)),
in nats. ``internal`` is the policy of the row's (site, layer); ``final`` the call's reference
policy: the model's output policy, unless a :class:`Request` names another site.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

GROUPS: tuple[str, ...] = ("core", "extras", "opt-in")
"""``core``: always computed; ``extras``: with ``--extras``; ``opt-in``: named in ``--stats``."""


@dataclass(frozen=True)
class Chart:
    """How the figures and the report draw a statistic per layer.

    ``median``: the report draws the median per layer with its quartile band from the token
    table (as the figures do), not the summary's mean: for heavy-tailed values such as the
    rank, where a few tokens ranked in the thousands would set a mean.
    """

    title: str
    axis: str
    log: bool = False
    median: bool = False


@dataclass(frozen=True)
class Parameter:
    """A setting of a statistic; ``ipl entropy`` offers it as ``--name`` (``_`` as ``-``)."""

    default: float
    help: str
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Statistic:
    """One per-token statistic of a policy.

    Attributes:
        name: the column (``tokens.parquet``) and the quantity (``summary.csv``).
        dtype: ``float`` (the statistics' float dtype: float32, float64 for a float64 model),
            ``int64`` or ``bool``.
        unit: what its values count (``nats``, ``nats^2``, ``tokens``, ``rank``, ``share``).
        definition: the formula, with its equation in the SPEC or the paper.
        group: see :data:`GROUPS`.
        needs: ``next_token`` (the actual next token), ``reference`` (the reference policy's
            log-probabilities), ``whole_row`` (a sorted or whole logits row: no online
            accumulator over vocabulary tiles exists).
        missing: its value where it is undefined (a row without a next token), if any.
        summary: averaged per (layer, site) into ``summary.csv``.
        counted_from: the smallest value the summary counts (values below it are missing).
        chart: its per-layer chart in the figures and the report (None: none).
        parameters: the settings it reads from a :class:`Request` (name -> its
            :class:`Parameter`), offered by ``ipl entropy`` as options.
    """

    name: str
    dtype: str
    unit: str
    definition: str
    group: str = "opt-in"
    needs: frozenset[str] = frozenset()
    missing: float | int | None = None
    summary: bool = True
    counted_from: float | None = None
    chart: Chart | None = None
    parameters: dict[str, Parameter] = field(default_factory=dict)


STATISTICS: dict[str, Statistic] = {}
"""Every statistic by name, in the order of the tables' columns."""


def register(statistic: Statistic) -> Statistic:
    """Add ``statistic`` to :data:`STATISTICS` (a name may be declared once)."""
    if statistic.name in STATISTICS:
        raise ValueError(f"the statistic '{statistic.name}' is declared twice")
    if statistic.group not in GROUPS:
        raise ValueError(f"unknown group '{statistic.group}'; use one of {', '.join(GROUPS)}")
    STATISTICS[statistic.name] = statistic
    return statistic


register(
    Statistic(
        "entropy",
        "float",
        "nats",
        "H(p) = −Σ_v p(v) log p(v), p = softmax(z) (SPEC §3, paper Eq. 7)",
        group="core",
    )
)
register(
    Statistic(
        "next_token_logprob",
        "float",
        "nats",
        "log p(t), t the actual next token (NaN where none is analysed)",
        group="extras",
        needs=frozenset({"next_token"}),
        missing=float("nan"),
        summary=False,
    )
)
register(
    Statistic(
        "next_token_rank",
        "int64",
        "rank",
        "1 + #{v: z_v > z_t}, t the actual next token (1 = the policy's top token; -1 where "
        "none is analysed)",
        group="extras",
        needs=frozenset({"next_token"}),
        missing=-1,
        counted_from=1,
        chart=Chart(
            "Rank of the actual next token (median; band: 25th–75th percentile)",
            "rank, 1 = top (median; log axis)",
            log=True,
            median=True,
        ),
    )
)
register(
    Statistic(
        "kl_internal_final",
        "float",
        "nats",
        "KL(internal ‖ final) = Σ_v p(v) (log p(v) − log q(v)), q the final policy",
        group="extras",
        needs=frozenset({"reference"}),
        chart=Chart("KL(internal ‖ final) (mean)", "KL (nats)"),
    )
)
register(
    Statistic(
        "top1_agrees",
        "bool",
        "share",
        "argmax p = argmax q, q the final policy (the summary's mean: the share of tokens)",
        group="extras",
        needs=frozenset({"reference"}),
        chart=Chart("Top-1 agreement with the final policy", "share of tokens"),
    )
)
register(
    Statistic(
        "varentropy",
        "float",
        "nats^2",
        "Var_p[−log p] = Σ_v p(v) (log p(v))² − H², computed as Σ_v p(v) (z_v − E_p z)² (no "
        "difference of large terms): how far the surprise of the policy's tokens spreads",
        chart=Chart("Varentropy Var_p[−log p] (mean)", "varentropy (nats²)"),
    )
)
register(
    Statistic(
        "nucleus_size",
        "int64",
        "tokens",
        "min{k: the k most probable tokens hold at least nucleus_p of the mass} (the nucleus "
        "of top-p sampling, Holtzman et al. 2020)",
        needs=frozenset({"whole_row"}),
        chart=Chart("Nucleus size: tokens holding nucleus_p of the mass (mean)", "tokens", True),
        parameters={
            "nucleus_p": Parameter(
                0.9, "Probability mass of --stats nucleus_size's nucleus.", 0.0, 1.0
            )
        },
    )
)
register(
    Statistic(
        "kl_final_internal",
        "float",
        "nats",
        "KL(final ‖ internal) = Σ_v q(v) (log q(v) − log p(v)), q the final policy (the tuned "
        "lens's loss)",
        needs=frozenset({"reference"}),
        chart=Chart("KL(final ‖ internal) (mean)", "KL (nats)"),
    )
)

# Names in files written before the KL columns were named by direction -> today's names.
TOKEN_RENAMES = {"kl_to_final": "kl_internal_final", "kl_from_final": "kl_final_internal"}
"""``tokens.parquet``'s columns and ``summary.csv``'s quantities."""
LENS_EVAL_RENAMES = {"kl_to_final": "kl_final_internal"}
"""``lens_eval.csv``'s columns (its KL was always KL(final ‖ lens))."""
PROBE_RENAMES = {"kl_internal": "kl_layer_other"}
"""``probes.parquet``'s quantities (KL(π^layer ‖ π^other_layer))."""


def renamed_columns(frame, renames: dict[str, str]):
    """``frame`` (pandas) with the older names of ``renames`` among its columns renamed."""
    old = {a: b for a, b in renames.items() if a in frame.columns and b not in frame.columns}
    return frame.rename(columns=old) if old else frame


def renamed_values(frame, column: str, renames: dict[str, str]):
    """``frame`` with the older names of ``renames`` in ``column`` (e.g. ``quantity``) renamed."""
    if column not in frame.columns or not frame[column].isin(list(renames)).any():
        return frame
    return frame.assign(**{column: frame[column].replace(renames)})


def statistic(name: str) -> Statistic:
    """The statistic called ``name``.

    Raises:
        ValueError: naming the unknown statistic and listing the known ones.
    """
    if name not in STATISTICS:
        raise ValueError(f"unknown statistic '{name}'; use one of {', '.join(STATISTICS)}")
    return STATISTICS[name]


def in_group(group: str) -> tuple[str, ...]:
    """The statistics of ``group``, in registry order."""
    return tuple(name for name, s in STATISTICS.items() if s.group == group)


def opt_in() -> tuple[str, ...]:
    """The statistics that ``--stats`` can name."""
    return in_group("opt-in")


def resolve(extras: bool = False, stats: Iterable[str] | str | None = None) -> tuple[str, ...]:
    """The statistics of a run: ``entropy``, the extras if asked, then ``stats``, in order.

    Raises:
        ValueError: naming an unknown statistic or one that is not opt-in.
    """
    if isinstance(stats, str):
        stats = [s.strip() for s in stats.split(",") if s.strip()]
    wanted = set(stats or ())
    for name in sorted(wanted):
        if statistic(name).group == "core" or (extras and statistic(name).group == "extras"):
            continue
        if statistic(name).group != "opt-in":
            raise ValueError(f"'{name}' comes with --extras; --stats takes {', '.join(opt_in())}")
    groups = {"core", *(("extras",) if extras else ())}
    return tuple(n for n, s in STATISTICS.items() if s.group in groups or n in wanted)


def table_columns(names: Iterable[str]) -> tuple[str, ...]:
    """The statistics columns of a token table holding ``names``, in registry order."""
    wanted = set(names)
    return tuple(name for name in STATISTICS if name in wanted)


def summarised(names: Iterable[str]) -> tuple[str, ...]:
    """Those of ``names`` (besides the entropy) that the summary averages per (layer, site)."""
    wanted = set(names)
    return tuple(
        name for name, s in STATISTICS.items() if name in wanted and s.summary and s.group != "core"
    )


def charted() -> tuple[tuple[str, Chart], ...]:
    """``(name, chart)`` of every statistic with a per-layer chart, in registry order."""
    return tuple((name, s.chart) for name, s in STATISTICS.items() if s.chart is not None)


def parameters() -> dict[str, Parameter]:
    """Every statistic's parameters by name (one name, one meaning, across statistics)."""
    return {name: p for s in STATISTICS.values() for name, p in s.parameters.items()}


def statistic_facts(request: Request) -> dict[str, dict]:
    """What run.json records of a request's statistics: unit, definition and parameters."""
    out = {}
    for name in request.statistics:
        s = STATISTICS[name]
        out[name] = {"unit": s.unit, "definition": s.definition}
        out[name] |= {p: request.parameter(p) for p in s.parameters}
    return out


@dataclass(frozen=True)
class Request:
    """What one reduction call asks for: its statistics, top-k and reference policy.

    Attributes:
        statistics: names in :data:`STATISTICS` (``entropy`` first; others in any order).
        topk: K > 0 adds the K most probable token ids and their probabilities.
        reference: the (site, layer) of the reference policy (``final`` in the KL columns'
            names); None: the ``final`` site among the call's keys.
        parameters: values of the statistics' parameters (see :attr:`Statistic.parameters`);
            a parameter not given takes its default.
    """

    statistics: tuple[str, ...] = ("entropy",)
    topk: int = 0
    reference: tuple[str, int] | None = None
    parameters: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for name in self.statistics:
            statistic(name)
        known = parameters()
        for name, value in self.parameters:
            if name not in known:
                raise ValueError(f"unknown statistic parameter '{name}'")
            low, high = known[name].min, known[name].max
            if (low is not None and value < low) or (high is not None and value > high):
                raise ValueError(f"{name} must lie in [{low}, {high}], not {value}")
        if "entropy" not in self.statistics:
            object.__setattr__(self, "statistics", ("entropy", *self.statistics))

    @classmethod
    def of(cls, extras: bool = False, stats=None, topk: int = 0, **parameters) -> Request:
        """The request of a run: see :func:`resolve`; ``parameters`` by name."""
        given = tuple(sorted((k, float(v)) for k, v in parameters.items() if v is not None))
        return cls(resolve(extras, stats), topk, None, given)

    def needs(self, what: str) -> bool:
        """Whether a statistic asked for needs ``what`` (see :attr:`Statistic.needs`)."""
        return any(what in STATISTICS[name].needs for name in self.statistics)

    def parameter(self, name: str) -> float:
        """The value of parameter ``name``: as given, else its statistic's default."""
        given = dict(self.parameters)
        if name in given:
            return given[name]
        return parameters()[name].default
