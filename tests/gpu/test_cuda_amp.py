"""tests/detectron2/test_step_safety.py's AMP overflow test on CUDA (float16 autocast, CUDA GradScaler): an
estimate iteration whose plain pass overflows (the GradScaler skips the step) leaves μ
unchanged. The logic stays in test_step_safety.py, beside its CPU (bfloat16) twin."""

from gpu_helpers import CUDA

pytestmark = CUDA


def test_amp_plain_pass_overflow_leaves_mu_unchanged_cuda(record_property):
    from test_step_safety import _amp_plain_pass_overflow  # tests/ is on sys.path (tests/conftest.py)

    record_property("detail", "test_step_safety._amp_plain_pass_overflow('cuda')")
    _amp_plain_pass_overflow("cuda")
