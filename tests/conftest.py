import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from internal_policy_lens import load_model  # noqa: E402
from internal_policy_lens.tiny import make_tiny_model  # noqa: E402

torch.set_num_threads(2)

# Real architecture configs at tiny sizes: Qwen2 (q/k/v biases), Qwen3 (q/k norm), Llama with
# untied and tied embeddings. Hidden and vocabulary sizes are not powers of two.
ARCHS = {
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    "llama": dict(arch="llama", tie_embeddings=False),
    "llama_tied": dict(arch="llama", tie_embeddings=True, d_model=60, n_heads=5, n_kv_heads=5),
}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for seed, (name, spec) in enumerate(ARCHS.items()):
        spec = dict(spec)
        out[name] = make_tiny_model(spec.pop("arch"), root / name, seed=seed, n_layers=3, **spec)
    return out


@pytest.fixture(scope="session", params=list(ARCHS))
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def models(tiny_dirs):
    cache = {}

    def get(name, dtype="float32"):
        if (name, dtype) not in cache:
            cache[name, dtype] = load_model(tiny_dirs[name], dtype=dtype, device="cpu")
        return cache[name, dtype]

    return get


TEXTS = [
    "Solve 12+7*3. First 7*3=21, then 12+21=33. \\boxed{33}",
    "What is 9-4?",
    "Let x=5; x*x=25 and 25+1=26.",
]
