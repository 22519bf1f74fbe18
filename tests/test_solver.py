"""Caffe's updates (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam) against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from resnet_imagenet.proto import caffe_pb2
from resnet_imagenet.proto.text import parse_text
from resnet_imagenet.solver.solver import CaffeSolver, Learnable


def solver(text: str) -> caffe_pb2.SolverParameter:
    return parse_text(text, caffe_pb2.SolverParameter())


@pytest.mark.parametrize(
    "text, msg",
    [
        ('type: "Adagrad" lr_policy: "fixed"', "Adagrad"),
        ('type: "AdaGrad" lr_policy: "fixed" momentum: 0.9', "Momentum cannot be used with AdaGrad"),
        ('type: "RMSProp" lr_policy: "fixed" momentum: 0.9', "Momentum cannot be used with RMSProp"),
        ('type: "RMSProp" lr_policy: "fixed" rms_decay: 1', "rms_decay should lie between 0 and 1"),
        ('lr_policy: "cosine"', "cosine"),
        ('lr_policy: "step" gamma: 0.1', "stepsize"),
        ('lr_policy: "fixed" regularization_type: "L3"', "L3"),
        ("base_lr: 0.1", "lr_policy"),
    ],
)
def test_bad_solver_is_a_clear_error(text, msg):
    with pytest.raises(ValueError, match=msg):
        CaffeSolver(solver(text), [])


def blob(values, grad, lr_mult=1.0, decay_mult=1.0):
    p = torch.tensor(values, dtype=torch.float32)
    p.grad = torch.tensor(grad, dtype=torch.float32)
    return Learnable(p, lr_mult, decay_mult)


def test_sgd_l2_two_steps_with_mults_and_iter_size():
    sp = solver('lr_policy: "fixed" base_lr: 0.1 momentum: 0.9 weight_decay: 0.1 iter_size: 2')
    b = blob([1.0, -2.0, 0.0], [0.5, 0.25, 0.0], lr_mult=2, decay_mult=0.5)
    s = CaffeSolver(sp, [b])
    # g = grad/2 + 0.05*w = [0.3, 0.025, 0]; v = 0.2*g = [0.06, 0.005, 0]; w -= v
    s.apply_update(0)
    assert b.param.tolist() == pytest.approx([0.94, -2.005, 0.0], abs=1e-6)
    b.param.grad = torch.tensor([0.5, 0.25, 0.0])
    # g = [0.25 + 0.047, 0.125 - 0.10025, 0]; v = 0.9*v + 0.2*g = [0.1134, 0.00945, 0]
    s.apply_update(1)
    assert b.param.tolist() == pytest.approx([0.8266, -2.01445, 0.0], abs=1e-6)
    assert s.history[0].tolist() == pytest.approx([0.1134, 0.00945, 0.0], abs=1e-6)


def test_sgd_l1_uses_sign_of_weights():
    sp = solver(
        'lr_policy: "fixed" base_lr: 0.1 momentum: 0.9 weight_decay: 0.1 iter_size: 2 regularization_type: "L1"'
    )
    b = blob([1.0, -2.0, 0.0], [0.5, 0.25, 0.0], lr_mult=2, decay_mult=0.5)
    CaffeSolver(sp, [b]).apply_update(0)
    # g = grad/2 + 0.05*sign(w) = [0.3, 0.075, 0]; v = 0.2*g
    assert b.param.tolist() == pytest.approx([0.94, -2.015, 0.0], abs=1e-6)


def test_lr_mult_zero_blob_is_frozen():
    sp = solver('lr_policy: "fixed" base_lr: 0.1 momentum: 0.9 weight_decay: 0.1')
    b = blob([1.0], [5.0], lr_mult=0)
    CaffeSolver(sp, [b]).apply_update(0)
    assert b.param.tolist() == [1.0]


def test_nesterov_two_steps():
    sp = solver('type: "Nesterov" lr_policy: "fixed" base_lr: 0.1 momentum: 0.9')
    b = blob([1.0], [1.0])
    s = CaffeSolver(sp, [b])
    s.apply_update(0)  # v = 0.1; step = 1.9*0.1 - 0.9*0 = 0.19
    assert b.param.item() == pytest.approx(0.81, abs=1e-6)
    b.param.grad = torch.tensor([1.0])
    s.apply_update(1)  # v = 0.19; step = 1.9*0.19 - 0.9*0.1 = 0.271
    assert b.param.item() == pytest.approx(0.539, abs=1e-6)


def test_adam_bias_corrected_steps():
    sp = solver('type: "Adam" lr_policy: "fixed" base_lr: 0.1 momentum: 0.9 momentum2: 0.999')
    a = blob([1.0, 2.0], [0.5, -1.0])
    h = blob([3.0], [2.0], lr_mult=0.5)
    s = CaffeSolver(sp, [a, h])
    # t=1: m = 0.1g, v = 0.001g^2, correction sqrt(0.001)/0.1: the step is lr*sign(g) (delta aside)
    s.apply_update(0)
    assert a.param.tolist() == pytest.approx([0.9, 2.1], abs=1e-6)
    assert h.param.item() == pytest.approx(2.95, abs=1e-6)
    assert s.history[0].tolist() == pytest.approx([0.05, -0.1], abs=1e-6)
    assert s.history2[0].tolist() == pytest.approx([0.00025, 0.001], rel=1e-4)  # 1 - float32(0.999)
    # t=2 with the same g: m = 0.19g, v = 0.001999g^2, correction sqrt(0.001999)/0.19 -> again lr*sign(g)
    a.param.grad = torch.tensor([0.5, -1.0])
    h.param.grad = torch.tensor([2.0])
    s.apply_update(1)
    assert a.param.tolist() == pytest.approx([0.8, 2.2], abs=1e-6)
    assert h.param.item() == pytest.approx(2.9, abs=1e-6)


def two_steps(text, blobs, second_grads):
    s = CaffeSolver(solver(text), blobs)
    s.apply_update(0)
    for b, g in zip(blobs, second_grads):
        b.param.grad = torch.tensor(g)
    s.apply_update(1)
    return s


def test_adagrad_sums_squared_gradients_and_scales_by_the_local_rate():
    a, b = blob([1.0], [2.0]), blob([0.0], [-1.0], lr_mult=2)
    s = two_steps('type: "AdaGrad" lr_policy: "fixed" base_lr: 0.1 delta: 0.5', [a, b], [[1.0], [3.0]])
    # a: h = 4, w = 1 - 0.1*2/(2+0.5) = 0.92; h = 5, w = 0.92 - 0.1*1/(sqrt(5)+0.5) = 0.8834512
    # b (lr 0.2): h = 1, w = 0.2/1.5 = 0.1333333; h = 10, w -= 0.2*3/(sqrt(10)+0.5) -> -0.0304991
    assert a.param.item() == pytest.approx(0.8834512, abs=1e-6)
    assert b.param.item() == pytest.approx(-0.0304991, abs=1e-6)
    assert [h.item() for h in s.history] == [5.0, 10.0] and s.history2 == []


def test_rmsprop_decays_the_squared_gradient_average():
    a = blob([1.0], [2.0])
    s = two_steps('type: "RMSProp" lr_policy: "fixed" base_lr: 0.1 delta: 0.5 rms_decay: 0.9', [a], [[1.0]])
    # h = 0.1*4 = 0.4, w = 1 - 0.1*2/(sqrt(0.4)+0.5) = 0.8233930; h = 0.9*0.4 + 0.1*1 = 0.46,
    # w -= 0.1*1/(sqrt(0.46)+0.5) -> 0.7385198
    assert a.param.item() == pytest.approx(0.7385198, abs=1e-6)
    assert s.history[0].item() == pytest.approx(0.46, abs=1e-7)


def test_adadelta_keeps_gradient_and_update_histories_and_applies_the_rate_last():
    a = blob([1.0], [2.0])
    s = two_steps('type: "AdaDelta" lr_policy: "fixed" base_lr: 0.1 delta: 0.5 momentum: 0.9', [a], [[1.0]])
    # step 1: h = 0.1*4 = 0.4; u = 2*sqrt((0+0.5)/(0.4+0.5)) = 1.4907120; h2 = 0.1*u^2 = 0.2222222; w = 1 - 0.1*u
    # step 2: h = 0.46; u = sqrt((0.2222222+0.5)/(0.46+0.5)) = 0.8673608; h2 = 0.9*0.2222222 + 0.1*u^2 = 0.2752315
    assert a.param.item() == pytest.approx(0.7641927, abs=1e-6)
    assert s.history[0].item() == pytest.approx(0.46, abs=1e-7)
    assert s.history2[0].item() == pytest.approx(0.2752315, abs=1e-7)
    assert [h.item() for h in s.caffe_history()] == [s.history[0].item(), s.history2[0].item()]


def test_multistep_goes_on_from_a_restored_current_step():
    # stepvalues 2, 4: a fresh run is at step 1 from it 2; a Caffe state saying current_step 2 at it 3
    # (its solver had other stepvalues) keeps Caffe's counter: gamma^2 from it 3 on
    sp = solver('lr_policy: "multistep" base_lr: 1 gamma: 0.5 stepvalue: 2 stepvalue: 4')
    s = CaffeSolver(sp, [])
    assert [s.rate(i) for i in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert [s.current_step(i) for i in (1, 3, 5)] == [0, 1, 2]
    s.restore_schedule(2, 3)
    assert [s.rate(i) for i in (3, 4, 5)] == [0.25, 0.25, 0.25] and s.current_step(5) == 2
    s.restore_schedule(0, 3)  # behind: one step per iteration once past a stepvalue, as Caffe's counter
    assert [s.rate(i) for i in (3, 4, 5)] == [0.5, 0.25, 0.25]


def test_clip_gradients_global_norm_before_normalize():
    # grads 3 and 4 in two blobs: global norm 5 > 2.5 -> scale 0.5; then iter_size 2 halves again
    sp = solver('lr_policy: "fixed" base_lr: 1 clip_gradients: 2.5 iter_size: 2')
    a, b = blob([0.0], [3.0]), blob([0.0], [4.0])
    CaffeSolver(sp, [a, b]).apply_update(0)
    assert (a.param.item(), b.param.item()) == pytest.approx((-0.75, -1.0), abs=1e-6)
    # below the threshold nothing is scaled
    sp = solver('lr_policy: "fixed" base_lr: 1 clip_gradients: 10')
    a, b = blob([0.0], [3.0]), blob([0.0], [4.0])
    CaffeSolver(sp, [a, b]).apply_update(0)
    assert (a.param.item(), b.param.item()) == (-3.0, -4.0)


def test_state_dict_resumes_exactly():
    sp = solver('lr_policy: "step" base_lr: 0.1 gamma: 0.5 stepsize: 2 momentum: 0.9 weight_decay: 0.01')
    torch.manual_seed(0)
    grads = [torch.randn(4) for _ in range(6)]
    w0 = torch.randn(4)

    def run(s: CaffeSolver, p: torch.Tensor, its: range) -> None:
        for it in its:
            p.grad = grads[it].clone()
            s.apply_update(it)

    straight = Learnable(w0.clone())
    run(CaffeSolver(sp, [straight]), straight.param, range(6))
    first = Learnable(w0.clone())
    s1 = CaffeSolver(sp, [first])
    run(s1, first.param, range(3))
    state = s1.state_dict()
    second = Learnable(first.param.clone())
    s2 = CaffeSolver(sp, [second])
    s2.load_state_dict(state)
    run(s2, second.param, range(3, 6))
    assert torch.equal(second.param, straight.param)
    with pytest.raises(ValueError, match="Adam"):
        CaffeSolver(solver('type: "Adam" lr_policy: "fixed"'), [second]).load_state_dict(state)


def test_fp16_scaler_unscales_and_skips_an_overflowed_update(caplog):
    # w -= lr * g after the scaler divides its scale back out; an inf gradient skips the update and halves the scale
    sp = solver('type: "SGD" lr_policy: "fixed" base_lr: 0.5 display: 1')
    b = blob([1.0, 2.0], [0.0, 0.0])
    s = CaffeSolver(sp, [b])
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    b.param.grad = scaler.scale(torch.tensor([0.25, -1.0]))
    with caplog.at_level("INFO"):
        assert s.apply_update(0, scaler, display=True) == 0.5
    assert "Iteration 0, lr = 0.5" in caplog.text
    assert b.param.tolist() == [1.0 - 0.5 * 0.25, 2.0 + 0.5 * 1.0]
    before = b.param.clone()
    b.param.grad = torch.tensor([float("inf"), 1.0])
    s.apply_update(1, scaler)
    assert torch.equal(b.param, before) and scaler.get_scale() == 4.0


def test_a_mismatched_state_is_refused_before_anything_is_copied():
    s = CaffeSolver(
        solver('lr_policy: "fixed" base_lr: 1 momentum: 0.9'), [Learnable(torch.zeros(2)), Learnable(torch.zeros(3))]
    )
    bad = {"type": "SGD", "history": [torch.ones(2), torch.ones(4)], "history2": []}
    with pytest.raises(ValueError, match=r"history blob #1 has shape \(4,\), the net \(3,\)"):
        s.check_state_dict(bad)
    with pytest.raises(ValueError, match=r"history blob #1"):
        s.load_state_dict(bad)
    assert torch.equal(s.history[0], torch.zeros(2))  # blob #0 fitted, but nothing was copied
    s.check_state_dict(s.state_dict())
