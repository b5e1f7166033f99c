"""The numpy schedulers against diffusers' own (the oracle) and against the spec's numbers (section 7).

Only this test module imports torch/diffusers; the runtime module itself must stay torch-free.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import diffusers.schedulers.scheduling_flow_match_lcm as lcm_module
from diffusers import FlowMatchLCMScheduler, UniPCMultistepScheduler

from hidream_export.runtime.schedulers import (
    FlashFlowEulerScheduler,
    FlowUniPCScheduler,
    calculate_shift,
    from_config,
    from_file,
    make_scheduler,
)
from hidream_export.variants import VARIANTS

SHIFTS = (1.0, 3.0, 6.0)
SHAPE = (2, 4, 8, 8)
# Step parity tolerance (float32): both sides run the same float32 formulas; they differ only by a few
# ulps where numpy's and torch's float32 log/expm1/solve round differently (measured max ~1e-6 absolute
# on values of magnitude ~3 after 50 steps).
RTOL, ATOL = 1e-5, 1e-6

# HiDream-I1-Full's scheduler/scheduler_config.json (the keys that matter; everything else is default).
FULL_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "num_train_timesteps": 1000,
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "prediction_type": "flow_prediction",
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "use_dynamic_shifting": False,
}
DEV_CONFIG = {"_class_name": "FlowMatchLCMScheduler", "num_train_timesteps": 1000, "shift": 6.0,
              "use_dynamic_shifting": False}


def diffusers_unipc(shift=3.0):
    """diffusers' UniPC configured like the HiDream-I1-Full model folder."""
    cfg = {k: v for k, v in FULL_CONFIG.items() if not k.startswith("_")}
    cfg["flow_shift"] = shift
    return UniPCMultistepScheduler(**cfg)


def diffusers_official_unipc(ours: FlowUniPCScheduler, n: int) -> UniPCMultistepScheduler:
    """The official FlowUniPC expressed in diffusers: the same UniPC step on custom sigmas
    linspace(sigma_max, 0, N+1)[:-1] shifted by exp(mu) (sigma_0 < 1, so no 1e-6 nudge applies)."""
    d = diffusers_unipc(shift=ours.second_shift)
    d.set_timesteps(sigmas=np.linspace(ours.sigma_max, 0.0, n + 1)[:-1])
    return d


def velocities(rng, n):
    """Plausible flow velocities: eps - x0 of one fixed image plus per-step model error."""
    x0 = rng.standard_normal(SHAPE, dtype=np.float32)
    eps = rng.standard_normal(SHAPE, dtype=np.float32)
    return eps, [eps - x0 + np.float32(0.1) * rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(n)]


# --- schedules ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", SHIFTS)
def test_unipc_schedule_matches_diffusers(shift):
    for n in range(1, 101):
        d = diffusers_unipc(shift)
        d.set_timesteps(n)
        ours = FlowUniPCScheduler(shift)
        ours.set_timesteps(n)
        assert ours.timesteps.dtype == np.int64 and ours.sigmas.dtype == np.float32
        np.testing.assert_array_equal(ours.timesteps, d.timesteps.numpy(), err_msg=f"N={n}")
        np.testing.assert_allclose(ours.sigmas, d.sigmas.numpy(), rtol=0, atol=1e-6, err_msg=f"N={n}")


@pytest.mark.parametrize("shift", SHIFTS)
def test_flash_schedule_matches_flow_match_lcm(shift):
    for n in range(1, 101):
        d = FlowMatchLCMScheduler(shift=shift)
        d.set_timesteps(n)
        ours = FlashFlowEulerScheduler(shift)
        ours.set_timesteps(n)
        assert ours.timesteps.dtype == np.float32 and ours.sigmas.dtype == np.float32
        # Same float32 arithmetic in the same order: equal, not just close.
        np.testing.assert_array_equal(ours.timesteps, d.timesteps.numpy(), err_msg=f"N={n}")
        np.testing.assert_allclose(ours.sigmas, d.sigmas.numpy(), rtol=0, atol=1e-6, err_msg=f"N={n}")


def test_official_unipc_schedule_is_diffusers_with_custom_sigmas():
    for n in range(1, 101):
        ours = FlowUniPCScheduler(3.0, "official")
        ours.set_timesteps(n)
        d = diffusers_official_unipc(ours, n)
        np.testing.assert_array_equal(ours.timesteps, d.timesteps.numpy(), err_msg=f"N={n}")
        np.testing.assert_allclose(ours.sigmas, d.sigmas.numpy(), rtol=0, atol=1e-6, err_msg=f"N={n}")


def test_spec_numbers_dev_and_fast():
    dev = make_scheduler("dev")
    np.testing.assert_allclose(dev.sigmas[:4], [1.0, 0.99367, 0.98693, 0.97973], atol=5e-6)
    np.testing.assert_allclose(dev.sigmas[-5:-1], [0.44151, 0.34164, 0.21148, 0.03478], atol=5e-6)
    assert dev.sigmas[-1] == 0 and len(dev.timesteps) == 28
    np.testing.assert_allclose(dev.timesteps, dev.sigmas[:-1] * 1000, rtol=1e-7)

    fast = make_scheduler("fast")
    np.testing.assert_allclose(
        fast.timesteps,
        [1000, 976.82, 951.38, 923.34, 892.29, 857.69, 818.92, 775.17, 725.42, 668.33, 602.15, 524.53,
         432.23, 320.62, 182.97, 8.93], atol=5e-3)


def test_spec_numbers_full_both_flavours():
    full = make_scheduler("full")
    assert full.timesteps.dtype == np.int64 and len(full.timesteps) == 50
    assert full.timesteps[:5].tolist() == [999, 993, 986, 979, 971]
    assert full.timesteps[-5:].tolist() == [251, 208, 162, 113, 60]

    official = make_scheduler("full", flavour="official")
    assert official.timesteps[:5].tolist() == [999, 993, 986, 980, 973]
    assert official.timesteps[-5:].tolist() == [259, 215, 167, 116, 60]
    assert official.mu == pytest.approx(1.15) and official.second_shift == pytest.approx(3.1582, abs=1e-4)
    # Full applies its shift twice in the official flavour: the two schedules differ by at most ~0.0118 in sigma.
    assert np.abs(official.sigmas - full.sigmas).max() == pytest.approx(0.0118, abs=5e-4)


# --- steps --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 5, 50])
def test_unipc_sampling_loop_matches_diffusers(n):
    rng = np.random.default_rng(n)
    eps, vs = velocities(rng, n)
    d = diffusers_unipc()
    d.set_timesteps(n)
    ours = make_scheduler("full", num_steps=n)
    assert not ours.needs_noise and ours.noise_shape(SHAPE) is None
    x, xd = eps.copy(), torch.from_numpy(eps.copy())
    for i, t in enumerate(d.timesteps):
        x = ours.step(vs[i], i, x)
        xd = d.step(torch.from_numpy(vs[i]), t, xd).prev_sample
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, xd.numpy(), rtol=RTOL, atol=ATOL, err_msg=f"step {i} of {n}")
    assert ours.step_index == n


@pytest.mark.parametrize("n", [1, 2, 5, 50])
def test_official_unipc_sampling_loop(n):
    rng = np.random.default_rng(100 + n)
    eps, vs = velocities(rng, n)
    ours = make_scheduler("full", flavour="official", num_steps=n)
    d = diffusers_official_unipc(ours, n)
    x, xd = eps.copy(), torch.from_numpy(eps.copy())
    for i, t in enumerate(d.timesteps):
        x = ours.step(vs[i], i, x)
        xd = d.step(torch.from_numpy(vs[i]), t, xd).prev_sample
        np.testing.assert_allclose(x, xd.numpy(), rtol=RTOL, atol=ATOL, err_msg=f"step {i} of {n}")


def test_unipc_last_step_returns_x0_and_first_step_is_euler():
    rng = np.random.default_rng(1)
    eps, (v0, v1) = velocities(rng, 2)
    s = make_scheduler("full", num_steps=2)
    x1 = s.step(v0, 0, eps)
    # Order 1 predictor == Euler x + (sigma_1 - sigma_0) * v.
    np.testing.assert_allclose(x1, eps + (s.sigmas[1] - s.sigmas[0]) * v0, rtol=1e-5, atol=1e-6)
    x2 = s.step(v1, 1, x1)
    np.testing.assert_array_equal(x2, x1 - s.sigmas[1] * v1)  # m_{N-1}, the x0 prediction


def test_unipc_history_does_not_alias_the_callers_buffer():
    rng = np.random.default_rng(3)
    eps, vs = velocities(rng, 6)
    a, b = make_scheduler("full", num_steps=6), make_scheduler("full", num_steps=6)
    x, buf = eps.copy(), eps.copy()
    for i, v in enumerate(vs):
        x = a.step(v, i, x)
        buf[...] = b.step(v, i, buf)  # a runtime with a preallocated latent buffer
    np.testing.assert_array_equal(buf, x)


@pytest.mark.parametrize("variant,n", [("dev", 28), ("fast", 16), ("fast", 1), ("dev", 3)])
def test_flash_sampling_loop_matches_flow_match_lcm(monkeypatch, variant, n):
    rng = np.random.default_rng(7 + n)
    eps, vs = velocities(rng, n)
    noises = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(n)]

    # FlowMatchLCMScheduler.step draws its noise with randn_tensor (from torch's global RNG); swap in
    # ours so both see the same numbers.
    draws = iter(noises)

    def injected_randn(shape, generator=None, device=None, dtype=None, **_):
        noise = next(draws)
        assert tuple(shape) == noise.shape and dtype == torch.float32
        return torch.from_numpy(noise.copy())

    monkeypatch.setattr(lcm_module, "randn_tensor", injected_randn)
    d = FlowMatchLCMScheduler(shift=VARIANTS[variant].shift)
    d.set_timesteps(n)
    ours = make_scheduler(variant, num_steps=n)
    official = make_scheduler(variant, flavour="official", num_steps=n)
    assert ours.needs_noise and ours.noise_shape(SHAPE) == SHAPE

    x, xd, xo = eps.copy(), torch.from_numpy(eps.copy()), eps.copy()
    for i, t in enumerate(d.timesteps):
        x_in_official = xo
        x = ours.step(vs[i], i, x, noises[i])
        xo = official.step(vs[i], i, xo, noises[i])
        xd = d.step(torch.from_numpy(vs[i]), t, xd).prev_sample
        np.testing.assert_allclose(x, xd.numpy(), rtol=RTOL, atol=ATOL, err_msg=f"step {i} of {n}")
        if i < n - 1:
            np.testing.assert_array_equal(xo, x)  # the flavours agree until the last step
    # Official last step: the input sample comes back unchanged; diffusers returns x0 (sigma_N = 0).
    np.testing.assert_array_equal(xo, x_in_official)
    np.testing.assert_allclose(x, x_in_official - d.sigmas[-2].item() * vs[-1], rtol=1e-6, atol=1e-6)


def test_flash_noise_is_only_required_where_used():
    s = make_scheduler("fast", num_steps=2)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="pass noise"):
        s.step(x, 0, x)
    s.step(x, 1, x)  # last step: sigma_N = 0, noise unused
    make_scheduler("fast", "official", num_steps=2).step(x, 1, x)


def test_dtypes_follow_the_references():
    x16 = np.ones(SHAPE, np.float16)
    flash = make_scheduler("dev")
    out = flash.step(x16, 0, x16, np.zeros(SHAPE, np.float64))
    assert out.dtype == np.float16  # float32 arithmetic, cast back to the model output's dtype
    np.testing.assert_allclose(out, (1 - flash.sigmas[1]) * (1 - flash.sigmas[0]), rtol=1e-3)

    unipc = make_scheduler("full")
    y = x16
    for i in range(3):
        y = unipc.step(x16, i, y)
        assert y.dtype == np.float16  # UniPC stays in the sample's dtype


def test_calculate_shift_matches_official_mu():
    assert calculate_shift(4096) == pytest.approx(1.15, abs=1e-12)
    assert calculate_shift(256) == pytest.approx(0.5, abs=1e-12)
    s = FlowUniPCScheduler(3.0, "official", mu=calculate_shift(256))
    assert s.second_shift == pytest.approx(math.exp(0.5))


# --- interface and errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [FlowUniPCScheduler, FlashFlowEulerScheduler])
def test_bad_arguments_raise_value_errors(cls):
    with pytest.raises(ValueError, match="'karras'"):
        cls(3.0, flavour="karras")
    with pytest.raises(ValueError, match="shift"):
        cls(-1.0)
    s = cls(3.0)
    with pytest.raises(ValueError, match="set_timesteps"):
        _ = s.timesteps
    for bad in (0, -3, 2.5, True, "4"):
        with pytest.raises(ValueError, match=f"num_steps .*{bad!r}"):
            s.set_timesteps(bad)
    s.set_timesteps(4)
    x = np.zeros(SHAPE, np.float32)
    noise = x if s.needs_noise else None
    with pytest.raises(ValueError, match=r"0\.\.3.*got 4"):
        s.step(x, 4, x, noise)
    with pytest.raises(ValueError, match="shape"):
        s.step(x[:1], 0, x, noise)
    with pytest.raises(ValueError, match="floating"):
        s.step(x.astype(np.int32), 0, x, noise)
    assert s.index_for_timestep(s.timesteps[2]) == 2
    assert s.index_for_timestep(s.timesteps[2].item()) == 2
    if s.timestep_dtype == np.int64:
        with pytest.raises(ValueError, match="not in"):
            s.index_for_timestep(s.timesteps[2] + 0.5)
    with pytest.raises(ValueError, match="not in this 4-step schedule"):
        s.index_for_timestep(-5)


def test_unipc_enforces_order_and_rejects_noise():
    s = make_scheduler("full", num_steps=4)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="expected index 0, got 1"):
        s.step(x, 1, x)
    with pytest.raises(ValueError, match="deterministic"):
        s.step(x, 0, x, x)
    s.step(x, 0, x)
    s.set_timesteps(4)  # starts a new run
    assert s.step_index == 0
    with pytest.raises(ValueError, match="only applies to the 'official'"):
        FlowUniPCScheduler(3.0, mu=1.15)
    with pytest.raises(ValueError, match="mu"):
        make_scheduler("dev", mu=1.15)


def test_from_config_and_from_file(tmp_path):
    full = from_config(FULL_CONFIG)
    assert isinstance(full, FlowUniPCScheduler) and full.shift == 3.0 and full.flavour == "diffusers"
    dev = from_config(DEV_CONFIG, flavour="official")
    assert isinstance(dev, FlashFlowEulerScheduler) and dev.shift == 6.0 and dev.flavour == "official"

    folder = tmp_path / "HiDream-I1-Dev"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(DEV_CONFIG))
    for path in (folder, folder / "scheduler", folder / "scheduler" / "scheduler_config.json"):
        assert from_file(path).shift == 6.0
    s = make_scheduler("dev", config=folder)
    np.testing.assert_array_equal(s.sigmas, make_scheduler("dev").sigmas)
    with pytest.raises(ValueError, match="shift 3.0.*shift 6.0"):
        make_scheduler("fast", config=folder)  # Dev's folder cannot drive the Fast recipe
    with pytest.raises(ValueError, match="UniPCMultistepScheduler"):
        make_scheduler("full", config=DEV_CONFIG)
    with pytest.raises(ValueError, match="no scheduler_config.json"):
        from_file(tmp_path / "missing")


@pytest.mark.parametrize("config,key", [
    ({**FULL_CONFIG, "use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({k: v for k, v in FULL_CONFIG.items() if k != "use_flow_sigmas"}, "use_flow_sigmas"),
    ({**FULL_CONFIG, "prediction_type": "epsilon"}, "prediction_type"),
    ({**FULL_CONFIG, "solver_order": 3}, "solver_order"),
    ({**FULL_CONFIG, "num_train_timesteps": 0}, "num_train_timesteps"),
    ({**FULL_CONFIG, "flow_shift": 0.0}, "shift"),
    ({**DEV_CONFIG, "use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({**DEV_CONFIG, "shift_terminal": 0.02}, "shift_terminal"),
    ({**DEV_CONFIG, "_class_name": "FlowMatchEulerDiscreteScheduler"}, "_class_name"),
    ({"shift": 3.0}, "_class_name"),
])
def test_from_config_rejects_what_it_does_not_implement(config, key):
    with pytest.raises(ValueError, match=key):
        from_config(config)


def test_make_scheduler_reads_the_variant_recipes():
    for name, v in VARIANTS.items():
        s = make_scheduler(v)
        assert s.kind == v.scheduler and s.diffusers_class == v.diffusers_scheduler
        assert s.shift == v.shift and len(s.timesteps) == v.steps
        assert s.timesteps.dtype == np.dtype(v.timestep_dtype)
    with pytest.raises(ValueError, match="--variant .turbo. is not one of"):
        make_scheduler("turbo")


def test_module_does_not_import_torch():
    code = ("import sys, hidream_export.runtime.schedulers as s; s.make_scheduler('full'); "
            "bad = sorted(m for m in ('torch', 'diffusers') if m in sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
