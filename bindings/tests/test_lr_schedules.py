"""zinf.lr_schedules against DeepSpeed's warmup formulas, written out here independently.

The module is loaded from its file, so these tests run without the compiled extension that zinf/__init__.py
imports. Rates are compared to 1e-12 relative: the same formula in another order of operations differs by an ulp.
"""
import ast
import importlib.util
import math
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "zinf" / "lr_schedules.py"
_SPEC = importlib.util.spec_from_file_location("zinf_lr_schedules_under_test", _PATH)
lrs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(lrs)

# Steps checked: start, second, mid-warmup, last warmup step, end of warmup, after it, around and past the total.
WARMUP, TOTAL = 10, 30
STEPS = [0, 1, 5, 9, 10, 11, 20, 29, 30, 31, 45]


def approx(values):
    return pytest.approx(values, rel=1e-12, abs=1e-15)


def warmup_fraction(step, num_steps, warmup_type):
    """DeepSpeed's warmup curve: log(step + 1) / log(n) for "log", step / n for "linear"."""
    if warmup_type == "log":
        return math.log(step + 1) / math.log(num_steps)
    return step / num_steps


def expected_warmup_lr(step, lo, hi, n, warmup_type):
    return lo + (hi - lo) * (warmup_fraction(step, n, warmup_type) if step < n else 1.0)


def expected_decay_lr(step, lo, hi, n, total, warmup_type):
    if step < n:
        return lo + (hi - lo) * warmup_fraction(step, n, warmup_type)
    # A straight line from hi at step n to lo at step total, then held at lo.
    return lo + (hi - lo) * max(0.0, (total - step) / max(1, total - n))


def expected_cosine_ratio(step, wmin, cmin, n, total, warmup_type):
    if step < n:
        return wmin + (1 - wmin) * warmup_fraction(step, n, warmup_type)
    progress = min(1.0, (step - n + 1) / max(1, total - n))
    return cmin + (1 - cmin) * (1 + math.cos(math.pi * progress)) / 2


def run(scheduler, last):
    """The rates step() applies at each iteration 0..last (the first step() gives iteration 0)."""
    seen = {}
    for step in range(last + 1):
        scheduler.step()
        seen[step] = scheduler.get_last_lr()
        assert scheduler.get_lr() == seen[step]
    return seen


class Groups:
    """An optimizer stand-in: only param_groups, as zinf's own optimizer wrapper would have."""

    def __init__(self, *rates):
        self.param_groups = [{"lr": rate, "params": []} for rate in rates]

    def rates(self):
        return [group["lr"] for group in self.param_groups]


@pytest.mark.parametrize("warmup_type", ["log", "linear"])
def test_warmup_lr(warmup_type):
    scheduler = lrs.WarmupLR([0.5, 0.7], warmup_min_lr=0.01, warmup_max_lr=0.1, warmup_num_steps=WARMUP,
                             warmup_type=warmup_type)
    assert scheduler.get_last_lr() == [0.01, 0.01]  # not started: the minimum
    seen = run(scheduler, max(STEPS))
    for step in STEPS:
        assert seen[step] == approx([expected_warmup_lr(step, 0.01, 0.1, WARMUP, warmup_type)] * 2), step
    assert seen[0] == approx([0.01, 0.01])
    assert seen[WARMUP] == approx([0.1, 0.1]) and seen[45] == approx([0.1, 0.1])
    last_warmup = 0.1 if warmup_type == "log" else 0.01 + 0.09 * 0.9  # log(10)/log(10) = 1; 9/10
    assert seen[WARMUP - 1] == approx([last_warmup] * 2)


@pytest.mark.parametrize("warmup_type", ["log", "linear"])
def test_warmup_decay_lr(warmup_type):
    scheduler = lrs.WarmupDecayLR([0.5], total_num_steps=TOTAL, warmup_min_lr=0.01, warmup_max_lr=0.1,
                                  warmup_num_steps=WARMUP, warmup_type=warmup_type)
    assert scheduler.get_last_lr() == [0.01]
    seen = run(scheduler, max(STEPS))
    for step in STEPS:
        assert seen[step] == approx([expected_decay_lr(step, 0.01, 0.1, WARMUP, TOTAL, warmup_type)]), step
    assert seen[WARMUP] == approx([0.1])  # the peak is at the end of warmup
    assert seen[20] == approx([0.01 + 0.09 * 0.5])  # half way down
    assert seen[TOTAL] == approx([0.01]) and seen[45] == approx([0.01])  # held at the minimum, not below


@pytest.mark.parametrize("warmup_type", ["log", "linear"])
def test_warmup_cosine_lr(warmup_type):
    base = [0.2, 0.05]
    scheduler = lrs.WarmupCosineLR(base, total_num_steps=TOTAL, warmup_min_ratio=0.1, warmup_num_steps=WARMUP,
                                   cos_min_ratio=0.01, warmup_type=warmup_type)
    assert scheduler.get_last_lr() == [0.0, 0.0]  # not started: zero
    seen = run(scheduler, max(STEPS))
    for step in STEPS:
        ratio = expected_cosine_ratio(step, 0.1, 0.01, WARMUP, TOTAL, warmup_type)
        assert seen[step] == approx([lr * ratio for lr in base]), step
    assert seen[0] == approx([0.02, 0.005])  # warmup_min_ratio of each group's own rate
    # The floor is reached one step before total_num_steps and held, not climbing back along the cosine.
    for step in (TOTAL - 1, TOTAL, 45):
        assert seen[step] == approx([0.002, 0.0005]), step
    assert seen[TOTAL - 2] > seen[TOTAL - 1]


def test_defaults():
    warm = lrs.WarmupLR([0.3, 0.6])
    assert warm.last_batch_iteration == -1
    assert (warm.min_lrs, warm.max_lrs, warm.warmup_num_steps, warm.warmup_type) == ([0, 0], [0.3, 0.6], 1000, "log")
    warm.step(500)  # WarmupLR's maximum defaults to each group's own rate
    assert warm.get_last_lr() == approx([0.3 * math.log(501) / math.log(1000), 0.6 * math.log(501) / math.log(1000)])
    decay = lrs.WarmupDecayLR([0.3], 5000)
    assert (decay.min_lrs, decay.max_lrs, decay.warmup_num_steps, decay.warmup_type) == ([0], [0.001], 1000, "log")
    cosine = lrs.WarmupCosineLR([0.3], 5000)
    assert (cosine.warmup_min_ratio, cosine.cos_min_ratio, cosine.warmup_num_steps, cosine.warmup_type) == (
        0, 0.0001, 1000, "log")
    assert decay.last_batch_iteration == cosine.last_batch_iteration == -1


def test_per_group_min_and_max():
    scheduler = lrs.WarmupLR([1.0, 1.0], warmup_min_lr=[0.0, 0.1], warmup_max_lr=(1.0, 0.2), warmup_num_steps=4,
                             warmup_type="linear")
    assert run(scheduler, 4)[2] == approx([0.5, 0.15])


@pytest.mark.parametrize("cls", [lrs.WarmupLR, lrs.WarmupDecayLR, lrs.WarmupCosineLR])
def test_one_warmup_step_is_two(cls):
    # DeepSpeed warms up over at least 2 steps (log(1) = 0 cannot divide): with 1, step 1 is still in warmup.
    args = ([1.0],) if cls is lrs.WarmupLR else ([1.0], 100)
    scheduler = cls(*args, warmup_num_steps=1, warmup_type="linear")
    assert scheduler.warmup_num_steps == 2
    scheduler.step(1)
    lo, hi = (0.0, 1.0) if cls is lrs.WarmupCosineLR else (0.0, scheduler.max_lrs[0])
    assert scheduler.get_last_lr() == approx([lo + (hi - lo) / 2])


def test_step_with_an_iteration_jumps_there():
    scheduler = lrs.WarmupDecayLR([0.5], TOTAL, warmup_min_lr=0.01, warmup_max_lr=0.1, warmup_num_steps=WARMUP)
    scheduler.step(20)
    assert scheduler.last_batch_iteration == 20
    assert scheduler.get_last_lr() == approx([expected_decay_lr(20, 0.01, 0.1, WARMUP, TOTAL, "log")])
    scheduler.step()  # counts on from there
    assert scheduler.last_batch_iteration == 21
    assert scheduler.get_last_lr() == approx([expected_decay_lr(21, 0.01, 0.1, WARMUP, TOTAL, "log")])


@pytest.mark.parametrize("make", [
    lambda: lrs.WarmupLR([0.5], 0.01, 0.1, WARMUP),
    lambda: lrs.WarmupDecayLR([0.5], TOTAL, 0.01, 0.1, WARMUP, "linear"),
    lambda: lrs.WarmupCosineLR([0.5], TOTAL, 0.1, WARMUP, 0.01),
])
def test_state_dict_resumes_at_the_same_rate(make):
    first = make()
    run(first, 12)
    state = first.state_dict()
    assert state == {"last_batch_iteration": 12}
    second = make()
    second.load_state_dict(state)
    assert second.last_batch_iteration == 12 and second.get_lr() == first.get_lr()
    for _ in range(25):
        first.step()
        second.step()
        assert second.get_last_lr() == first.get_last_lr()


def test_param_groups_write_through():
    groups = Groups(0.4, 0.8)
    scheduler = lrs.WarmupCosineLR(groups, TOTAL, warmup_min_ratio=0.1, warmup_num_steps=WARMUP)
    assert scheduler.base_lrs == [0.4, 0.8]  # read before the constructor overwrites them
    assert groups.rates() == [0.0, 0.0]
    for step in range(40):
        scheduler.step()
        assert groups.rates() == scheduler.get_last_lr() == scheduler.get_lr(), step
    warm = lrs.WarmupLR(Groups(0.3), warmup_min_lr=0.05)
    assert warm.optimizer.rates() == [0.05]
    warm.step(WARMUP * 1000)
    assert warm.optimizer.rates() == [0.3]
    # A plain list of rates has nothing to write to: it is left as it was.
    base = [0.4]
    lrs.WarmupLR(base, 0.01, 0.1).step(500)
    assert base == [0.4]


def test_torch_optimizer_write_through():
    torch = pytest.importorskip("torch")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.2})
    scheduler = lrs.WarmupCosineLR(optimizer, TOTAL, warmup_num_steps=WARMUP)
    scheduler.step(WARMUP - 1)
    assert [group["lr"] for group in optimizer.param_groups] == approx([0.1, 0.2])
    # A tensor lr is filled in place, so whatever holds a reference to it sees the new rate.
    tensor_lr = torch.tensor(0.5, dtype=torch.float64)
    scheduler = lrs.WarmupLR(Groups(tensor_lr), warmup_min_lr=0.0, warmup_max_lr=0.25, warmup_num_steps=WARMUP)
    scheduler.step(WARMUP)
    assert scheduler.optimizer.param_groups[0]["lr"] is tensor_lr and tensor_lr.item() == 0.25


def test_resuming_constructor_leaves_groups_alone():
    groups = Groups(0.7)
    scheduler = lrs.WarmupLR(groups, 0.0, 0.1, WARMUP, last_batch_iteration=4)
    assert groups.rates() == [0.7]
    with pytest.raises(RuntimeError, match="step"):
        scheduler.get_last_lr()
    scheduler.step()
    assert groups.rates() == approx([expected_warmup_lr(5, 0.0, 0.1, WARMUP, "log")])


def test_from_config_matches_the_constructor():
    block = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.01, "warmup_max_lr": 0.1,
                                                 "warmup_num_steps": WARMUP, "total_num_steps": TOTAL,
                                                 "warmup_type": "linear"}}
    scheduler = lrs.from_config(block, [0.5])
    assert type(scheduler) is lrs.WarmupDecayLR
    assert run(scheduler, 40) == run(lrs.WarmupDecayLR([0.5], TOTAL, 0.01, 0.1, WARMUP, "linear"), 40)
    assert type(lrs.from_config({"type": "WarmupLR", "params": {}}, [0.1])) is lrs.WarmupLR
    assert type(lrs.from_config({"type": "WarmupCosineLR", "params": {"total_num_steps": 2000}}, [0.1])) \
        is lrs.WarmupCosineLR
    assert lrs.from_config({"type": "WarmupLR"}, Groups(0.1)).get_last_lr() == [0.0]  # params may be left out
    assert lrs.from_config(None, [0.1]) is None  # no block: no schedule, as in DeepSpeed
    assert sorted(lrs.SCHEDULERS) == ["LRRangeTest", "OneCycle", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR"]


@pytest.mark.parametrize("block, key", [
    ({"type": "OneCycle", "params": {}}, "scheduler.params.cycle_min_lr"),
    ({"type": "OneCycleLR", "params": {}}, "scheduler.type"),  # torch's, but needs an optimizer
    ({"type": "NoSuchSchedule", "params": {}}, "scheduler.type"),
    ({"type": "warmuplr", "params": {}}, "scheduler.type"),  # DeepSpeed's names are case-sensitive
    ({"params": {}}, "scheduler.type"),
    ({"type": ["WarmupLR"]}, "scheduler.type"),
    ({"type": "WarmupLR", "param": {}}, "scheduler.param"),
    ({"type": "WarmupLR", "params": []}, "scheduler.params"),
    ({"type": "WarmupLR", "params": {"warmup_max_ratio": 1}}, "scheduler.params.warmup_max_ratio"),
    ({"type": "WarmupCosineLR", "params": {"total_num_steps": 9, "warmup_max_lr": 1}},
     "scheduler.params.warmup_max_lr"),
    ({"type": "WarmupDecayLR", "params": {}}, "scheduler.params.total_num_steps"),
    ({"type": "WarmupCosineLR", "params": {"warmup_num_steps": 5}}, "scheduler.params.total_num_steps"),
    ({"type": "WarmupDecayLR", "params": {"total_num_steps": "30"}}, "scheduler.params.total_num_steps"),
    ({"type": "WarmupLR", "params": {"warmup_num_steps": 0}}, "scheduler.params.warmup_num_steps"),
    ({"type": "WarmupLR", "params": {"warmup_num_steps": -3}}, "scheduler.params.warmup_num_steps"),
    ({"type": "WarmupDecayLR", "params": {"total_num_steps": 30, "warmup_num_steps": 10.0}},
     "scheduler.params.warmup_num_steps"),
    ({"type": "WarmupCosineLR", "params": {"total_num_steps": 30, "warmup_num_steps": True}},
     "scheduler.params.warmup_num_steps"),
    ({"type": "WarmupLR", "params": {"warmup_min_lr": "0.1"}}, "scheduler.params.warmup_min_lr"),
    ({"type": "WarmupLR", "params": {"warmup_max_lr": [0.1, 0.2, 0.3]}}, "scheduler.params.warmup_max_lr"),
    ({"type": "WarmupCosineLR", "params": {"total_num_steps": 30, "cos_min_ratio": None}},
     "scheduler.params.cos_min_ratio"),
    ({"type": "WarmupCosineLR", "params": {"total_num_steps": 30, "warmup_min_ratio": [0.1, 0.1]}},
     "scheduler.params.warmup_min_ratio"),
    ({"type": "WarmupLR", "params": {"last_batch_iteration": 1.5}}, "scheduler.params.last_batch_iteration"),
])
def test_config_errors_name_their_key(block, key):
    with pytest.raises(ValueError) as error:
        lrs.from_config(block, [0.1, 0.2])
    message = str(error.value)
    assert message.startswith(key + " ") or message.startswith(key + ":"), message
    if key == "scheduler.type" and "needs an optimizer" not in message:
        assert all(name in message for name in ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle",
                                                "LRRangeTest")), message


@pytest.mark.parametrize("kind, key", [
    ("WarmupLR", "warmup_max_lr"), ("WarmupLR", "warmup_min_lr"), ("WarmupLR", "warmup_type"),
    ("WarmupDecayLR", "total_num_steps"), ("WarmupDecayLR", "warmup_num_steps"),
    ("WarmupCosineLR", "warmup_min_ratio"), ("WarmupCosineLR", "cos_min_ratio"),
])
def test_auto_must_be_resolved(kind, key):
    params = {"total_num_steps": 30} if kind != "WarmupLR" else {}
    params[key] = "auto"
    with pytest.raises(ValueError, match=rf'^scheduler\.params\.{key} is "auto": the caller must resolve it'):
        lrs.from_config({"type": kind, "params": params}, [0.1])
    # Also inside a per-group list, and when the constructor is called directly.
    if key in ("warmup_min_lr", "warmup_max_lr"):
        with pytest.raises(ValueError, match=rf'^scheduler\.params\.{key} is "auto"'):
            lrs.WarmupLR([0.1, 0.2], **{key: [0.1, "auto"]})


def test_bad_base_lrs():
    for bad in (0.1, ["x"], [None], Groups(0.1).param_groups[0]):
        with pytest.raises(ValueError, match="^optimizer_or_base_lrs"):
            lrs.WarmupLR(bad)


def test_total_below_warmup_warns_as_deepspeed_does():
    with pytest.warns(UserWarning, match=r"scheduler\.params\.total_num_steps \(5\) is less than"):
        decay = lrs.WarmupDecayLR([0.5], 5, warmup_min_lr=0.01, warmup_max_lr=0.1, warmup_num_steps=WARMUP)
    decay.step(WARMUP)
    assert decay.get_last_lr() == approx([0.01])  # no decay window: straight to the minimum
    with pytest.warns(UserWarning, match=r"scheduler\.params\.total_num_steps \(10\) is less than"):
        cosine = lrs.WarmupCosineLR([0.5], WARMUP, warmup_num_steps=WARMUP + 1, cos_min_ratio=0.01)
    cosine.step(WARMUP + 1)
    assert cosine.get_last_lr() == approx([0.005])


def test_unknown_warmup_type_warns_and_uses_log():
    with pytest.warns(UserWarning, match=r"scheduler\.params\.warmup_type"):
        scheduler = lrs.WarmupLR([0.1], 0.0, 1.0, WARMUP, warmup_type="cosine")
    assert scheduler.warmup_type == "log"
    scheduler.step(4)
    assert scheduler.get_last_lr() == approx([math.log(5) / math.log(WARMUP)])


def test_imports_nothing_from_zinf():
    # Only the standard library, so the schedules load without the compiled extension.
    tree = ast.parse(_PATH.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or "").split(".")[0])
    # torch only inside the function that builds torch's own schedulers by name.
    assert imported <= {"inspect", "math", "numbers", "warnings", "torch"}, imported
    top_level = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    assert "torch" not in top_level


def expected_one_cycle(step, lo, hi, first, second, decay_rate=0.0, decay_size=0):
    """DeepSpeed's 1-cycle rate, written out: a triangle from lo up to hi over `first` iterations and back
    down over `second`, then lo / (1 + decay_rate * k / decay_size), k iterations past the cycle."""
    total = first + second
    if step < total:
        i = step + 1
        cycle = math.floor(1 + i / total)
        x = 1 + i / total - cycle
        ratio = first / total
        scale = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
        return lo + (hi - lo) * scale
    if decay_size == 0 or decay_rate == 0:
        return lo
    return lo / (1 + decay_rate * (step - total + 1) / decay_size)


def test_one_cycle_rates_and_momentum():
    groups = Groups(0.5, 0.5)
    for group in groups.param_groups:
        group["betas"] = (0.9, 0.999)
    schedule = lrs.OneCycle(groups, cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=10,
                            cycle_second_step_size=20, decay_lr_rate=0.5, decay_step_size=4, cycle_min_mom=0.85,
                            cycle_max_mom=0.95, decay_mom_rate=0.01)
    # Not started: the minimum rate and beta1 at its minimum, beta2 set to 0.99 as DeepSpeed does.
    assert groups.rates() == [0.01, 0.01] and groups.param_groups[0]["betas"] == (0.85, 0.99)
    seen = run(schedule, 45)
    for step in (0, 5, 9, 10, 15, 29, 30, 33, 45):
        want = expected_one_cycle(step, 0.01, 0.1, 10, 20, 0.5, 4)
        assert seen[step] == approx([want, want]), step
    schedule.step(4)  # climbing: beta1 goes down as the rate goes up
    rate_scale = (groups.rates()[0] - 0.01) / (0.1 - 0.01)
    assert groups.param_groups[1]["betas"] == approx((0.95 - (0.95 - 0.85) * rate_scale, 0.99))
    schedule.step(31)  # after the cycle: beta1 = max * (1 + rate * k / size)
    assert groups.param_groups[0]["betas"] == approx((0.95 * (1 + 0.01 * 2 / 4), 0.99))


def test_one_cycle_without_betas_cycles_the_rate_only():
    groups = Groups(0.1)  # Adagrad's groups have no betas
    with pytest.warns(UserWarning, match="cycle_momentum"):
        schedule = lrs.OneCycle(groups, 0.001, 0.01, cycle_first_step_size=4)
    schedule.step(3)
    assert groups.rates() == approx([0.01]) and "betas" not in groups.param_groups[0]


def test_lr_range_test_grows_continuously_or_by_stairs():
    for staircase in (False, True):
        groups = Groups(0.3, 0.3)
        schedule = lrs.LRRangeTest(groups, lr_range_test_min_lr=[0.001, 0.002], lr_range_test_step_size=4,
                                   lr_range_test_step_rate=2.0, lr_range_test_staircase=staircase)
        assert groups.rates() == [0.001, 0.002]
        seen = run(schedule, 12)
        for step in (0, 2, 3, 7, 12):
            interval = (step + 1) / 4
            interval = math.floor(interval) if staircase else interval
            assert seen[step] == approx([0.001 * (1 + 2 * interval), 0.002 * (1 + 2 * interval)]), (staircase, step)


def test_from_config_builds_the_two_and_torchs_by_name():
    torch = pytest.importorskip("torch")
    block = {"type": "OneCycle", "params": {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01,
                                            "cycle_first_step_size": 5}}
    groups = Groups(0.1)
    groups.param_groups[0]["betas"] = (0.9, 0.999)
    assert isinstance(lrs.from_config(block, groups), lrs.OneCycle)
    block = {"type": "LRRangeTest", "params": {"lr_range_test_min_lr": 0.002}}
    assert isinstance(lrs.from_config(block, [0.1]), lrs.LRRangeTest)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    step_lr = lrs.from_config({"type": "StepLR", "params": {"step_size": 2, "gamma": 0.5}}, optimizer)
    assert isinstance(step_lr, torch.optim.lr_scheduler.StepLR)
    for _ in range(4):
        optimizer.step()
        step_lr.step()
    assert optimizer.param_groups[0]["lr"] == approx(0.025)
    with pytest.raises(ValueError, match="scheduler.params: StepLR refused them"):
        lrs.from_config({"type": "StepLR", "params": {"steps": 2}}, optimizer)
