"""pytest-benchmark: fastbb's batched RetinaNet training loss vs torchvision's anchors + compute_loss."""
from fastbb.benchmarks.runner import parametrize_cases
from fastbb.benchmarks import cases_retinanet_loss


@parametrize_cases(cases_retinanet_loss)
def test_retinanet_loss(run_case, case, provider):
    run_case(case, provider)
