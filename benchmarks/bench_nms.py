"""pytest-benchmark: fastbb nms, batched_nms and nms_sorted_padded vs torchvision on the same inputs."""
import pytest
import torch

from fastbb.benchmarks import cases_nms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = cases_nms.cases(DEVICE)
PARAMS = [(case, provider) for case in CASES for provider in case["providers"]]


@pytest.mark.parametrize("case, provider", PARAMS, ids=[f"{c['name']}-{p}" for c, p in PARAMS])
def test_nms(benchmark, case, provider):
    benchmark.group = case["name"]
    fn = case["providers"][provider]
    fn()  # warm-up (and compilation for torch.compile)
    if DEVICE == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(fn)
