"""pytest-benchmark: fastbb retinanet_postprocess vs torchvision postprocess_detections on the same inputs."""
import pytest
import torch

from fastbb.benchmarks import cases_retinanet_postprocess

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = cases_retinanet_postprocess.cases(DEVICE)
PARAMS = [(case, provider) for case in CASES for provider in case["providers"]]


@pytest.mark.parametrize("case, provider", PARAMS, ids=[f"{c['name']}-{p}" for c, p in PARAMS])
def test_retinanet_postprocess(benchmark, case, provider):
    benchmark.group = case["name"]
    fn = case["providers"][provider]
    fn()  # warm-up
    if DEVICE == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(fn)
