"""Adam8bit / AdamW8bit: bits against bitsandbytes, torch.optim behaviour, checkpoints, bad input."""


import pytest
import torch

import pyquant
from pyquant.optim import from_torch, to_torch

from conftest import CPU_BACKENDS, bits, same_bits

bnb = pytest.importorskip("bitsandbytes")

# Awkward sizes: float32 states below 4096 elements, 8-bit ones not a multiple of 256, and several million.
SIZES = [(100,), (63, 65), (64, 70), (5000,), (33, 257), (3_000_001,)]


def make_params(sizes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in sizes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(step, *param_lists, nan_at=None):
    g = torch.Generator().manual_seed(1000 + step)
    for group in zip(*param_lists):
        grad = torch.randn(group[0].shape, generator=g) * (0.1 + step % 3)
        if nan_at is not None and grad.numel() > nan_at:
            grad.view(-1)[nan_at] = float("nan")
        for p in group:
            p.grad = grad.to(p.dtype).clone()


def assert_same_state(ours, theirs, params_ours, params_theirs):
    for a, b in zip(params_ours, params_theirs):
        assert same_bits(a, b), f"parameter of shape {tuple(a.shape)}: {int((bits(a) != bits(b)).sum())} differ"
        sa, sb = ours.state[a], theirs.state[b]
        assert sa["step"] == sb["step"]
        for key in ("state1", "state2", "absmax1", "absmax2"):
            assert (key in sa) == (key in sb)
            if key in sb:
                assert same_bits(sa[key], sb[key]), f"{key} of shape {tuple(a.shape)} differs"


CONFIGS = [
    ("Adam8bit", dict(lr=1e-3)),
    ("Adam8bit", dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("AdamW8bit", dict(lr=3e-4, betas=(0.95, 0.9999), eps=1e-7)),
    ("AdamW8bit", dict(lr=1e-2, weight_decay=0.0)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name, kwargs", CONFIGS)
def test_bit_identical_to_bitsandbytes_over_100_steps(backend, name, kwargs):
    sizes = SIZES if backend == "cpu" else SIZES[:-1]  # the torch reference is slow at millions
    ours_p = make_params(sizes)
    theirs_p = clone_params(ours_p)
    ours = getattr(pyquant, name)(ours_p, **kwargs)
    theirs = getattr(bnb.optim, name)(theirs_p, **kwargs)
    with pyquant.use_backend(backend):
        for step in range(100):
            set_grads(step, ours_p, theirs_p)
            ours.step()
            theirs.step()
    assert_same_state(ours, theirs, ours_p, theirs_p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_parameters_match_bitsandbytes_and_reference(dtype):
    ours_p = make_params([(100,), (5000,)], dtype=dtype)
    ref_p, theirs_p = clone_params(ours_p), clone_params(ours_p)
    ours, ref = pyquant.Adam8bit(ours_p, lr=1e-2), pyquant.Adam8bit(ref_p, lr=1e-2)
    theirs = bnb.optim.Adam8bit(theirs_p, lr=1e-2)
    for step in range(10):
        set_grads(step, ours_p, ref_p, theirs_p)
        ours.step()
        theirs.step()
        with pyquant.use_backend("reference"):
            ref.step()
    assert all(p.dtype == dtype for p in ours_p)
    assert_same_state(ours, theirs, ours_p, theirs_p)
    assert_same_state(ours, ref, ours_p, ref_p)


def test_param_groups_schedulers_closure_and_zero_grad_behave_like_bitsandbytes():
    ours_p, theirs_p = make_params(SIZES[:5]), None
    theirs_p = clone_params(ours_p)

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:4], "lr": 5e-3, "weight_decay": 0.05}]

    ours = pyquant.Adam8bit(groups(ours_p), lr=1e-3)
    theirs = bnb.optim.Adam8bit(groups(theirs_p), lr=1e-3)
    ours.add_param_group({"params": ours_p[4:], "betas": (0.5, 0.9)})
    theirs.add_param_group({"params": theirs_p[4:], "betas": (0.5, 0.9)})
    sched_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=3, gamma=0.5)
    sched_theirs = torch.optim.lr_scheduler.StepLR(theirs, step_size=3, gamma=0.5)
    for step in range(10):
        set_grads(step, ours_p, theirs_p)
        if step == 4:  # a parameter without a gradient is skipped, its step count stays behind
            ours_p[1].grad = theirs_p[1].grad = None
        loss = ours.step(closure=lambda: torch.tensor(float(step)))
        assert loss.item() == step
        theirs.step()
        sched_ours.step()
        sched_theirs.step()
    assert ours.param_groups[1]["lr"] == pytest.approx(5e-3 * 0.5**3)
    assert_same_state(ours, theirs, ours_p, theirs_p)
    ours.zero_grad()
    assert all(p.grad is None for p in ours_p)


def test_state_memory_is_a_quarter_of_float32_adam():
    params = make_params([(4096, 256)])
    opt = pyquant.Adam8bit(params)
    set_grads(0, params)
    opt.step()
    per_param = opt.state_bytes() / params[0].numel()
    assert per_param == pytest.approx(2 + 8 / 256)  # two uint8 codes and two float32 scales per 256
    assert per_param / 8 <= 0.26  # float32 Adam keeps 8 bytes per parameter


def test_checkpoints_move_between_bitsandbytes_and_pyquant_in_both_directions(tmp_path):
    sizes = SIZES[:5]
    for source_cls, target_cls in ((bnb.optim.Adam8bit, pyquant.Adam8bit), (pyquant.Adam8bit, bnb.optim.Adam8bit)):
        source_p = make_params(sizes)
        source = source_cls(source_p, lr=2e-3, weight_decay=0.01)
        for step in range(5):
            set_grads(step, source_p)
            source.step()
        path = tmp_path / "opt.pt"
        torch.save(source.state_dict(), path)
        loaded = torch.load(path, weights_only=True)
        target_p = clone_params(source_p)
        target = target_cls(target_p, lr=2e-3, weight_decay=0.01)
        target.load_state_dict(loaded)
        for step in range(5, 10):  # both continue; the swap must not change a bit
            set_grads(step, source_p, target_p)
            source.step()
            target.step()
        assert_same_state(target, source, target_p, source_p)


def test_state_dict_uses_bitsandbytes_layout():
    ours_p, theirs_p = make_params([(100,), (5000,)]), None
    theirs_p = clone_params(ours_p)
    ours, theirs = pyquant.Adam8bit(ours_p), bnb.optim.Adam8bit(theirs_p)
    set_grads(0, ours_p, theirs_p)
    ours.step()
    theirs.step()
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for key in b["state"]:
        assert a["state"][key].keys() == b["state"][key].keys()
        wrapped = "__bnb_optimizer_quant_state__"
        assert a["state"][key][wrapped].keys() == b["state"][key][wrapped].keys()


def test_a_state_for_another_shape_or_dtype_is_refused_and_nothing_changes():
    params = make_params([(5000,), (100,)])
    opt = pyquant.Adam8bit(params)
    set_grads(0, params)
    opt.step()
    good = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[params[0]].items() if isinstance(v, torch.Tensor)}
    other_p = make_params([(5001,), (100,)])
    other = pyquant.Adam8bit(other_p)
    set_grads(0, other_p)
    other.step()
    with pytest.raises(ValueError, match=r"state1 has shape \(5001,\), expected \(5000,\)"):
        opt.load_state_dict(other.state_dict())
    bad = opt.state_dict()
    bad["state"][1]["__bnb_optimizer_quant_state__"]["state1"] = torch.zeros(100, dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype torch.float16"):
        opt.load_state_dict(bad)
    bad = opt.state_dict()
    bad["state"][0]["__bnb_optimizer_quant_state__"]["absmax1"] = torch.zeros(3)
    with pytest.raises(ValueError, match="absmax1 must be float32 with 20 entries"):
        opt.load_state_dict(bad)
    for k, v in before.items():
        assert torch.equal(opt.state[params[0]][k], v)
    opt.load_state_dict(good)  # and a good one still loads


def test_switching_with_torch_adam_and_back():
    params = make_params([(100,), (5000,)])
    torch_opt = torch.optim.Adam(params, lr=1e-3)
    for step in range(3):
        set_grads(step, params)
        torch_opt.step()
    exp_avg = torch_opt.state[params[1]]["exp_avg"].clone()
    ours = from_torch(torch_opt)
    assert isinstance(ours, pyquant.Adam8bit) and ours.state[params[1]]["step"] == 3
    assert ours.state[params[1]]["state1"].dtype == torch.uint8
    assert torch.equal(ours.state[params[0]]["state1"], torch_opt.state[params[0]]["exp_avg"])  # small: float32
    m = pyquant.functional.dequantize_blockwise(ours.state[params[1]]["state1"], ours.state[params[1]]["absmax1"])
    assert (m - exp_avg).abs().max() <= 0.02 * exp_avg.abs().max()
    set_grads(3, params)
    ours.step()
    back = to_torch(ours)
    assert back.state[params[1]]["step"].item() == 4
    assert torch.equal(
        back.state[params[1]]["exp_avg"],
        pyquant.functional.dequantize_blockwise(ours.state[params[1]]["state1"], ours.state[params[1]]["absmax1"]),
    )
    set_grads(4, params)
    back.step()
    assert all(torch.isfinite(p).all() for p in params)


def test_training_reaches_the_loss_of_torch_adam():
    """A small MLP on a fixed synthetic task: Adam8bit's final loss is within 10% of torch.optim.Adam's."""

    def train(make_opt):
        torch.manual_seed(0)
        x = torch.randn(512, 32)
        y = (x[:, :4].sum(1) > 0).long() + (x[:, 4] > 1).long()
        model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 3))
        opt = make_opt(model.parameters())
        for _ in range(300):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        return loss.item()

    reference = train(lambda p: torch.optim.Adam(p, lr=3e-3))
    ours = train(lambda p: pyquant.Adam8bit(p, lr=3e-3))
    assert reference < 0.2  # the task is learnable
    assert ours <= reference * 1.10 + 0.01


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_default_policy_skips_non_finite_gradient_elements(backend):
    params = make_params([(100,), (5000,)])
    clean = clone_params(params)
    opt, clean_opt = pyquant.Adam8bit(params), pyquant.Adam8bit(clean)
    with pyquant.use_backend(backend):
        for step in range(3):
            set_grads(step, params, clean)
            opt.step()
            clean_opt.step()
        before = [p.detach().clone() for p in params]
        set_grads(3, params, clean)
        params[1].grad[7] = float("nan")
        params[1].grad[300] = float("inf")
        params[0].grad[3] = float("-inf")
        with pytest.warns(RuntimeWarning, match="3 non-finite gradient elements were skipped"):
            opt.step()
        clean_opt.step()
    assert opt.nonfinite_count == 3
    for p in params:
        assert torch.isfinite(p).all()
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.isfinite(opt.state[params[1]][key].float()).all()
    for p, b, idx in ((params[1], before[1], (7, 300)), (params[0], before[0], (3,))):
        for i in idx:
            assert p[i] == b[i]  # the bad element is left alone
        others = torch.ones(p.numel(), dtype=torch.bool)
        others[list(idx)] = False
        assert (p[others] != b[others]).float().mean() > 0.99  # the rest moved
    # Blocks without a bad element are exactly as in a run without any.
    assert torch.equal(params[1][512:], clean[1][512:])
    assert torch.equal(opt.state[params[1]]["state1"][512:], clean_opt.state[clean[1]]["state1"][512:])


def test_propagate_policy_reproduces_bitsandbytes_bits_with_nan_gradients():
    ours_p = make_params(SIZES[:5])
    theirs_p = clone_params(ours_p)
    ours = pyquant.Adam8bit(ours_p, nonfinite="propagate")
    theirs = bnb.optim.Adam8bit(theirs_p)
    for step in range(3):
        set_grads(step, ours_p, theirs_p, nan_at=17 if step == 1 else None)
        ours.step()
        theirs.step()
    assert torch.isnan(ours_p[-1]).any()
    assert_same_state(ours, theirs, ours_p, theirs_p)


def test_same_bits_for_any_thread_count(outputs_by_thread_count):
    script = (
        "import torch, hashlib, pyquant\n"
        "g = torch.Generator().manual_seed(0)\n"
        "ps = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (100, 5000, 1_000_003)]\n"
        "opt = pyquant.AdamW8bit(ps)\n"
        "for _ in range(3):\n"
        "    for p in ps: p.grad = torch.randn(p.shape, generator=g)\n"
        "    opt.step()\n"
        "h = hashlib.sha256()\n"
        "for p in ps:\n"
        "    h.update(p.detach().numpy().tobytes())\n"
        "    for v in opt.state[p].values():\n"
        "        if isinstance(v, torch.Tensor): h.update(v.numpy().tobytes())\n"
        "print(h.hexdigest())\n"
    )
    assert len(outputs_by_thread_count(script)) == 1


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda p: pyquant.Adam8bit(p, amsgrad=True), ValueError, "amsgrad"),
        (lambda p: pyquant.Adam8bit(p, lr=-1.0), ValueError, "learning rate"),
        (lambda p: pyquant.Adam8bit(p, betas=(0.9, 1.0)), ValueError, "betas"),
        (lambda p: pyquant.Adam8bit(p, nonfinite="ignore"), ValueError, "nonfinite"),
    ],
)
def test_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make(make_params([(10,)]))


def test_sparse_complex_and_integer_parameters_are_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        pyquant.Adam8bit(emb.parameters()).step()
    z = torch.nn.Parameter(torch.randn(5, dtype=torch.complex64))
    z.grad = torch.randn(5, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex parameters"):
        pyquant.Adam8bit([z]).step()
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    p.grad = torch.randn(5, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        pyquant.Adam8bit([p]).step()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_step_marks_parameters_and_states_written(backend):
    """The step calls its kernel without the custom op's dispatch in eager mode (backends.runs_eagerly): the
    version counters of what it writes must still move, as the op's `mutates_args` (and torch's Adam) make them,
    so that autograd refuses a backward through a graph that saved the old parameter."""
    big = torch.nn.Parameter(torch.randn(5000))  # 8-bit states
    small = torch.nn.Parameter(torch.randn(10))  # float32 states
    for p in (big, small):
        p.grad = torch.randn_like(p)
    opt = pyquant.Adam8bit([big, small])
    with pyquant.use_backend(backend):
        opt.step()
        written = [big, small] + [opt.state[p][k] for p in (big, small) for k in ("state1", "state2")]
        written += [opt.state[big][k] for k in ("absmax1", "absmax2")]
        before = [t._version for t in written]
        loss = (big * big).sum()  # saves `big` for backward
        opt.step()
    assert all(t._version > v for t, v in zip(written, before))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the CPU library is not built")
def test_a_prepared_step_marks_each_written_tensor_once():
    """Float32-state tensors share one empty block-scale placeholder (Optimizer8bit._operands): a prepared step
    bumps its version once, like every other tensor it writes, not once per tensor that lists it."""
    from pyquant import functional as F
    from pyquant._contract import adam_constants

    p, g, s1, s2 = ([torch.ones(k) for k in (4, 6, 8)] for _ in range(4))
    empty = torch.zeros(0)
    row = adam_constants(dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), 1, False)
    step = F.prepare_adam_step(p, g, s1, s2, [empty] * 3, [empty] * 3, torch.tensor([row] * 3),
                               F.create_dynamic_map(True), F.create_dynamic_map(False))
    written = [empty, *p, *s1, *s2]
    before = [t._version for t in written]
    assert step(p, g, [row], None, 0) == 0
    assert [t._version - v for t, v in zip(written, before)] == [1] * len(written)
    assert all(bool((x < 1).all()) for x in p)  # the step ran
