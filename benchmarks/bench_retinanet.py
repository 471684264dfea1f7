"""pytest-benchmark: the whole RetinaNet R50-FPN, fastbb vs torchvision eager and torch.compile."""
from fastbb.benchmarks.runner import parametrize_cases
from fastbb.benchmarks import cases_retinanet


@parametrize_cases(cases_retinanet)
def test_retinanet(run_case, case, provider):
    run_case(case, provider)
