"""``--device``: one reading for every command."""
import pytest
import torch

from smarttrim_cli.devices import resolve_device
from smarttrim_cli.errors import SmartTrimError


def test_device_names():
    gpu = torch.cuda.is_available()
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    for auto in (None, "", "auto", "AUTO"):
        assert resolve_device(auto, local_rank=1) == torch.device("cuda:1" if gpu else "cpu")
    for bad in ("tpu", "gpu", "cuda:x", "cpu:0", "meta"):
        with pytest.raises(SmartTrimError, match="--device must be cpu, cuda, cuda:N or auto"):
            resolve_device(bad)


def test_cuda_is_this_process_gpu_or_a_clear_error():
    if torch.cuda.is_available():
        assert resolve_device("cuda", local_rank=1) == torch.device("cuda:1")
        assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda:0")
    else:
        for d in ("cuda", "cuda:1"):
            with pytest.raises(SmartTrimError, match="CUDA is not available"):
                resolve_device(d)
