"""pytest-benchmark: fastbb decode_boxes vs torchvision BoxCoder (+ clip) vs torch.compile, same inputs."""
from fastbb.benchmarks.runner import parametrize_cases
from fastbb.benchmarks import cases_box_decode


@parametrize_cases(cases_box_decode)
def test_box_decode(run_case, case, provider):
    run_case(case, provider)
