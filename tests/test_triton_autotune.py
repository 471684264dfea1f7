"""The autotuning switch (FASTBB_TRITON_AUTOTUNE) and the config lists of the autotuned Triton kernels,
checked on the CPU without launching: the GPU launchers are driven with tensors on the meta device and
the autotuner's launch is recorded instead of run. (tests/triton_compile.py compiles every config.)"""
import pytest
import torch
from triton.runtime.autotuner import Autotuner

from fastbb.kernels import _common, conv2d_epilogue, fpn_merge

TUNED = {
    "fpn_merge": fpn_merge._FPN_MERGE,
    "fpn_merge float64": fpn_merge._FPN_MERGE_FP64,
    "conv2d_epilogue": conv2d_epilogue._CONV,
    "conv2d_epilogue float64": conv2d_epilogue._CONV_FP64,
}


@pytest.fixture
def autotune(monkeypatch):
    def set_switch(value):
        if value is None:
            monkeypatch.delenv(_common.AUTOTUNE_VARIABLE, raising=False)
        else:
            monkeypatch.setenv(_common.AUTOTUNE_VARIABLE, value)
    return set_switch


@pytest.mark.parametrize("value, expected", [(None, True), ("1", True), ("0", False)])
def test_switch_values(autotune, value, expected):
    autotune(value)
    assert _common.autotune_enabled() is expected


@pytest.mark.parametrize("value", ["", "off", "false", "2"])
def test_switch_rejects_other_values(autotune, value):
    autotune(value)
    with pytest.raises(ValueError, match="FASTBB_TRITON_AUTOTUNE must be 0"):
        _common.autotune_enabled()


@pytest.mark.parametrize("name", TUNED)
def test_pinned_config_is_one_of_the_list(name):
    tuned = TUNED[name]
    assert tuned.pinned in tuned.configs
    assert len(set(map(str, tuned.configs))) == len(tuned.configs), f"{name}: a config is listed twice"


@pytest.mark.parametrize("name", TUNED)
def test_launcher_follows_the_switch(autotune, name):
    tuned = TUNED[name]
    autotune("1")
    tuning = tuned.launcher()
    assert list(tuning.configs) == list(tuned.configs)
    autotune("0")
    pinned = tuned.launcher()
    assert list(pinned.configs) == [tuned.pinned]
    assert pinned is tuned.launcher() and pinned is not tuning  # one launcher, one tuning cache, per state
    autotune("1")
    assert tuned.launcher() is tuning


def test_a_pinned_config_outside_the_list_is_refused():
    configs = list(fpn_merge._FPN_MERGE_CONFIGS[:2])
    with pytest.raises(ValueError, match="_fpn_merge_kernel: the pinned config"):
        _common.TunedKernel(fpn_merge._fpn_merge_kernel, configs, fpn_merge._FPN_MERGE_CONFIGS[2], key=["Cin"])


def test_float64_operand_tiles_fit_in_96_kib():
    # Triton's pipeliner keeps stages - 1 buffers of the A and B tiles in shared memory (what the compile
    # check measures): 256 KiB for 128 x 128 x 64 at 3 stages in float64, over every GPU's limit
    for tuned in (fpn_merge._FPN_MERGE_FP64, conv2d_epilogue._CONV_FP64):
        for config in tuned.configs:
            kw = config.kwargs
            tile_bytes = (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * 8
            assert (config.num_stages - 1) * tile_bytes <= 96 * 1024, str(config)


def _recorded_configs(monkeypatch, launch):
    """Call launch() with the launchers' GPU path and record the configs of the autotuner it launches."""
    launches = []

    def record(tuner, *args, **kwargs):
        launches.append((tuner.fn, list(tuner.configs)))

    monkeypatch.setattr(Autotuner, "run", record)
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(fpn_merge, "INTERPRET", False)
    monkeypatch.setattr(conv2d_epilogue, "INTERPRET", False)
    launch()
    assert len(launches) == 1
    return launches[0]


def _fpn_merge(dtype):
    x = torch.empty((2, 64, 20, 30), dtype=dtype, device="meta")
    weight = torch.empty((32, 64, 1, 1), dtype=dtype, device="meta")
    top = torch.empty((2, 32, 10, 15), dtype=dtype, device="meta")
    return lambda: fpn_merge.fpn_merge(x, weight, None, top)


def _conv2d_epilogue(dtype):
    x = torch.empty((2, 64, 20, 30), dtype=dtype, device="meta", memory_format=torch.channels_last)
    weight = torch.empty((32, 64, 3, 3), dtype=dtype, device="meta")
    scale = torch.empty((32,), device="meta")
    return lambda: conv2d_epilogue.conv2d_epilogue(x, weight, scale, scale, None, True, 1, 1, 1)


@pytest.mark.parametrize("launch, kernel, tuned", [
    pytest.param(_fpn_merge, fpn_merge._fpn_merge_kernel, {torch.float64: fpn_merge._FPN_MERGE_FP64, None: fpn_merge._FPN_MERGE},
                 id="fpn_merge"),
    pytest.param(_conv2d_epilogue, conv2d_epilogue._conv2d_epilogue_kernel,
                 {torch.float64: conv2d_epilogue._CONV_FP64, None: conv2d_epilogue._CONV}, id="conv2d_epilogue"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("switch", ["1", "0"], ids=["autotune", "pinned"])
def test_gpu_launch_uses_the_dtypes_configs(monkeypatch, autotune, launch, kernel, tuned, dtype, switch):
    autotune(switch)
    expected = tuned.get(dtype, tuned[None])
    fn, configs = _recorded_configs(monkeypatch, launch(dtype))
    assert fn is kernel
    assert configs == (list(expected.configs) if switch == "1" else [expected.pinned])

