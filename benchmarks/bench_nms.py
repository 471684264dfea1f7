"""pytest-benchmark: fastbb nms, batched_nms and nms_sorted_padded vs torchvision on the same inputs."""
from fastbb.benchmarks.runner import parametrize_cases
from fastbb.benchmarks import cases_nms


@parametrize_cases(cases_nms)
def test_nms(run_case, case, provider):
    run_case(case, provider)
