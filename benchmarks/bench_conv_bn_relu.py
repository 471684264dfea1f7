"""pytest-benchmark: fastbb conv + BN + ReLU and ResNet-50 vs eager, torchvision and torch.compile."""
from fastbb.benchmarks.runner import parametrize_cases
from fastbb.benchmarks import cases_conv_bn_relu


@parametrize_cases(cases_conv_bn_relu)
def test_conv_bn_relu(run_case, case, provider):
    run_case(case, provider)
