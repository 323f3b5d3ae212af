"""Device hygiene without a GPU: every command's code runs with stray tensors sent elsewhere.

Inside :func:`device_guard.stray_tensors_elsewhere` a tensor made without a device lands on
``meta`` while the model stays on the CPU, so code that would mix the CPU with CUDA on a GPU
raises here (what it cannot see is in device_guard's docstring).
"""

import pandas as pd
import pytest
import torch
from device_guard import MIXED, stray_tensors_elsewhere
from helpers import (
    TEXTS,
    alternating_reward,
    lens_folder,
    random_translators,
    tiny_bupo_config,
    trl_trainer,
)

from internal_policy_lens import entropy_table, load_model, run_with_cache
from internal_policy_lens.config import FitLensConfig
from internal_policy_lens.lens.fit import fit_lens
from internal_policy_lens.lens.tuned import fitted_keys
from internal_policy_lens.train import loop
from internal_policy_lens.train.loss import group_advantages, policy_loss

RECORDS = [
    {"sample_id": i, "prompt": f"What is {i}+{i}?", "response": f"{i}+{i}={2 * i}."}
    for i in range(6)
]


def _guarded(fn):
    def run(*args, **kwargs):
        with stray_tensors_elsewhere():
            return fn(*args, **kwargs)

    return run


def test_the_guard_catches_advantages_left_on_the_host():
    # The crash seen at the first CUDA update: advantages made with torch.tensor (the default
    # device) met the ratio on the model's device in policy_loss.
    logp = torch.randn(4, 3)  # on the model's device (the CPU here)
    mask = torch.ones(4, 3)
    with stray_tensors_elsewhere(), pytest.raises((RuntimeError, NotImplementedError), match=MIXED):
        advantages = group_advantages(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).view(-1)
        policy_loss(logp, logp.detach(), advantages, mask)
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0, 1.0, -1.0]), mask)
    assert torch.isfinite(loss)  # the same call with the advantages beside the data runs


def test_builtin_training_with_probes_and_kl_is_device_clean(
    models, tiny_dirs, data_file, tmp_path, monkeypatch
):
    cfg = tiny_bupo_config(tiny_dirs, data_file, tmp_path / "run", probe_every=1, kl_coef=0.1)
    model = models("qwen2")
    # Loading reads weights (transformers refuses a meta default device): the reference model
    # of the KL term is loaded before the guard, as the policy is.
    ref = load_model(cfg.model, dtype="float32", device="cpu")
    ref.bridge.requires_grad_(False)
    monkeypatch.setattr(loop, "_reference_model", lambda cfg: ref)
    state = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    records = loop.training_records(cfg)
    try:
        with stray_tensors_elsewhere():
            loop._train(cfg, model, 1, records, alternating_reward(), False)
    finally:
        model.hf_model.load_state_dict(state)  # the fixture's model is shared
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and (tmp_path / "run" / "probes.parquet").is_file()


@pytest.mark.parametrize("lens", ["raw", "norm", "tuned"])
def test_entropy_table_is_device_clean(models, tmp_path, lens):
    model = models("llama")
    path = None
    if lens == "tuned":
        keys = fitted_keys(["resid_pre", "resid_post", "mlp_out"], model.n_layers)
        path = lens_folder(model, tmp_path / "lens", random_translators(model, keys))
    sites = ["resid_pre", "resid_post", "mlp_out", "final"] if lens == "tuned" else None
    kw = dict(lens=lens, lens_path=path, sites=sites, extras=True, topk=3, chunk_tokens=7)
    tokens, top = entropy_table(model, TEXTS, **kw)
    with stray_tensors_elsewhere():
        guarded_tokens, guarded_top = entropy_table(model, TEXTS, **kw)
    pd.testing.assert_frame_equal(tokens, guarded_tokens)
    pd.testing.assert_frame_equal(top, guarded_top)


def test_model_call_and_run_with_cache_are_device_clean(models):
    model = models("qwen3")
    logits, cache = run_with_cache(model, TEXTS[:2])
    with stray_tensors_elsewhere():
        guarded = model(TEXTS[:2])
        guarded_cached, guarded_cache = run_with_cache(model, TEXTS[:2])
    assert torch.equal(logits, guarded) and torch.equal(logits, guarded_cached)
    assert all(torch.equal(cache[k], guarded_cache[k]) for k in cache)


def test_fit_lens_and_its_evaluation_are_device_clean(models, tmp_path):
    model = models("qwen2")
    cfg = FitLensConfig(out=str(tmp_path / "lens"), steps=3, save_every=2, batch_tokens=32)
    with stray_tensors_elsewhere():
        meta = fit_lens(model, RECORDS, cfg, progress=False)
    assert {r["lens"] for r in meta["heldout"]["evaluation"]} == {"norm", "tuned"}


@pytest.mark.slow
def test_trl_steps_and_probes_are_device_clean(tiny_dirs, data_file, tmp_path):
    # TRL's and torch's own loop (data loader, accelerate) make host tensors on purpose: the
    # guard covers the package's parts, the pi^k log-probs and the probe callback.
    from internal_policy_lens.integrations.trl import InternalPolicyCallback

    cfg = tiny_bupo_config(
        tiny_dirs, data_file, tmp_path / "run", prompts_per_step=1, mini_batch_size=4
    )
    trainer = trl_trainer(cfg, layer=1)
    probes = InternalPolicyCallback(1, str(data_file), 2, 1, "raw", output_dir=tmp_path / "run")
    trainer.add_callback(probes)
    name = "_get_per_token_logps_and_entropies"
    setattr(trainer, name, _guarded(getattr(trainer, name)))
    probes.on_train_begin = _guarded(probes.on_train_begin)
    probes.on_step_end = _guarded(probes.on_step_end)
    trainer.train()
    steps = pd.read_parquet(tmp_path / "run" / "probes.parquet")["step"]
    assert sorted(steps.unique()) == [0, 1, 2]
