"""The timed call every bench_<op>.py shares (parametrize with runner.parametrize_cases)."""
import pytest
import torch

from fastbb.benchmarks.runner import DEVICE


@pytest.fixture
def run_case(benchmark):
    """Time one provider of one case; cases of a name share a pytest-benchmark group."""
    def run(case, provider):
        benchmark.group = case["name"]
        fn = case["providers"][provider]
        fn()  # warm-up (and compilation for torch.compile)
        if DEVICE == "cuda":
            def synchronized():
                fn()
                torch.cuda.synchronize()
            benchmark(synchronized)
        else:
            benchmark(fn)
    return run
