"""pytest-benchmark: fastbb retinanet_postprocess vs torchvision postprocess_detections on the same inputs."""
from fastbb.benchmarks.runner import parametrize_cases
from fastbb.benchmarks import cases_retinanet_postprocess


@parametrize_cases(cases_retinanet_postprocess)
def test_retinanet_postprocess(run_case, case, provider):
    run_case(case, provider)
