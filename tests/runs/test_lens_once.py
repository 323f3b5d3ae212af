"""One lens per run: precision chosen, unembedding cast and lens folder read once, not per batch."""

import json

import pandas as pd
import torch

from internal_policy_lens.commands import entropy
from internal_policy_lens.commands.entropy import run_entropy
from internal_policy_lens.config import EntropyConfig, FitLensConfig
from internal_policy_lens.lens import stats, tuned, unembed
from internal_policy_lens.lens.fit import fit_lens
from internal_policy_lens.tables import entropy_table

SITES = ["resid_pre", "resid_post", "final"]


def _counting(monkeypatch, module, name, calls):
    """Replace ``module.name`` by a wrapper that appends each call's first argument to calls."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def test_a_run_of_several_batches_makes_one_lens(tiny_dirs, models, tmp_path, monkeypatch):
    records = [
        {"prompt": f"{i}+1?", "response": f"{i + 1} is it", "sample_id": i} for i in range(4)
    ]
    lens_dir = tmp_path / "lens"
    fit_lens(models("llama"), records, FitLensConfig(out=str(lens_dir), steps=0), progress=False)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    # An exact run of a bf16 model: each lens casts the unembedding to a float32 copy.
    cfg = EntropyConfig(
        model=str(tiny_dirs["llama"]),
        data=str(data),
        out=str(tmp_path / "run"),
        lens="tuned",
        lens_path=str(lens_dir),
        sites=SITES,
        dtype="bfloat16",
        precision="exact",
        batch_size=1,
        topk=0,
    )
    lenses, reads, precisions, batches = [], [], [], []
    _counting(monkeypatch, unembed.Lens, "__init__", lenses)
    _counting(monkeypatch, tuned, "read_lens", reads)
    _counting(monkeypatch, unembed, "choose_precision", precisions)
    if hasattr(entropy, "choose_precision"):  # where a run chooses its precision by itself
        _counting(monkeypatch, entropy, "choose_precision", precisions)
    _counting(monkeypatch, stats, "site_stats", batches)
    run = run_entropy(cfg, progress=False)

    assert len(batches) >= len(records)  # every batch reached the reductions...
    the_lens = batches[0]
    assert all(p is the_lens for p in batches)  # ...through one lens
    assert len(lenses) == 1 and len(reads) == 1 and len(precisions) == 1
    model = models("llama", "bfloat16")
    assert the_lens.weight.dtype == torch.float32  # the one cast of the bf16 unembedding
    assert the_lens.weight.data_ptr() != model.unembed.weight.data_ptr()

    info = json.loads((tmp_path / "run" / "run.json").read_text())
    want = unembed.choose_precision("exact", torch.bfloat16, "cpu", model.d_model).record()
    assert info["precision"] == want
    assert info["precision"]["products"] == "float32" == info["precision"]["reductions"]
    assert info["lens"] == {
        "name": "tuned",
        "path": str(lens_dir),
        "sha256": tuned.folder_hash(lens_dir),
    }
    # The public call without a lens makes its own, and gives the run's rows.
    monkeypatch.undo()
    alone = entropy_table(
        model,
        records,
        lens="tuned",
        lens_path=str(lens_dir),
        sites=SITES,
        precision="exact",
        response_only=True,
        batch_size=1,
    )
    pd.testing.assert_frame_equal(run.tokens, alone, check_dtype=False, check_categorical=False)
