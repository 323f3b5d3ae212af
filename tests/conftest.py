import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The Triton kernel's tests run it under Triton's interpreter where there is no CUDA GPU. The
# setting must precede Triton's first import in this process (its own jit'd library functions,
# tl.max and the like, are made then), and other packages (TRL among them) import Triton, so it
# is made here, before anything else is imported. It changes nothing outside Triton's kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from helpers import ARCHS, FAMILY_ARCHS, FAMILY_SIZES, seed_everything, write_problems  # noqa: E402

from internal_policy_lens import load_model  # noqa: E402
from internal_policy_lens.model.tiny import make_tiny_model  # noqa: E402

# Two threads in all: one per process under pytest -n 2 (pytest-xdist), so that the workers do
# not oversubscribe the cores.
torch.set_num_threads(max(1, 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, saying why, where torch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    reason = (
        "no CUDA GPU: torch " + torch.__version__ + " sees none (a CPU build, or no device); "
        "run analyses/device_check.sh on a GPU machine"
    )
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state."""
    seed_everything(0)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for seed, (name, spec) in enumerate(ARCHS.items()):
        spec = dict(spec)
        out[name] = make_tiny_model(spec.pop("arch"), root / name, seed=seed, n_layers=3, **spec)
    return out


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """A tiny random model of every further family (built on first use)."""
    root = tmp_path_factory.mktemp("families")
    out = {}

    def get(name):
        if name not in out:
            seed = 100 + FAMILY_ARCHS.index(name)
            out[name] = make_tiny_model(name, root / name, seed=seed, **FAMILY_SIZES)
        return out[name]

    return get


@pytest.fixture(scope="session")
def family_models(family_dirs):
    cache = {}

    def get(name, dtype="float32"):
        if (name, dtype) not in cache:
            cache[name, dtype] = load_model(family_dirs(name), dtype=dtype, device="cpu")
        return cache[name, dtype]

    return get


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


@pytest.fixture
def data_file(tmp_path):
    """Twelve verifiable training problems."""
    return write_problems(tmp_path / "train.jsonl", 12)
