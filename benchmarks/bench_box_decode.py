"""pytest-benchmark: fastbb decode_boxes vs torchvision BoxCoder (+ clip) vs torch.compile, same inputs."""
import pytest
import torch

from fastbb.benchmarks import cases_box_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = cases_box_decode.cases(DEVICE)
PARAMS = [(case, provider) for case in CASES for provider in case["providers"]]


@pytest.mark.parametrize("case, provider", PARAMS, ids=[f"{c['name']}-{p}" for c, p in PARAMS])
def test_box_decode(benchmark, case, provider):
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
