"""pytest-benchmark: fastbb FPN merges and FeaturePyramidNetwork vs eager, torch.compile and torchvision."""
from fastbb.benchmarks.runner import parametrize_cases
from fastbb.benchmarks import cases_fpn


@parametrize_cases(cases_fpn)
def test_fpn(run_case, case, provider):
    run_case(case, provider)
