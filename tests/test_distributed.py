"""Adam8bit, the rest of the 8-bit family, LAMB/LARS and AdamW4bit inside torch.distributed, on CPU with gloo: DDP
bits, FSDP2 shards (4-bit rank-1 maxima per shard, LAMB's and LARS' norms over whole tensors), DCP checkpoints
across world sizes.

Starting processes is the expensive part (each imports torch), so one 2-process run does every 2-rank scenario
and records what it saw, one 1-process run loads its checkpoint, and the tests below check the records.
"""

import math
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pyquant
from pyquant import functional as F
from pyquant._contract import OPTIMIZER_BLOCK
from pyquant.distributed import load_checkpoint, quantize_moment, save_checkpoint
from pyquant.optim import to_torch

from conftest import bits, same_bits

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with the gloo backend"
)

LR = 1e-3
STEPS = 4  # before the checkpoint, and again after it
BATCH = 8  # per rank


# ---- models and data, identical in every process ----
def ddp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 160), nn.Tanh(), nn.Linear(160, 1))  # 5120 weights: 8-bit states


# The rest of the family: each with options that exercise its whole rule (momentum, weight decay, schedulers).
FAMILY = {
    "Lion8bit": lambda ps, **kw: pyquant.Lion8bit(ps, lr=LR, weight_decay=0.1, **kw),
    "SGD8bit": lambda ps, **kw: pyquant.SGD8bit(ps, lr=LR, momentum=0.9, weight_decay=0.01, **kw),
    "RMSprop8bit": lambda ps, **kw: pyquant.RMSprop8bit(ps, lr=LR, **kw),
    "Adagrad8bit": lambda ps, **kw: pyquant.Adagrad8bit(ps, lr=LR, **kw),
    "AdEMAMix8bit": lambda ps, **kw: pyquant.AdEMAMix8bit(ps, lr=LR, t_alpha=3, t_beta3=3, **kw),
    # 4-bit states, rank-1 maxima per shard (docs/distributed.md); the size rule under its own name
    "AdamW4bit": lambda ps, min_8bit_size=4096, **kw: pyquant.AdamW4bit(ps, lr=LR, min_4bit_size=min_8bit_size, **kw),
    # trust ratios from norms of the whole tensor: no Shadow over one shard (FullShadow checks them instead)
    "LAMB8bit": lambda ps, **kw: pyquant.LAMB8bit(ps, lr=LR, weight_decay=0.01, **kw),
    "LARS8bit": lambda ps, **kw: pyquant.LARS8bit(ps, lr=LR, momentum=0.9, weight_decay=0.01, **kw),
}
# their float32-state variants, for FullShadow
WHOLE_TENSOR_NORMS = {"LAMB8bit": lambda ps: pyquant.LAMB32bit(ps, lr=LR, weight_decay=0.01),
                      "LARS8bit": lambda ps: pyquant.LARS32bit(ps, lr=LR, momentum=0.9, weight_decay=0.01)}
# Their moments in a sharded state_dict(), as DCP sees them.
FAMILY_MOMENTS = {"Lion8bit": ["exp_avg"], "SGD8bit": ["momentum_buffer"], "RMSprop8bit": ["square_avg"],
                  "Adagrad8bit": ["sum"], "AdEMAMix8bit": ["exp_avg_fast", "exp_avg_slow", "exp_avg_sq"],
                  "AdamW4bit": ["exp_avg", "exp_avg_sq"], "LAMB8bit": ["exp_avg", "exp_avg_sq", "unorm_vec"],
                  "LARS8bit": ["momentum_buffer", "unorm_vec"]}


def adamw8bit(ps, **kw):
    return pyquant.AdamW8bit(ps, lr=LR, **kw)


def one_process_ddp_run(backward, make=adamw8bit):
    """ddp_model after STEPS steps of `make`'s optimizer in one process on the global batches,
    `backward(model, x, y)` giving each step's gradients."""
    model = ddp_model()
    optimizer = make(model.parameters())
    for step in range(STEPS):
        x, y = ddp_batch(step)
        optimizer.zero_grad()
        backward(model, x, y)
        optimizer.step()
    return model


def ddp_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(2 * BATCH, 32, generator=g), torch.randn(2 * BATCH, 1, generator=g)


class Net(nn.Module):
    """FSDP2 shards dim 0: fc1.weight splits 39/38 rows (partial last blocks), head and scale sit whole on
    rank 0 and leave rank 1 an empty shard of a float32-state and of an 8-bit-state parameter."""

    def __init__(self, hidden=77, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(64, hidden)  # 4928 weights: 8-bit
        self.fc2 = nn.Linear(hidden, 96)  # 7392 weights: 8-bit
        self.head = nn.Linear(96, 1)  # float32 states
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(1, 4160))  # 8-bit, one row

    def forward(self, x):
        h = torch.tanh(self.fc1(x * self.scale[:, :64]))
        return self.head(torch.tanh(self.fc2(h)))


def fsdp_batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 64, generator=g), torch.randn(BATCH, 1, generator=g)


def sharded(model, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in (model.fc1, model.fc2):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model, optimizer, steps, rank, first_step=0, shadow=None, dtype=torch.float32):
    for step in range(first_step, first_step + steps):
        x, y = fsdp_batch(step, rank)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        optimizer.step()
        if shadow is not None:
            shadow.step_and_compare(optimizer)


def full_params(model):
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}


def full_moments(optimizer):
    """The float32 moments of every parameter, gathered whole (state_dict() of a sharded optimizer)."""
    return {
        key: {k: s[k].full_tensor() for k in ("exp_avg", "exp_avg_sq")} for key, s in optimizer.state_dict()["state"].items()
    }


class Shadow:
    """Plain optimizers (`make`'s) over copies of this rank's shards, fed the same local gradients: the sharded
    optimizer must give their bits, with 8-bit states for the same parameters (chosen on the full size)."""

    def __init__(self, model, optimizer, make=adamw8bit):
        self.real = list(model.parameters())
        self.copies = [nn.Parameter(p.to_local().detach().clone()) for p in self.real]
        eight = [c for p, c in zip(self.real, self.copies) if optimizer._uses_8bit(p)]
        full = [c for p, c in zip(self.real, self.copies) if not optimizer._uses_8bit(p)]
        self.optimizers = [make(eight, min_8bit_size=0), make(full, min_8bit_size=2**62)]
        self.mismatches = 0

    def step_and_compare(self, optimizer):
        for p, c in zip(self.real, self.copies):
            c.grad = p.grad.to_local().clone()
        for o in self.optimizers:
            o.step()
        mine = {c: s for o in self.optimizers for c, s in o.state.items()}
        for p, c in zip(self.real, self.copies):
            theirs, ours = optimizer.state[p], mine[c]
            self.mismatches += not same_bits(p.to_local(), c)
            for key in ("state1", "state2", "absmax1", "absmax2"):
                self.mismatches += (key in theirs) != (key in ours) or (key in ours and not same_bits(theirs[key], ours[key]))


class FullShadow:
    """`make`'s optimizer (float32 states: no blocks that a shard would place otherwise) over whole copies of the
    parameters, fed the whole gradients: a sharded LAMB or LARS must give its parameters and its ||direction||
    (unorm_vec), up to the order of the norms' float64 sums (a shard's sum, then the ranks' sum)."""

    def __init__(self, model, make):
        self.real = list(model.parameters())
        self.copies = [nn.Parameter(p.full_tensor().detach().clone()) for p in self.real]
        self.optimizer = make(self.copies)
        self.worst_param, self.worst_norm = 0.0, 0.0

    def step_and_compare(self, optimizer):
        for p, c in zip(self.real, self.copies):
            c.grad = p.grad.full_tensor()
        self.optimizer.step()
        for p, c in zip(self.real, self.copies):
            self.worst_param = max(self.worst_param, ((p.full_tensor() - c).abs() / c.abs().clamp(min=1e-3)).max().item())
            ours, theirs = optimizer.state[p]["unorm_vec"], self.optimizer.state[c]["unorm_vec"]
            self.worst_norm = max(self.worst_norm, ((ours - theirs).abs() / theirs).item())


# ---- the processes ----
def _run(rank, world_size, init_file, scenario, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    try:
        record = scenario(rank, world_size, out_dir)
        torch.save(record, os.path.join(out_dir, f"{scenario.__name__}.rank{rank}.pt"))
        # No rank tears its connections down while the other may still use them (a process once aborted
        # with "terminate called without an active exception" in a loaded CI run).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(scenario, world_size, out_dir):
    """Run scenario(rank, world_size, out_dir) in `world_size` fresh processes; return each rank's record."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.start_processes(
            _run, args=(world_size, init_file, scenario, out_dir), nprocs=world_size, start_method="spawn"
        )
    return [
        torch.load(os.path.join(out_dir, f"{scenario.__name__}.rank{r}.pt"), weights_only=True)
        for r in range(world_size)
    ]


def two_ranks(rank, world_size, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    record = {}
    # DDP: each rank takes its half of the global batch.
    model = ddp_model()
    ddp = DistributedDataParallel(model)
    optimizer = pyquant.AdamW8bit(ddp.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = ddp_batch(step)
        optimizer.zero_grad()
        nn.functional.mse_loss(ddp(x.chunk(world_size)[rank]), y.chunk(world_size)[rank]).backward()
        optimizer.step()
    record["ddp"] = [p.detach().clone() for p in model.parameters()]

    # FSDP2: train, checkpoint, train on; then a fresh model and optimizer resume from the checkpoint.
    checkpoint = os.path.join(out_dir, "checkpoint")
    model = sharded(Net(), world_size)
    optimizer = pyquant.AdamW8bit(model.parameters(), lr=LR)
    shadow = Shadow(model, optimizer)
    train(model, optimizer, STEPS, rank, shadow=shadow)
    record["shadow_mismatches"] = shadow.mismatches
    record["state_bytes"] = optimizer.state_bytes()
    record["local_shapes"] = {name: tuple(p.to_local().shape) for name, p in model.named_parameters()}
    save_checkpoint(checkpoint, model, optimizer)
    record["saved_moments"] = full_moments(optimizer)
    record["saved_params"] = full_params(model)
    train(model, optimizer, STEPS, rank, first_step=STEPS)
    record["uninterrupted"] = full_params(model)

    resumed = sharded(Net(seed=1), world_size)
    resumed_optimizer = pyquant.AdamW8bit(resumed.parameters(), lr=LR)
    load_checkpoint(checkpoint, resumed, resumed_optimizer)
    record["resumed_state_bytes"] = resumed_optimizer.state_bytes()
    train(resumed, resumed_optimizer, STEPS, rank, first_step=STEPS)
    record["resumed"] = full_params(resumed)

    # bfloat16 parameters with float32 master weights: the masters are per shard and resume bit for bit too, with
    # 8-bit and with 4-bit states.
    record["master_resumed"], record["master_in_state"] = {}, {}
    for name, make in (("AdamW8bit", pyquant.AdamW8bit), ("AdamW4bit", pyquant.AdamW4bit)):
        finals = []
        for seed, first_step in ((0, 0), (1, None)):
            half = sharded(Net(seed=seed).to(torch.bfloat16), world_size)
            half_optimizer = make(half.parameters(), lr=LR, master_weights=True)
            if first_step is None:
                load_checkpoint(os.path.join(out_dir, f"half-{name}"), half, half_optimizer)
            else:
                train(half, half_optimizer, 2, rank, dtype=torch.bfloat16)
                save_checkpoint(os.path.join(out_dir, f"half-{name}"), half, half_optimizer)
            train(half, half_optimizer, 2, rank, first_step=2, dtype=torch.bfloat16)
            finals.append(full_params(half))
        record["master_resumed"][name] = all(same_bits(finals[0][k], finals[1][k]) for k in finals[0])
        record["master_in_state"][name] = all("master" in s for s in half_optimizer.state_dict()["state"].values())

    # A checkpoint of another model: refused, and the trained model and optimizer keep every bit.
    other = sharded(Net(hidden=80), world_size)
    other_optimizer = pyquant.AdamW8bit(other.parameters(), lr=LR)
    train(other, other_optimizer, 1, rank)
    save_checkpoint(os.path.join(out_dir, "other"), other, other_optimizer)
    before_params, before_state = full_params(model), full_moments(optimizer)
    try:
        load_checkpoint(os.path.join(out_dir, "other"), model, optimizer)
        record["other_error"] = ""
    except ValueError as error:
        record["other_error"] = str(error)
    record["other_kept_params"] = all(same_bits(before_params[k], v) for k, v in full_params(model).items())
    after_state = full_moments(optimizer)
    record["other_kept_state"] = all(
        same_bits(before_state[k][m], after_state[k][m]) for k in before_state for m in ("exp_avg", "exp_avg_sq")
    )
    # A fresh optimizer that fails to load is left without state, as it was.
    fresh = pyquant.AdamW8bit(model.parameters(), lr=LR)
    with pytest.raises(ValueError):
        load_checkpoint(os.path.join(out_dir, "other"), model, fresh)
    record["fresh_left_empty"] = len(fresh.state) == 0

    # The unsharded (bitsandbytes) layout is refused for DTensor parameters, with the reason.
    plain = pyquant.AdamW8bit([nn.Parameter(p.full_tensor().detach()) for p in model.parameters()], lr=LR)
    train_plain = plain.param_groups[0]["params"]
    for p in train_plain:
        p.grad = torch.ones_like(p)
    plain.step()
    try:
        optimizer.load_state_dict(plain.state_dict())
        record["plain_error"] = ""
    except ValueError as error:
        record["plain_error"] = str(error)
    with pytest.raises(NotImplementedError, match="unsharded parameters"):
        to_torch(optimizer)

    # The rest of the family: DDP, and under FSDP2 each shard stepped like the plain optimizer on it, a
    # checkpoint with the moments under their names, resumed bit for bit.
    record["family"] = {}
    for name, make in FAMILY.items():
        seen = {}
        ddp_net = ddp_model()
        ddp = DistributedDataParallel(ddp_net)
        ddp_optimizer = make(ddp.parameters())
        for step in range(STEPS):
            x, y = ddp_batch(step)
            ddp_optimizer.zero_grad()
            nn.functional.mse_loss(ddp(x.chunk(world_size)[rank]), y.chunk(world_size)[rank]).backward()
            ddp_optimizer.step()
        seen["ddp"] = [p.detach().clone() for p in ddp_net.parameters()]
        model = sharded(Net(), world_size)
        optimizer = make(model.parameters())
        shadow = None if name in WHOLE_TENSOR_NORMS else Shadow(model, optimizer, make)
        train(model, optimizer, STEPS, rank, shadow=shadow)
        seen["shadow_mismatches"] = shadow.mismatches if shadow else 0
        if name in WHOLE_TENSOR_NORMS:
            seen["unorm"] = {n: optimizer.state[p]["unorm_vec"].item() for n, p in model.named_parameters()}
            # the float32-state variant beside the whole tensors
            make32, full_model = WHOLE_TENSOR_NORMS[name], sharded(Net(), world_size)
            full = FullShadow(full_model, make32)
            train(full_model, make32(full_model.parameters()), STEPS, rank, shadow=full)
            seen["full_worst"] = (full.worst_param, full.worst_norm)
        # fc1.weight has 4928 elements, its shards 2496 and 2432: min_8bit_size applies to the whole parameter
        seen["fc1_8bit"] = optimizer.state[model.fc1.weight]["state1"].dtype == torch.uint8
        seen["moment_names"] = sorted(set(optimizer.state_dict()["state"][0]) - {"step"})
        seen["scale_counts"] = {n: optimizer.state[p].get("absmax2", torch.zeros(0)).numel()
                                for n, p in model.named_parameters()}
        path = os.path.join(out_dir, f"family-{name}")
        save_checkpoint(path, model, optimizer)
        train(model, optimizer, 2, rank, first_step=STEPS)
        resumed = sharded(Net(seed=1), world_size)
        resumed_optimizer = make(resumed.parameters())
        load_checkpoint(path, resumed, resumed_optimizer)
        train(resumed, resumed_optimizer, 2, rank, first_step=STEPS)
        after, again = full_params(model), full_params(resumed)
        seen["resumed"] = all(same_bits(after[k], again[k]) for k in after)
        record["family"][name] = seen
    return record


def one_rank(rank, world_size, out_dir):
    model = sharded(Net(seed=2), world_size)
    optimizer = pyquant.AdamW8bit(model.parameters(), lr=LR)
    load_checkpoint(os.path.join(out_dir, "checkpoint"), model, optimizer)
    record = {"loaded_params": full_params(model), "loaded_moments": full_moments(optimizer)}
    record["state_bytes"] = optimizer.state_bytes()
    record["absmax"] = {key: s["absmax1"] for key, s in enumerate(optimizer.state.values()) if "absmax1" in s}
    # The same global batches the two ranks took, now in one process.
    for step in range(STEPS, 2 * STEPS):
        x, y = zip(*(fsdp_batch(step, r) for r in range(2)))
        optimizer.zero_grad()
        nn.functional.mse_loss(model(torch.cat(x)), torch.cat(y)).backward()
        optimizer.step()
    record["continued"] = full_params(model)
    return record


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("distributed"))
    two = spawn(two_ranks, 2, out_dir)
    one = spawn(one_rank, 1, out_dir)
    return two, one[0]


# ---- DDP ----
def test_ddp_gives_every_rank_the_bits_of_one_process_on_the_global_batch(runs):
    two, _ = runs
    # One process, same global batch and same gradient arithmetic: each half's mean-loss gradient, halved
    # (exact), summed. gloo's sum of two values is the same on both ranks and in any order.

    def halves(model, x, y):
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            (nn.functional.mse_loss(model(xs), ys) * 0.5).backward()

    model = one_process_ddp_run(halves)
    for rank in (0, 1):
        for ours, theirs in zip(model.parameters(), two[rank]["ddp"]):
            assert same_bits(ours.detach(), theirs), f"rank {rank}: {int((bits(ours) != bits(theirs)).sum())} differ"


def test_ddp_against_one_forward_over_the_global_batch_stays_within_the_stated_bound(runs):
    two, _ = runs
    # One forward over all 16 samples sums the gradient in another order: a few ulp apart, and Adam's
    # normalised update turns that into parameter differences far below one step (lr) per element.
    model = one_process_ddp_run(lambda model, x, y: nn.functional.mse_loss(model(x), y).backward())
    worst = max((p.detach() - q).abs().max().item() for p, q in zip(model.parameters(), two[0]["ddp"]))
    assert worst <= 0.05 * LR * STEPS


# ---- FSDP2 ----
def test_fsdp2_steps_each_local_shard_like_adam8bit_on_that_shard(runs):
    two, _ = runs
    assert two[0]["local_shapes"]["fc1.weight"] == (39, 64) and two[1]["local_shapes"]["fc1.weight"] == (38, 64)
    assert two[1]["local_shapes"]["scale"] == (0, 4160) and two[1]["local_shapes"]["head.bias"] == (0,)
    assert [r["shadow_mismatches"] for r in two] == [0, 0]


def expected_state_bytes(local_shapes):
    total = 0
    for name, shape in local_shapes.items():
        n = math.prod(shape)
        full_size = {"fc1.weight": 4928, "fc2.weight": 7392, "scale": 4160}.get(name, 0)
        total += 2 * n + 2 * 4 * -(-n // OPTIMIZER_BLOCK) if full_size >= 4096 else 8 * n
    return total


def test_optimizer_state_bytes_per_rank_fall_with_the_number_of_ranks(runs):
    two, one = runs
    full_shapes = {name: tuple(p.shape) for name, p in Net().named_parameters()}
    assert one["state_bytes"] == expected_state_bytes(full_shapes) == 35648
    assert [r["state_bytes"] for r in two] == [expected_state_bytes(r["local_shapes"]) for r in two] == [22512, 13144]
    assert [r["resumed_state_bytes"] for r in two] == [22512, 13144]


def test_fsdp2_checkpoint_resumes_bit_for_bit_at_the_same_world_size(runs):
    two, _ = runs
    for rank in (0, 1):
        for name, p in two[rank]["uninterrupted"].items():
            assert same_bits(p, two[rank]["resumed"][name]), f"rank {rank}, {name}"
    assert not same_bits(two[0]["saved_params"]["fc1.weight"], two[0]["uninterrupted"]["fc1.weight"])


@pytest.mark.parametrize("name", ["AdamW8bit", "AdamW4bit"])
def test_fsdp2_master_weights_live_per_shard_and_resume_bit_for_bit(runs, name):
    two, _ = runs
    assert all(r["master_in_state"][name] and r["master_resumed"][name] for r in two)


def test_two_rank_checkpoint_loads_in_one_rank_and_training_continues(runs):
    two, one = runs
    for name, p in two[0]["saved_params"].items():
        assert same_bits(one["loaded_params"][name], p), name
    code_gaps = {
        "exp_avg": (F.create_dynamic_map(True).diff()).max(),
        "exp_avg_sq": (F.create_dynamic_map(False).diff()).max(),
    }
    # Parameters with float32 states come back exactly; 8-bit ones are re-quantised in the blocks of the
    # whole tensor: within one code gap of their block's scale.
    for key, saved in two[0]["saved_moments"].items():
        for m, value in saved.items():
            loaded = one["loaded_moments"][key][m]
            if value.numel() < 4096:
                assert same_bits(loaded, value)
            else:
                scale = value.reshape(-1).abs().max()
                assert (loaded - value).abs().max() <= code_gaps[m] * scale
    for name, p in one["continued"].items():
        drift = (p - two[0]["uninterrupted"][name]).abs().max().item()
        assert drift <= 0.5 * LR * STEPS, name  # same batches: close to the 2-rank run
        assert not same_bits(p, one["loaded_params"][name]), name  # it trained on


def test_checkpoint_of_another_model_is_refused_and_nothing_changes(runs):
    two, _ = runs
    for r in two:
        assert "does not fit this model and optimizer" in r["other_error"]
        assert "fc1.weight" in r["other_error"] and "80" in r["other_error"]
        assert r["other_kept_params"] and r["other_kept_state"] and r["fresh_left_empty"]
        assert "sharded DTensor" in r["plain_error"] and "exp_avg" in r["plain_error"]


# ---- the rest of the family ----
@pytest.mark.parametrize("name", FAMILY)
def test_family_under_ddp_gives_every_rank_the_bits_of_one_process(runs, name):
    two, _ = runs

    def halves(model, x, y):
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            (nn.functional.mse_loss(model(xs), ys) * 0.5).backward()

    model = one_process_ddp_run(halves, FAMILY[name])
    for rank in (0, 1):
        for ours, theirs in zip(model.parameters(), two[rank]["family"][name]["ddp"]):
            assert same_bits(ours.detach(), theirs), f"rank {rank}"


@pytest.mark.parametrize("name", FAMILY)
def test_family_under_fsdp2_steps_each_shard_and_resumes_bit_for_bit(runs, name):
    two, _ = runs
    for rank in (0, 1):
        seen = two[rank]["family"][name]
        assert seen["shadow_mismatches"] == 0, f"rank {rank}"
        assert seen["fc1_8bit"], f"rank {rank}"
        assert seen["moment_names"] == sorted(FAMILY_MOMENTS[name])
        assert seen["resumed"], f"rank {rank}"


@pytest.mark.parametrize("name", WHOLE_TENSOR_NORMS)
def test_trust_ratios_under_fsdp2_take_the_whole_tensors_norms(runs, name):
    two, _ = runs
    # Every rank records the same ||direction|| for each parameter, though their shards differ (fc1.weight's
    # rows split 39/38, scale sits whole on rank 0): the norms are the whole tensor's ...
    norms = [r["family"][name]["unorm"] for r in two]
    assert norms[0] == norms[1] and all(v > 0 for v in norms[0].values())
    # ... and with float32 states the sharded step is the step over whole tensors, to the order of a float64 sum.
    for r in two:
        worst_param, worst_norm = r["family"][name]["full_worst"]
        assert worst_param <= 1e-6 and worst_norm <= 1e-6, (worst_param, worst_norm)


def test_4bit_rank1_maxima_are_each_shards_own(runs):
    two, _ = runs
    # fc1.weight (77 x 64) splits 39/38 rows: each rank keeps its rows' and its columns' maxima; the scale row
    # (1 x 4160) is whole on rank 0, and rank 1's empty shard still has 4160 (zero) column maxima.
    assert two[0]["family"]["AdamW4bit"]["scale_counts"]["fc1.weight"] == 39 + 64
    assert two[1]["family"]["AdamW4bit"]["scale_counts"]["fc1.weight"] == 38 + 64
    assert [r["family"]["AdamW4bit"]["scale_counts"]["scale"] for r in two] == [1 + 4160, 0 + 4160]


# ---- the re-quantisation on load, without processes ----
def test_requantising_saved_moments_gives_back_the_same_blocks():
    p = nn.Parameter(torch.randn(20_000))
    optimizer = pyquant.AdamW8bit([p], lr=LR)
    plain_misses = 0
    for step in range(8):
        g = torch.Generator().manual_seed(step)
        p.grad = torch.randn(p.shape, generator=g) * 10.0 ** torch.randint(-6, 2, p.shape, generator=g)
        optimizer.step()
        state = optimizer.state[p]
        for key in ("1", "2"):
            q, absmax, code = state["state" + key], state["absmax" + key], state["qmap" + key]
            moment = F.dequantize_blockwise(q, absmax, code, OPTIMIZER_BLOCK)
            new_q, new_absmax = quantize_moment(moment, code)
            assert same_bits(new_q, q) and same_bits(new_absmax, absmax), f"step {step}, moment {key}"
            plain_misses += int((F.quantize_blockwise(moment, code, OPTIMIZER_BLOCK)[0] != q).sum())
    assert plain_misses > 0  # plain re-quantisation would not have given these blocks back
    # Moments that no block represents (float32 Adam's) get the plain quantisation.
    other = torch.randn(1000)
    ours, plain = quantize_moment(other, state["qmap1"]), F.quantize_blockwise(other, state["qmap1"])
    assert same_bits(ours[0], plain[0]) and same_bits(ours[1], plain[1])


def test_requantising_saved_4bit_moments_gives_back_the_same_codes_and_scales():
    # What DCP loading does with a shard's dequantised 4-bit moments: block-wise m (signed map, no -1),
    # rank-1 v of a matrix and of a 3-D tensor, block-wise v of a vector; odd sizes, partial last blocks.
    params = [nn.Parameter(torch.randn(shape)) for shape in ((77, 65), (5, 9, 101), (4099,))]
    optimizer = pyquant.AdamW4bit(params, lr=LR, min_4bit_size=0)
    plain_misses = 0
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 10.0 ** torch.randint(-6, 2, p.shape, generator=g)
        optimizer.step()
        for p in params:
            state = optimizer.state[p]
            assert state["rank1"] == (p.dim() > 1)
            for number in (1, 2):
                q, scales = state[f"state{number}"], state[f"absmax{number}"]
                moment = optimizer._dequantized_moment(p.detach(), number, q, scales, state)
                new_q, new_scales = optimizer._quantized_moment(moment, number)
                assert same_bits(new_q, q) and same_bits(new_scales, scales), f"step {step}, {tuple(p.shape)}, {number}"
                plain = F.quantize_4bit_state(moment, p.shape, number == 2 and state["rank1"], state[f"qmap{number}"])
                plain_misses += int((plain[0] != q).sum())
    assert plain_misses > 0  # m's blocks led by a negative value: plain re-quantisation would not give them back
