"""AGVM changes training only through μ (issue: estimate iterations that train like plain steps).

On every detectron2 meta-architecture, built tiny on CPU: an AGVM estimate iteration with μ = 1
leaves the parameters, optimizer state, BN buffers and loss normalisers exactly where a plain
iteration leaves them; MEASURE_ONLY training equals plain training; Φ equals an independent
reference from two separately evaluated half-batch gradients; gradient accumulation gives the
same step and Φ as the unaccumulated run.
"""

import copy

import pytest
import torch

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from agvm.core.optim import AGVM
from agvm.core.sandbox import UnaccountedStateError, preserved_state
from agvm.detectron2 import AGVMStepTrainer, add_agvm_config, build_agvm_optimizer
from agvm.detectron2.resume import set_data_iterator
from zoo import IMAGE, build_lazy_model, num_keypoints, tiny_batch

FAMILIES = {
    "faster_rcnn_fpn": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
    "faster_rcnn_c4": "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml",
    "cascade": "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
    "mask_rcnn": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "keypoint_rcnn": "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml",
    "retinanet": "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
    "fcos": "common/models/fcos.py",
    "semantic_fpn": "Misc/semantic_R_50_FPN_1x.yaml",
    "panoptic_fpn": "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml",
}


def _cfg(family, norm="FrozenBN", **agvm):
    cfg = get_cfg()
    add_agvm_config(cfg)
    name = FAMILIES[family]
    if name.endswith(".yaml"):
        cfg.merge_from_file(model_zoo.get_config_file(name))
    m = cfg.MODEL
    m.DEVICE, m.WEIGHTS = "cpu", ""
    m.RESNETS.DEPTH, m.RESNETS.RES2_OUT_CHANNELS, m.RESNETS.NORM = 18, 64, norm
    m.RPN.POST_NMS_TOPK_TRAIN = 64
    m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    if family == "faster_rcnn_c4":  # the res5 head runs per RoI: keep it small
        m.ROI_BOX_HEAD.POOLER_RESOLUTION = 6
    m.ROI_HEADS.NUM_CLASSES = m.RETINANET.NUM_CLASSES = 3
    m.SEM_SEG_HEAD.NUM_CLASSES = 4
    m.SEM_SEG_HEAD.CONVS_DIM = 32
    m.FPN.OUT_CHANNELS = 32
    m.ROI_BOX_HEAD.FC_DIM, m.ROI_MASK_HEAD.CONV_DIM, m.ROI_KEYPOINT_HEAD.CONV_DIMS = 64, 32, (32, 32)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (IMAGE,), IMAGE
    cfg.SOLVER.BASE_LR, cfg.SOLVER.MOMENTUM = 1e-3, 0.9
    cfg.SOLVER.AGVM.ENABLED = bool(agvm)
    cfg.SOLVER.AGVM.START_ITER = 0
    cfg.SOLVER.AGVM.INTERVAL = 1
    for k, v in agvm.items():
        cfg.SOLVER.AGVM[k] = v
    return cfg


def _model(family, cfg):
    torch.manual_seed(0)
    if family == "fcos":
        model = build_lazy_model(FAMILIES[family])
        if cfg.MODEL.RESNETS.NORM == "BN":  # the lazy config is FrozenBN: swap in trainable BN
            from detectron2.layers import FrozenBatchNorm2d

            def unfreeze(module):
                for name, child in module.named_children():
                    if isinstance(child, FrozenBatchNorm2d):
                        setattr(module, name, torch.nn.BatchNorm2d(child.num_features))
                    else:
                        unfreeze(child)

            unfreeze(model.backbone)
        return model
    return build_model(cfg)


def _batches(model, n=4, count=1):
    kp = num_keypoints(model)
    return [tiny_batch(num_classes=3, n=n, keypoints=kp, seed=s) for s in range(count)]


def _trainer(family, batches, accum=1, norm="FrozenBN", **agvm):
    cfg = _cfg(family, norm, **agvm)
    model = _model(family, cfg)
    model.train()
    step = AGVMStepTrainer(model, batches, build_agvm_optimizer(cfg, model), accum_steps=accum)
    set_data_iterator(step, iter(step.data_loader))
    return step


def _run(step, iters, seed=1, record=None):
    torch.manual_seed(seed)
    with EventStorage(0) as storage:
        for it in range(iters):
            storage.iter = step.iter = it
            step.run_step()
            if record is not None:
                record(it, storage)
    return storage


def _scalars(model):
    """Python-number attributes of every submodule (e.g. loss_normalizer)."""
    return {
        (path, k): v for path, m in model.named_modules() for k, v in vars(m).items()
        if isinstance(v, float) and not k.startswith("_")
    }


def _rel(a, b):
    a, b = a.double(), b.double()
    scale = b.norm()
    return float((a - b).norm() / scale) if scale > 0 else float((a - b).norm())


def _assert_same_state(a: AGVMStepTrainer, b: AGVMStepTrainer, tol):
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    worst = max(_rel(pa[k], pb[k]) for k in pb)
    assert worst <= tol, f"parameters differ: rel {worst:.2e}"
    ba, bb = dict(a.model.named_buffers()), dict(b.model.named_buffers())
    assert ba.keys() == bb.keys()
    for k in bb:
        assert _rel(ba[k], bb[k]) <= tol, f"buffer {k}"
    sa, sb = _scalars(a.model), _scalars(b.model)
    assert sa.keys() == sb.keys() and all(sa[k] == pytest.approx(sb[k], rel=tol) for k in sb), (sa, sb)
    state_a, state_b = a.optimizer.state, b.optimizer.state
    for p_a, p_b in zip(a.model.parameters(), b.model.parameters()):
        if p_b in state_b:
            mb = state_b[p_b]["momentum_buffer"]
            assert _rel(state_a[p_a]["momentum_buffer"], mb) <= tol


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.fast) if f == "faster_rcnn_fpn" else f
                                    for f in FAMILIES])
def test_estimate_iteration_is_a_plain_step(family, norm):
    """One AGVM estimate iteration with μ = 1 (MEASURE_ONLY) = one plain iteration: parameters,
    momentum, BN running statistics, loss normalisers (exactly: the step is the plain pass)."""
    model = _model(family, _cfg(family, norm))
    batches = _batches(model)
    plain = _trainer(family, batches, norm=norm)
    estimate = _trainer(family, batches, norm=norm, MEASURE_ONLY=True)
    assert isinstance(estimate.optimizer, AGVM) and not isinstance(plain.optimizer, AGVM)
    _run(plain, 1)
    storage = _run(estimate, 1)
    assert estimate.optimizer.modulator.num_updates == 1
    assert "agvm/phi/backbone" in storage.histories()
    _assert_same_state(estimate, plain, tol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_measure_only_training_is_plain_training(family):
    """Five MEASURE_ONLY iterations at τ = 1 (BN, trainable) end where plain training ends,
    and Φ of every module was logged at every iteration."""
    model = _model(family, _cfg(family, "BN"))
    batches = _batches(model, count=5)
    plain = _trainer(family, batches, norm="BN")
    measured = _trainer(family, batches, norm="BN", MEASURE_ONLY=True)
    _run(plain, 5)
    logged = {}

    def record(it, storage):
        logged[it] = {k for k, h in storage.histories().items() if k.startswith("agvm/phi/") and h.values()[-1][1] == it}

    _run(measured, 5, record=record)
    _assert_same_state(measured, plain, tol=1e-6)
    modules = measured.optimizer.modulator.modules
    assert all(logged[it] == {f"agvm/phi/{m}" for m in modules} for it in range(5)), logged


def _module_grads(step):
    out = {}
    for m, params in step.optimizer.params_by_module().items():
        out[m] = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    return out


def _one_minus_cos(a, b):
    a = torch.cat([t.reshape(-1) for t in a]).double()
    b = torch.cat([t.reshape(-1) for t in b]).double()
    return float(1.0 - torch.dot(a, b) / (a.norm() * b.norm()))


@pytest.mark.parametrize("family", [pytest.param("faster_rcnn_fpn", marks=pytest.mark.fast), "mask_rcnn", "retinanet",
                                    "fcos", "semantic_fpn", "panoptic_fpn"])
def test_phi_equals_independent_half_batch_reference(family):
    """Φ per module = 1 − cos of two half-batch gradients, each evaluated separately in the test
    on its own copy of the model from the iteration's starting state."""
    model = _model(family, _cfg(family, "BN"))
    batch = _batches(model)[0]
    step = _trainer(family, [batch], norm="BN", MEASURE_ONLY=True)
    start = copy.deepcopy(step.model)
    storage = _run(step, 1)
    # the reference: same RNG stream, a fresh copy of the starting model per half
    torch.manual_seed(1)
    grads = []
    for half in (batch[:2], batch[2:]):
        m = copy.deepcopy(start)
        m.zero_grad()
        with EventStorage(0):
            sum(m(half).values()).backward()
        by_name = dict(m.named_parameters())
        names = {id(p): n for n, p in step.model.named_parameters()}
        grads.append({
            mod: [by_name[names[id(p)]].grad if by_name[names[id(p)]].grad is not None else torch.zeros_like(p) for p in ps]
            for mod, ps in step.optimizer.params_by_module().items()
        })
    for mod in step.optimizer.modulator.modules:
        ref = _one_minus_cos(grads[0][mod], grads[1][mod])
        got = storage.history(f"agvm/phi/{mod}").latest()
        assert got == pytest.approx(ref, rel=1e-6, abs=1e-9), mod


def _step_gradient(step):
    """Run one iteration; return (gradient handed to optimizer.step, Φ per module)."""
    seen = {}
    inner = step.optimizer.step

    def spy(*a, **k):
        seen.update({n: p.grad.detach().clone() for n, p in step.model.named_parameters() if p.grad is not None})
        return inner(*a, **k)

    step.optimizer.step = spy
    _run(step, 1)
    return seen, dict(step.optimizer.modulator.phi)


@pytest.mark.fast
@pytest.mark.parametrize("accum", [2, 4])
def test_accumulation_gives_the_unaccumulated_step_and_phi(accum):
    """GRAD_ACCUM_STEPS 2 and 4 (halves = first and last k/2 micro-batches, no extra pass) give
    the step gradient and Φ of the unaccumulated run (FrozenBN Semantic FPN: per-image-mean loss,
    no sampling, so accumulation itself is exact)."""
    family = "semantic_fpn"
    model = _model(family, _cfg(family))
    batch = _batches(model, n=8)[0]
    ref_grad, ref_phi = _step_gradient(_trainer(family, [batch], MEASURE_ONLY=True))
    grad, phi = _step_gradient(_trainer(family, [batch], accum=accum, MEASURE_ONLY=True))
    assert ref_grad.keys() == grad.keys()
    for n in ref_grad:
        assert _rel(grad[n], ref_grad[n]) <= 1e-5, n
    for m in ref_phi:
        assert phi[m] == pytest.approx(ref_phi[m], rel=1e-5), m


@pytest.mark.fast
def test_accumulated_estimate_step_is_bit_identical_to_plain_accumulation():
    """With an even GRAD_ACCUM_STEPS the estimate iteration adds no pass and leaves the
    accumulated gradient untouched (trainable BN, RetinaNet's normaliser)."""
    family = "retinanet"
    model = _model(family, _cfg(family, "BN"))
    batches = _batches(model)
    plain = _trainer(family, batches, accum=2, norm="BN")
    measured = _trainer(family, batches, accum=2, norm="BN", MEASURE_ONLY=True)
    _run(plain, 1)
    _run(measured, 1)
    _assert_same_state(measured, plain, tol=1e-6)


def test_preserved_state_restores_and_names_what_it_cannot():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(3)
            self.ema = 1.0
            self.cache = torch.zeros(2)

        def forward(self, x):
            self.ema = 0.5 * self.ema + 0.5 * float(x.abs().sum())
            self.new_attr = 1.0
            return self.bn(x)

    net = Net()
    x = torch.randn(4, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    with preserved_state(net):
        net(x)
        torch.rand(5)
    assert torch.rand(1) == expected
    assert net.ema == 1.0 and not hasattr(net, "new_attr")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(UnaccountedStateError, match=r"Net\.cache"):
        with preserved_state(net):
            net.cache.add_(1.0)


@pytest.mark.fast
@pytest.mark.parametrize("accum", [2, 4])
def test_sam_with_accumulation_gives_the_unaccumulated_sam_step(accum):
    """SAM over GRAD_ACCUM_STEPS micro-batches (ascent gradient and step gradient each
    accumulated over the same micro-batches) steps like SAM on the whole batch (FrozenBN Semantic
    FPN: accumulation itself is exact). The large-batch SAM cells need it on few GPUs."""
    family = "semantic_fpn"

    def sam(k):
        cfg = _cfg(family, ENABLED=False)
        model = _model(family, cfg)
        model.train()
        step = AGVMStepTrainer(model, [batch], build_agvm_optimizer(cfg, model), accum_steps=k, sam_rho=0.05)
        set_data_iterator(step, iter(step.data_loader))
        _run(step, 1)
        # the gradient SAM stepped with (taken at the shifted point; step() leaves it in .grad)
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    batch = _batches(_model(family, _cfg(family)), n=8)[0]
    ref, got = sam(1), sam(accum)
    assert ref.keys() == got.keys() and len([n for n in ref if ref[n].abs().max() > 0]) > 10
    for n in ref:
        assert _rel(got[n], ref[n]) <= 1e-5, n
