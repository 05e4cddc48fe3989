"""AGVM's DDP comm hook on the mini detector (AGVMStepTrainer, the real step) in two spawned
ranks: every estimate's Φ and μ equal a reference from the ranks' local gradients gathered in
the test (float64, per half), and the ranks end bit-identical.

On a GPU the two processes share one GPU over a process group bound to CUDA only (backend
"cuda:gloo": any collective on a CPU tensor raises, as NCCL would), AMP off and on, and with
AdamW (Φ on Adam-preconditioned half means, PRECONDITION auto). The same check runs on CPU
gloo (AMP off, SGD and AdamW; marked ``ddp``, not ``cuda``) in the ordinary suite, so that the
check itself cannot rot on CPU-only CI. The NCCL variant, one GPU per rank, is
test_cuda_nccl.py."""

import pytest
from gpu_helpers import CUDA, assert_check, check_hook


@pytest.mark.parametrize("backend, device, amp, adam", [
    pytest.param("gloo", "cpu", False, False, id="gloo-cpu", marks=pytest.mark.ddp),
    pytest.param("gloo", "cpu", False, True, id="gloo-cpu-adamw", marks=pytest.mark.ddp),
    pytest.param("cuda:gloo", "cuda", False, False, id="cuda_gloo-amp_off", marks=CUDA),
    pytest.param("cuda:gloo", "cuda", True, False, id="cuda_gloo-amp_on", marks=CUDA),
    pytest.param("cuda:gloo", "cuda", False, True, id="cuda_gloo-adamw", marks=CUDA),
])
def test_hook_matches_gathered_reference(backend, device, amp, adam, record_property):
    assert_check(check_hook(backend, device, amp, 2, adam=adam), record_property)
