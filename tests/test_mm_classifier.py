"""fastbb's mmpretrain classifier (fastbb.models.mm_classifier: ImageClassifier, GlobalAveragePooling,
ClsHead, LinearClsHead, CrossEntropyLoss) against the real mmpretrain 1.2 classes built from the same configs:
same state_dict keys, losses, gradients and predictions; fastbb.build of the config without mmpretrain; and
the config built through mmpretrain's registry with fastbb.mm imported (the backbone fastbb's)."""
import contextlib
import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbb
from fastbb._registry import lookup
from fastbb.models.mm_classifier import ClsPrediction

from conftest import assert_error_within, randomize_bn
from mm_support import require


def seed_config(num_classes=1000):
    """mmpretrain's ResNet-50 ImageNet classifier config (configs/_base_/models/resnet50.py)."""
    return dict(
        type="ImageClassifier",
        backbone=dict(type="ResNet", depth=50, num_stages=4, out_indices=(3,), style="pytorch"),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="LinearClsHead", num_classes=num_classes, in_channels=2048,
                  loss=dict(type="CrossEntropyLoss", loss_weight=1.0), topk=(1, 5)))


@contextlib.contextmanager
def unpatched():
    """mmpretrain's registry with its own classes: fastbb.mm's replacements taken out where it is imported."""
    mm = sys.modules.get("fastbb.mm")
    if mm is None:
        yield
        return
    mm.unregister()
    try:
        yield
    finally:
        mm.register()


def build_theirs(cfg):
    """mmpretrain's own model of cfg, built by its registry in its scope."""
    require("mmpretrain")
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    with unpatched(), DefaultScope.overwrite_default_scope("mmpretrain"):
        model = MODELS.build(copy.deepcopy(cfg))
    assert type(model).__module__.startswith("mmpretrain.")
    if cfg["type"] == "ImageClassifier" and isinstance(cfg["backbone"], dict):
        assert type(model.backbone).__module__.startswith("mmpretrain.")
    return model


def data_samples(labels=None, scores=None):
    """mmpretrain DataSamples holding each row of labels (gt_label) or scores (gt_score)."""
    from mmpretrain.structures import DataSample
    if labels is not None:
        return [DataSample().set_gt_label(int(label)) for label in labels]
    return [DataSample().set_gt_score(score) for score in scores]


@pytest.fixture(scope="module")
def seed_model():
    """mmpretrain's own model of the seed config."""
    return build_theirs(seed_config())


@pytest.fixture(scope="module")
def seed_state_shapes(seed_model):
    """{key: shape} of mmpretrain's own model of the seed config, in its order."""
    return {k: v.shape for k, v in seed_model.state_dict().items()}


def narrow_config():
    """The seed config with 10 classes and a quarter of the backbone's width (base_channels 16): the same
    modules, small enough for a forward and backward of four models in a second."""
    cfg = seed_config(num_classes=10)
    cfg["backbone"]["base_channels"] = 16
    cfg["head"]["in_channels"] = 512
    return cfg


def test_seed_config_has_mmpretrains_keys_and_weights(seed_model, seed_state_shapes):
    """The seed config: fastbb's classes, mmpretrain's keys (both ways, strictly), and from the same seed the
    same weights, before init_weights (PyTorch's defaults) and after it (mmpretrain's init_cfgs)."""
    torch.manual_seed(0)
    ours = fastbb.build(seed_config(), scope="mmpretrain")
    assert type(ours) is fastbb.models.ImageClassifier and type(ours.backbone) is lookup("ResNet", "mmpretrain")
    assert type(ours.backbone).__module__.startswith("fastbb.")
    assert type(ours.neck) is fastbb.models.GlobalAveragePooling
    assert type(ours.head) is fastbb.models.LinearClsHead
    assert type(ours.head.loss_module) is fastbb.models.CrossEntropyLoss
    assert {k: v.shape for k, v in ours.state_dict().items()} == seed_state_shapes
    assert list(ours.state_dict()) == list(seed_state_shapes)
    assert [k for k in seed_state_shapes if not k.startswith("backbone.")] == ["head.fc.weight", "head.fc.bias"]
    torch.manual_seed(0)
    theirs = build_theirs(seed_config())
    for initialised in (False, True):
        if initialised:
            for model in (ours, theirs):
                torch.manual_seed(1)
                model.init_weights()
        state = ours.state_dict()
        for key, value in theirs.state_dict().items():
            assert torch.equal(state[key], value), (initialised, key)
    # mmpretrain's head init: N(0, 0.01), bias 0
    assert ours.head.fc.bias.abs().max() == 0 and 0.0095 < float(ours.head.fc.weight.detach().std()) < 0.0105
    assert ours.is_init and ours.head.is_init
    with pytest.warns(UserWarning, match="more than once"):
        ours.init_weights()
    seed_model.load_state_dict(ours.state_dict())
    ours.load_state_dict(copy.deepcopy(seed_model.state_dict()))


def _randomized(theirs):
    """Non-trivial BN and a head whose scores separate the classes."""
    randomize_bn(theirs)
    with torch.no_grad():
        theirs.head.fc.weight.normal_(0, 0.05)
        theirs.head.fc.bias.uniform_(-0.5, 0.5)
    return theirs


def _step(model, mode, x, labels):
    """A forward, a loss (with backward) and a predict step in mode, in the model's dtype: (loss, {backbone.,
    head.: flattened parameter gradients}, predict's results, the BN running statistics afterwards, the
    forward's class scores)."""
    getattr(model, mode)()
    model.zero_grad()
    dtype = next(model.parameters()).dtype
    logits = model(x.to(dtype))
    losses = model(x.to(dtype), data_samples(labels), mode="loss")
    assert list(losses) == ["loss"]
    losses["loss"].backward()
    grads = {part: torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n.startswith(part)])
             for part in ("backbone.", "head.")}
    with torch.no_grad():
        results = model(x.to(dtype), mode="predict")
    running = torch.cat([b.flatten() for n, b in model.named_buffers() if "running" in n])
    return losses["loss"], grads, results, running, logits


def _scores(results):
    return torch.stack([r.pred_score for r in results])


def _compare(ours, theirs, modes, x, labels):
    """A forward, loss and predict step of fastbb's model and mmpretrain's (holding the same weights) in each
    mode, in float32 against a float64 run of mmpretrain's; and fastbb's own float64 run against that one,
    tightly.

    In float32, the class scores of a forward, the head's gradients and the running statistics are within
    twice mmpretrain's own error, the predicted scores within 2.5 times, and the labels equal. The loss is
    one number, the scores' error projected on one direction, so the ratio of its error to mmpretrain's is
    chance (up to 69 over 100 seeds, at errors up to 1.2e-5 of the loss): it is checked within 1e-4 of
    itself, and exactly in float64. The backbone's gradients are compared in float64 only: in float32 an
    element of a conv's output within rounding of 0 can take the other side of the ReLU in one model and
    not the other (fastbb folds BN into the conv, so its rounding differs from the unfused chain's), which
    moves that element's gradient by its full size; a ratio of errors over such events measures chance,
    not the implementation (seen up to 90x over 25 seeds, in either mode)."""
    exact, ours64 = copy.deepcopy(theirs).double(), copy.deepcopy(ours).double()
    for mode in modes:
        got, want, best, got64 = (_step(m, mode, x, labels) for m in (ours, theirs, exact, ours64))
        assert_error_within(got[4], want[4], best[4], name=f"{mode} class scores")
        assert_error_within(got[0], want[0], best[0], slack=1e-4, name=f"{mode} loss")
        assert_error_within(got[1]["head."], want[1]["head."], best[1]["head."], slack=1e-6,
                            name=f"{mode} head grads")
        # predict runs without autograd: fastbb's inference path (BN folded into the conv weights, channels_last
        # inside), whose rounding differs more (worst of 100 seeds: 2.04 times mmpretrain's error)
        assert_error_within(_scores(got[2]), _scores(want[2]), _scores(best[2]), 2.5, name=f"{mode} pred_score")
        assert_error_within(got[3], want[3], best[3], slack=1e-6, name=f"{mode} running statistics")
        assert [r.pred_label.tolist() for r in got[2]] == [r.pred_label.tolist() for r in want[2]] \
            == [r.pred_label.tolist() for r in best[2]]
        assert [type(r) for r in got[2]] == [type(r) for r in want[2]]
        assert [r.num_classes for r in got[2]] == [r.num_classes for r in want[2]]
        torch.testing.assert_close(got64[4], best[4], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got64[0], best[0], rtol=1e-10, atol=0)
        for part in ("backbone.", "head."):
            torch.testing.assert_close(got64[1][part], best[1][part], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(_scores(got64[2]), _scores(best[2]), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got64[3], best[3], rtol=1e-9, atol=1e-12)


def test_loss_gradients_and_predictions_equal_mmpretrains():
    """The seed config (narrow, 10 classes), in train then eval mode: the loss, the parameter gradients, the
    predicted scores and labels, and the batch-statistics updates of training."""
    theirs = _randomized(build_theirs(narrow_config()))
    ours = fastbb.build(narrow_config(), scope="mmpretrain")
    ours.load_state_dict(theirs.state_dict())
    _compare(ours, theirs, ("train", "eval"), torch.randn(4, 3, 64, 64), torch.tensor([7, 0, 3, 9]))


def _head_pair(cls_name, **kwargs):
    """(fastbb's, mmpretrain's) head of the same config, fastbb's holding mmpretrain's weights."""
    cfg = dict(type=cls_name, **kwargs)
    theirs = build_theirs(cfg)
    if cls_name == "LinearClsHead":
        with torch.no_grad():
            theirs.fc.bias.uniform_(-1, 1)
    ours = fastbb.build(cfg, scope="mmpretrain")
    assert type(ours) is getattr(fastbb.models, cls_name)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


_C = 6
LOSS_CASES = {
    # (loss config, which labels: class indices or target scores, or one-hot ones)
    "default": (dict(loss_weight=1.0), "labels"),
    "class_weight_loss_weight": (dict(loss_weight=0.5, class_weight=[0.5, 1, 2, 1, 0.25, 3]), "labels"),
    "target_scores": (dict(), "scores"),
    "soft": (dict(use_soft=True), "scores"),
    "soft_class_weight": (dict(use_soft=True, class_weight=[0.5, 1, 2, 1, 0.25, 3]), "scores"),
    "sigmoid": (dict(use_sigmoid=True), "one_hot"),
    "sigmoid_class_pos_weight": (dict(use_sigmoid=True, class_weight=[0.5, 1, 2, 1, 0.25, 3],
                                      pos_weight=[2, 1, 1, 3, 1, 0.5]), "scores"),
    "reduction_none": (dict(reduction="none"), "labels"),
    "sigmoid_reduction_none": (dict(use_sigmoid=True, reduction="none"), "one_hot"),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_cls_head_loss_options_equal_mmpretrains(case):
    """ClsHead.loss (the scores are the features) with each of CrossEntropyLoss's options: the same value,
    and the same gradient of the scores; with a label tensor in place of the DataSamples too."""
    require("mmpretrain")
    loss_cfg, target_kind = LOSS_CASES[case]
    ours, theirs = _head_pair("ClsHead", loss=dict(type="CrossEntropyLoss", **loss_cfg))
    scores = torch.randn(5, _C) * 3
    labels = torch.tensor([0, 5, 2, 2, 4])
    if target_kind == "labels":
        targets, samples = labels, data_samples(labels=labels)
    else:
        targets = F.one_hot(labels, _C).float() if target_kind == "one_hot" else torch.rand(5, _C).softmax(1)
        samples = data_samples(scores=targets)
    results = []
    for head, given in ((ours, samples), (ours, targets), (theirs, samples)):
        x = scores.clone().requires_grad_()
        loss = head.loss((x,), given)["loss"]
        loss.sum().backward()
        results.append((loss, x.grad))
    for got, want in zip(results[0] + results[1], results[2] * 2):
        assert got.shape == want.shape
        # the same PyTorch operations in the same order: the same bits
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cross_entropy_loss_call_options_equal_mmpretrains():
    """CrossEntropyLoss.forward's weight, avg_factor and reduction_override."""
    require("mmpretrain")
    ours, theirs = _head_pair("ClsHead", loss=dict(type="CrossEntropyLoss", class_weight=[1, 2, 3, 1, 1, 0.5]))
    ours, theirs = ours.loss_module, theirs.loss_module
    scores, labels, weight = torch.randn(4, _C), torch.tensor([1, 0, 5, 3]), torch.rand(4)
    for kwargs in (dict(weight=weight), dict(weight=weight, avg_factor=2.5), dict(reduction_override="sum"),
                   dict(weight=weight, reduction_override="none"), dict(avg_factor=3, reduction_override="none")):
        torch.testing.assert_close(ours(scores, labels, **kwargs), theirs(scores, labels, **kwargs), rtol=0, atol=0)
    sigmoid = fastbb.build(dict(type="CrossEntropyLoss", use_sigmoid=True), scope="mmpretrain")
    their_sigmoid = build_theirs(dict(type="CrossEntropyLoss", use_sigmoid=True))
    one_hot = F.one_hot(labels, _C)
    torch.testing.assert_close(sigmoid(scores, one_hot, weight=weight), their_sigmoid(scores, one_hot, weight=weight),
                               rtol=0, atol=0)


def test_linear_head_accuracy_equals_mmpretrains():
    """cal_acc: each 'accuracy_top-K' as mmpretrain gives it, a list of one (1,) tensor, counting a hit only
    where the raw score is above 0 (some of the right classes here have negative scores)."""
    require("mmpretrain")
    ours, theirs = _head_pair("LinearClsHead", num_classes=7, in_channels=16, cal_acc=True, topk=(1, 3, 7))
    feats = (torch.randn(20, 16),)
    labels = torch.randint(0, 7, (20,))
    got, want = ours.loss(feats, data_samples(labels=labels)), theirs.loss(feats, data_samples(labels=labels))
    assert list(got) == list(want) == ["loss", "accuracy_top-1", "accuracy_top-3", "accuracy_top-7"]
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert isinstance(got["accuracy_top-7"], list) and got["accuracy_top-7"][0].shape == (1,)
    # Not every label is counted at k = all classes: the threshold at 0 is applied
    assert float(got["accuracy_top-7"][0]) < 100.0


def test_predict_fills_mmpretrains_data_samples():
    """predict returns DataSamples as mmpretrain's: the given ones, filled in place; new ones for None; for a
    label tensor, new ones holding the labels."""
    require("mmpretrain")
    from mmpretrain.structures import DataSample
    ours, theirs = _head_pair("LinearClsHead", num_classes=5, in_channels=8)
    feats = (torch.randn(3, 8),)
    labels = torch.tensor([4, 0, 1])
    given = data_samples(labels=labels)
    got, want = ours.predict(feats, given), theirs.predict(feats, data_samples(labels=labels))
    assert all(g is s for g, s in zip(got, given))
    for g, w in zip(got, want):
        assert type(g) is DataSample and sorted(g.keys()) == sorted(w.keys())
        assert g.metainfo == w.metainfo
        for key in w.keys():
            torch.testing.assert_close(g.get(key), w.get(key), rtol=0, atol=0)
    for g, w in zip(ours.predict(feats, labels), want):
        assert type(g) is DataSample and torch.equal(g.gt_label, w.gt_label)
        assert torch.equal(g.pred_label, w.pred_label) and torch.equal(g.pred_score, w.pred_score)
    fresh = ours.predict(feats)
    assert all(type(g) is DataSample and "gt_label" not in g for g in fresh)
    assert [g.pred_label.tolist() for g in fresh] == [w.pred_label.tolist() for w in want]


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_global_average_pooling_equals_mmpretrains(dim):
    require("mmpretrain")
    ours = fastbb.build(dict(type="GlobalAveragePooling", dim=dim), scope="mmpretrain")
    theirs = build_theirs(dict(type="GlobalAveragePooling", dim=dim))
    feats = tuple(torch.randn(2, c, *[5] * dim) for c in (3, 4))
    got, want = ours(feats), theirs(feats)
    assert isinstance(got, tuple) and len(got) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(ours(feats[1]), theirs(feats[1]), rtol=0, atol=0)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == []


class _Features(nn.Module):
    """A stand-in backbone: the images' channel means as a one-stage feature tuple."""

    def forward(self, x):
        return (x.mean((2, 3)),)


def _tiny_classifier_cfg():
    return dict(type="ImageClassifier", backbone=_Features(),
                head=dict(type="LinearClsHead", num_classes=4, in_channels=3))


def _error_cases():
    ce = dict(type="CrossEntropyLoss")
    scores, labels = torch.randn(2, 4), torch.tensor([1, 3])
    return {
        "CrossEntropyLoss use_sigmoid and use_soft": (
            lambda build: build(dict(ce, use_sigmoid=True, use_soft=True)), "use_sigmoid"),
        "CrossEntropyLoss use_sigmoid with class indices": (
            lambda build: build(dict(ce, use_sigmoid=True))(scores, labels), "label"),
        "CrossEntropyLoss avg_factor with reduction sum": (
            lambda build: build(dict(ce, reduction="sum"))(scores, labels, avg_factor=2), "avg_factor"),
        "GlobalAveragePooling dim": (lambda build: build(dict(type="GlobalAveragePooling", dim=4)), "dim"),
        "GlobalAveragePooling list input": (
            lambda build: build(dict(type="GlobalAveragePooling"))([torch.zeros(1, 2, 3, 3)]), "inputs"),
        "LinearClsHead num_classes": (
            lambda build: build(dict(type="LinearClsHead", num_classes=0, in_channels=3)), "num_classes"),
        "ClsHead cal_acc with target scores": (
            lambda build: build(dict(type="ClsHead", cal_acc=True)).loss((scores,), data_samples(
                scores=torch.rand(2, 4))), "cal_acc"),
        "ClsHead top-k above the classes": (
            lambda build: build(dict(type="ClsHead", cal_acc=True, topk=(1, 5))).loss(
                (scores,), data_samples(labels=labels)), "Top-5"),
        "ImageClassifier mode": (
            lambda build: build(_tiny_classifier_cfg())(torch.zeros(1, 3, 4, 4), mode="logits"), "mode"),
        "ImageClassifier extract_feat stage": (
            lambda build: build(_tiny_classifier_cfg()).extract_feat(torch.zeros(1, 3, 4, 4), stage="head"),
            "stage"),
    }


ERROR_CASES = _error_cases()


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_have_mmpretrains_type_and_name_the_argument(case):
    require("mmpretrain")
    call, argument = ERROR_CASES[case]
    with pytest.raises(Exception) as theirs:
        call(build_theirs)
    with pytest.raises(type(theirs.value), match=argument) as ours:
        call(lambda cfg: fastbb.build(cfg, scope="mmpretrain"))
    assert str(ours.value).startswith("fastbb.models.")


@pytest.fixture
def without_mmpretrain(monkeypatch):
    """`import mmpretrain` (and any of its modules) fails for the test."""
    for name in [n for n in sys.modules if n == "mmpretrain" or n.startswith("mmpretrain.")] + ["mmpretrain"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        import mmpretrain  # noqa: F401


def test_seed_config_builds_without_mmpretrain(seed_state_shapes, without_mmpretrain):
    model = fastbb.build(seed_config(), scope="mmpretrain")
    assert {k: v.shape for k, v in model.state_dict().items()} == seed_state_shapes
    assert list(model.state_dict()) == list(seed_state_shapes)
    assert model.data_preprocessor is None
    model.eval()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([999, 3])
    with torch.no_grad():
        logits = model(x)
        losses = model(x, labels, mode="loss")
        results = model(x, labels, mode="predict")
    assert logits.shape == (2, 1000) and list(losses) == ["loss"]
    # mmpretrain's mean: the summed losses over the batch size
    torch.testing.assert_close(losses["loss"], F.cross_entropy(logits, labels, reduction="sum") / 2)
    assert [type(r) for r in results] == [ClsPrediction] * 2
    torch.testing.assert_close(torch.stack([r.pred_score for r in results]), logits.softmax(1))
    assert [r.pred_label.tolist() for r in results] == [[int(i)] for i in logits.argmax(1)]
    assert [r.gt_label.tolist() for r in results] == [[999], [3]]


def test_without_mmpretrain_what_needs_it_raises_naming_it(without_mmpretrain):
    with pytest.raises(KeyError, match="neck type 'GeneralizedMeanPooling'.*mmpretrain"):
        fastbb.build(dict(_tiny_classifier_cfg(), neck=dict(type="GeneralizedMeanPooling")), scope="mmpretrain")
    with pytest.raises(ValueError, match="data_preprocessor needs mmpretrain"):
        fastbb.build(dict(_tiny_classifier_cfg(), data_preprocessor=dict(mean=[0, 0, 0], std=[1, 1, 1])),
                     scope="mmpretrain")
    with pytest.raises(ValueError, match="train_cfg"):
        fastbb.build(dict(_tiny_classifier_cfg(), train_cfg=dict(augments=[dict(type="Mixup", alpha=0.8)])),
                     scope="mmpretrain")


def test_types_fastbb_lacks_are_mmpretrains_own():
    """A valid config whose neck fastbb has no class for still builds, with mmpretrain's (unfused) one."""
    require("mmpretrain")
    model = fastbb.build(dict(_tiny_classifier_cfg(), neck=dict(type="GeneralizedMeanPooling"),
                              data_preprocessor=dict(mean=[1, 2, 3], std=[2, 2, 2])), scope="mmpretrain")
    assert type(model.neck).__module__.startswith("mmpretrain.") and type(model.head) is fastbb.models.LinearClsHead
    assert type(model.data_preprocessor).__name__ == "ClsDataPreprocessor"
    assert list(model.state_dict()) == ["neck.p", "head.fc.weight", "head.fc.bias"]


def test_built_through_mmpretrains_registry_with_fastbb_mm():
    """With fastbb.mm imported, mmpretrain's registry builds the seed config with fastbb's backbone (and its own
    ImageClassifier, neck and head, which fastbb leaves in place): the same loss, gradients and predictions
    as the model built without fastbb.mm, in train mode (BN on batch statistics: mmpretrain's norm_eval)."""
    require("mmpretrain")
    import fastbb.mm
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope("mmpretrain"):
        patched = MODELS.build(seed_config())
        narrow = MODELS.build(narrow_config())
    assert "ResNet" in fastbb.mm.replaced()["mmpretrain"]
    for model in (patched, narrow):
        assert type(model.backbone) is lookup("ResNet", "mmpretrain")
        assert all(type(m).__module__.startswith("mmpretrain.") for m in (model, model.neck, model.head,
                                                                           model.head.loss_module))
    theirs = _randomized(build_theirs(narrow_config()))
    assert list(narrow.state_dict()) == list(theirs.state_dict())
    narrow.load_state_dict(theirs.state_dict())
    _compare(narrow, theirs, ("train",), torch.randn(4, 3, 64, 64), torch.tensor([1, 9, 4, 4]))
