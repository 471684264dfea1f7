"""fastbb.build: OpenMMLab-style configs."""
import pytest

import fastbb


def test_build_known_type_passes_arguments():
    coder = fastbb.build(dict(type="DeltaXYWHBBoxCoder", target_stds=(0.1, 0.1, 0.2, 0.2)))
    assert isinstance(coder, fastbb.nn.DeltaXYWHBBoxCoder)
    assert tuple(coder.stds) == (0.1, 0.1, 0.2, 0.2)


def test_build_does_not_modify_the_config():
    cfg = dict(type="DeltaXYWHBBoxCoder", clip_border=False)
    fastbb.build(cfg)
    assert cfg == dict(type="DeltaXYWHBBoxCoder", clip_border=False)


def test_build_unknown_type_names_it():
    with pytest.raises(KeyError, match="unknown type 'NoSuchCoder'"):
        fastbb.build(dict(type="NoSuchCoder"))


def test_build_bad_key_names_it():
    with pytest.raises(TypeError, match=r"unexpected key\(s\) \['target_stdz'\]"):
        fastbb.build(dict(type="DeltaXYWHBBoxCoder", target_stdz=(1, 1, 1, 1)))


def test_build_needs_a_dict_with_type():
    with pytest.raises(KeyError, match="must have a 'type' key"):
        fastbb.build(dict(target_stds=(1, 1, 1, 1)))
    with pytest.raises(TypeError, match="cfg must be a dict"):
        fastbb.build("DeltaXYWHBBoxCoder")


def test_register_rejects_a_second_class_under_one_name():
    with pytest.raises(KeyError, match="already registered"):
        @fastbb.register("DeltaXYWHBBoxCoder")
        class Other:
            pass
