"""pytest-benchmark: fastbb sigmoid focal loss vs torchvision vs torch.compile, same inputs, fwd + bwd."""
from fastbb.benchmarks.runner import parametrize_cases
from fastbb.benchmarks import cases_focal_loss


@parametrize_cases(cases_focal_loss)
def test_focal_loss(run_case, case, provider):
    run_case(case, provider)
