"""pytest-benchmark: OpenMMLab's own configs with fastbb.mm vs without (the packages' own classes)."""
from fastbb.benchmarks.runner import parametrize_cases
from fastbb.benchmarks import cases_mm


@parametrize_cases(cases_mm)
def test_mm(run_case, case, provider):
    run_case(case, provider)
