import os
from pathlib import Path

import pytest
import torch
from splitveil.precision import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("SPLITVEIL_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Decoded-data cache in a temporary folder: tests never touch the user's cache."""
    if "SPLITVEIL_CACHE" not in os.environ:
        os.environ["SPLITVEIL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "MNIST").exists():
        pytest.skip(f"real data not found at {DATA_ROOT} (set SPLITVEIL_DATA)")
    return DATA_ROOT


def tiny_config(**over):
    """A few-second run config on MNIST (tiny VGG11, few steps); ``over`` maps dotted fields to values."""
    from splitveil import config_from_dict

    tree = {
        "name": "t", "seed": 0, "device": "cpu", "progress": False,
        "data": {"name": "mnist", "root": str(DATA_ROOT), "train_size": 512, "test_size": 128, "aux_size": 256},
        "model": {"name": "vgg11_bn", "width": 0.125, "cut": 1},
        "train": {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0},
        "defense": {"name": "none"},
        "attacks": {"inverse_network": {"epochs": 3, "batch_size": 32, "channels": 32}},
        "eval": {"latency_repeats": 2, "latency_batch": 8, "recon_images": 4},
    }
    return config_from_dict(tree, [f"{k}={v}" for k, v in over.items()])


# Two kinds of golden-number tests:
# - tests/test_golden.py: the same runs in float32 against tests/data/golden/fp32.json, within a tolerance derived
#   from the measured run-to-run spread; they run on every CPU (see tests/golden.py);
# - the bf16 comparisons with the numbers of the code before the refactors (test_contract, test_results), recorded
#   on a Xeon with AMX-BF16. bf16 kernels differ bit-for-bit across CPU families (AMD EPYC: loss 2.1182 against
#   2.1216 after one epoch), so they run only on a CPU of the kind that recorded them (key: amx_bf16 in
#   precision.cpu_flags()) and are skipped with this reason elsewhere.
golden_cpu = pytest.mark.skipif("amx_bf16" not in cpu_flags(),
                                reason="bf16 golden numbers of the pre-refactor code were recorded on a CPU with "
                                       "AMX-BF16 and bf16 training differs bit-for-bit across CPU families; the "
                                       "float32 goldens of test_golden.py check the same runs on this CPU")
