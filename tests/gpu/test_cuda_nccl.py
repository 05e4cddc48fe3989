"""test_cuda_hook.py's check over NCCL, one GPU per rank (skips with fewer GPUs visible)."""

import pytest
from gpu_helpers import assert_check, check_hook, gpus


@pytest.mark.parametrize("world", [pytest.param(w, id=f"world{w}", marks=gpus(w)) for w in (2, 4)])
def test_nccl_hook_matches_gathered_reference(world, record_property):
    assert_check(check_hook("nccl", "cuda", False, world), record_property)
