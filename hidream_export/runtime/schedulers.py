"""The samplers' schedulers in pure numpy: flow UniPC (Full) and flash flow-match Euler (Dev, Fast).

The runtime must run without torch, so this module re-implements the two schedulers HiDream-I1 ships
with, in numpy only (it must never import torch or diffusers, even indirectly). Each scheduler has two
flavours:

- ``"diffusers"`` (default): what the HF model folders' ``scheduler_config.json`` runs in diffusers,
  ``UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")`` for Full and
  ``FlowMatchLCMScheduler`` for Dev/Fast. The HiDream team calls these the intended configs.
- ``"official"``: the HiDream-I1 repository's ``FlowUniPCMultistepScheduler`` (shift applied twice:
  ``shift`` and then ``exp(mu)``) and ``FlashFlowMatchEulerDiscreteScheduler`` (its last step returns
  the input sample unchanged).

Common interface (both classes)::

    sched = make_scheduler("dev")            # set_timesteps(variant.steps) already called
    for i, t in enumerate(sched.timesteps):  # t: int64 (UniPC) or float32 (flash), fed to the model
        v = velocity(x, t)                   # flow velocity v = -transformer(...), after CFG
        noise = rng.standard_normal(sched.noise_shape(x.shape), dtype=np.float32) if sched.needs_noise else None
        x = sched.step(v, i, x, noise)

``step`` takes the step *index* ``i`` (a position in ``timesteps``), never a timestep value: UniPC's
int64 timesteps and indices are both integers, so accepting either would be ambiguous.
``index_for_timestep`` converts a value when a caller only has that.

Arithmetic dtypes follow the reference implementations: the schedule scalars are float32 (as diffusers
stores its sigmas), the flash step upcasts to float32 and casts the result to the model output's dtype,
and UniPC computes in the sample's dtype.
"""

from __future__ import annotations

import abc
import json
import math
import os
from typing import Any, Callable, Mapping

import numpy as np

from ..variants import Variant, get_variant
from .device import DeviceArray

__all__ = [
    "FLAVOURS",
    "FlowUniPCScheduler",
    "FlashFlowEulerScheduler",
    "calculate_shift",
    "from_config",
    "from_file",
    "make_scheduler",
    "shift_sigmas",
]

FLAVOURS = ("diffusers", "official")
NUM_TRAIN_TIMESTEPS = 1000
# Sequence length the official pipeline feeds calculate_shift(): the real transformer's max_seq.
OFFICIAL_MAX_SEQ = 4096


def shift_sigmas(sigmas, shift: float):
    """The flow-matching shift S_s(sigma) = s*sigma / (1 + (s - 1)*sigma), in the input's precision."""
    # The 1 takes the input's dtype: numpy 1.x turns float32 scalar - int into float64 (numpy 2 keeps
    # float32), which moved float32 schedules by a unit in the last place.
    one = np.asarray(sigmas).dtype.type(1)
    return shift * sigmas / (one + (shift - one) * sigmas)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent ``mu``: a line through (base_seq_len, base_shift) and (max_seq_len, max_shift).

    Both HiDream pipelines call it with the transformer's ``max_seq`` (4096 for the real model, so
    mu = 1.15); only the official FlowUniPC uses the result, as its second shift exp(mu) = 3.1582.
    Evaluated in the same order as the pipelines so the float64 value matches theirs bit for bit.
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _shift_f32(sigma: np.float32, shift: float) -> float:
    """S_shift on a float32 value in float32 arithmetic, as both references build their training table
    (a float32 torch tensor); returned as a Python float like their ``.item()``."""
    return float(shift_sigmas(np.float32(sigma), np.float32(shift)))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_shift(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_flavour(flavour: Any) -> str:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown scheduler flavour {flavour!r}; expected one of {list(FLAVOURS)}")
    return flavour


def _as_float_array(name: str, value: Any) -> np.ndarray:
    # A DeviceArray (I/O-bound sampling) is used as it is: the steps below are written with operators
    # it implements on the device, so the same code steps host and device arrays.
    arr = value if isinstance(value, DeviceArray) else np.asarray(value)
    # kind 'f' covers float16/32/64; ml_dtypes' bfloat16 (if a caller uses it) reports kind 'V'.
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise ValueError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    return arr


class _FlowScheduler(abc.ABC):
    """What both schedulers share: flavour/shift bookkeeping, the schedule arrays and input checks."""

    kind: str = ""  # Variant.scheduler value
    diffusers_class: str = ""  # class name in a diffusers scheduler_config.json
    timestep_dtype: type = np.float32
    needs_noise: bool = False

    def __init__(self, shift: float, flavour: str, num_train_timesteps: int):
        self.flavour = _check_flavour(flavour)
        self.shift = _check_shift("shift", shift)
        # >= 2: with T = 1 every flow sigma is 1 (alpha = 0) and the schedules degenerate.
        self.num_train_timesteps = _check_int("num_train_timesteps", num_train_timesteps, 2)
        self._timesteps: np.ndarray | None = None
        self._sigmas: np.ndarray | None = None

    # --- schedule -------------------------------------------------------------------------------
    def set_timesteps(self, num_steps: int) -> None:
        """Build ``timesteps`` (N values fed to the model) and ``sigmas`` (N + 1, ending in 0)."""
        n = _check_int("num_steps", num_steps, 1)
        timesteps, sigmas = self._schedule(n)
        assert timesteps.shape == (n,) and sigmas.shape == (n + 1,) and sigmas[-1] == 0
        timesteps.setflags(write=False)
        sigmas.setflags(write=False)
        self._timesteps, self._sigmas = timesteps, sigmas
        self._reset()

    @abc.abstractmethod
    def _schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) for n steps; each scheduler's own formula."""

    def _reset(self) -> None:
        """Forget per-run state (multistep history); called by set_timesteps."""

    def _require_schedule(self) -> None:
        if self._sigmas is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_steps) before using the schedule")

    @property
    def timesteps(self) -> np.ndarray:
        """What the transformer is fed at each step (read-only; dtype ``timestep_dtype``)."""
        self._require_schedule()
        return self._timesteps

    @property
    def sigmas(self) -> np.ndarray:
        """Noise levels, float32, length num_steps + 1, the last one 0 (read-only)."""
        self._require_schedule()
        return self._sigmas

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def index_for_timestep(self, timestep: Any) -> int:
        """Position of a timestep value in ``timesteps`` (the first match)."""
        hits = np.flatnonzero(self.timesteps == timestep)  # no cast: 999.5 must not match 999
        if hits.size == 0:
            raise ValueError(f"timestep {timestep!r} is not in this {self.num_steps}-step schedule")
        return int(hits[0])

    def noise_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """Shape of the standard-normal noise ``step`` wants for a sample of ``sample_shape`` (None: none)."""
        return tuple(sample_shape) if self.needs_noise else None

    # --- step helpers ---------------------------------------------------------------------------
    def _check_index(self, index: Any) -> int:
        self._require_schedule()
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) \
                or not 0 <= index < self.num_steps:
            raise ValueError(
                f"step index must be an integer in 0..{self.num_steps - 1} (a position in timesteps, "
                f"not a timestep value), got {index!r}")
        return int(index)

    @staticmethod
    def _check_arrays(model_output: Any, sample: Any) -> tuple[np.ndarray, np.ndarray]:
        model_output = _as_float_array("model_output", model_output)
        sample = _as_float_array("sample", sample)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {model_output.shape} != sample shape {sample.shape}")
        return model_output, sample

    def __repr__(self) -> str:
        steps = self.num_steps if self._sigmas is not None else None
        return (f"{type(self).__name__}(shift={self.shift}, flavour={self.flavour!r}, "
                f"num_train_timesteps={self.num_train_timesteps}, num_steps={steps})")


class FlashFlowEulerScheduler(_FlowScheduler):
    """Dev/Fast: stochastic flash flow-match Euler (LCM-style).

    Each step predicts x0 = x - sigma_i * v and re-noises it to the next level with fresh noise:
    x <- (1 - sigma_{i+1}) * x0 + sigma_{i+1} * noise. The caller supplies ``noise`` (standard normal,
    the sample's shape) so one seeded generator controls the whole run; the references draw it from
    torch's global RNG instead.

    Flavours differ only in the last step: diffusers' ``FlowMatchLCMScheduler`` returns x0 there
    (sigma_N = 0); the official scheduler returns the input sample unchanged (the image stays at
    sigma_{N-1}). Noise is only read when sigma_{i+1} > 0 and the step is not the official last one,
    so passing it every step (simplest for the caller) or omitting it where unused both work.

    The step is stateless: indices may come in any order.
    """

    kind = "flash_flow_euler"
    diffusers_class = "FlowMatchLCMScheduler"
    timestep_dtype = np.float32
    needs_noise = True

    def __init__(self, shift: float = 1.0, flavour: str = "diffusers",
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        super().__init__(shift, flavour, num_train_timesteps)
        # Endpoints of the shifted float32 training table (t = 1..T)/T: sigma_max = S(1) = 1 and
        # sigma_min = S(1/T). set_timesteps shifts a linspace of these *already shifted* values again:
        # a double shift that both reference implementations have.
        ntt = np.float32(self.num_train_timesteps)
        self.sigma_max = _shift_f32(ntt / ntt, self.shift)
        self.sigma_min = _shift_f32(np.float32(1) / ntt, self.shift)

    def _schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        ntt = self.num_train_timesteps
        # float64 like the references (numpy), then stored as float32 (their torch tensors).
        sigmas = np.linspace(self.sigma_max * ntt, self.sigma_min * ntt, n) / ntt
        sigmas = shift_sigmas(sigmas, self.shift).astype(np.float32)
        timesteps = sigmas * np.float32(ntt)  # float32 product, as the model is fed
        return timesteps, np.append(sigmas, np.float32(0))

    def step(self, model_output: Any, index: int, sample: Any, noise: Any = None) -> np.ndarray:
        """Advance ``sample`` from sigmas[index] to sigmas[index + 1]; returns a new array in the
        model output's dtype (the references cast back to it)."""
        i = self._check_index(index)
        model_output, sample = self._check_arrays(model_output, sample)
        out_dtype = model_output.dtype
        if self.flavour == "official" and i == self.num_steps - 1:
            return sample.astype(out_dtype, copy=True)

        sigma, sigma_next = self._sigmas[i], self._sigmas[i + 1]
        x0 = sample.astype(np.float32) - sigma * model_output.astype(np.float32)
        if sigma_next == 0:
            # (1 - 0) * x0 + 0 * noise == x0 exactly: the noise is not needed.
            return x0.astype(out_dtype)
        if noise is None:
            raise ValueError(
                f"step {i} of {self.num_steps} re-noises to sigma={float(sigma_next):.6g}: pass noise "
                f"(standard normal, shape {sample.shape})")
        noise = _as_float_array("noise", noise)
        if noise.shape != sample.shape:
            raise ValueError(f"noise shape {noise.shape} != sample shape {sample.shape}")
        prev = (np.float32(1) - sigma_next) * x0 + sigma_next * noise.astype(np.float32)
        return prev.astype(out_dtype)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], flavour: str = "diffusers") -> "FlashFlowEulerScheduler":
        """From a diffusers ``FlowMatchLCMScheduler`` scheduler_config.json (HiDream-I1-Dev/Fast)."""
        _check_class_name(config, cls)
        _check_options(config, cls.diffusers_class, _LCM_OPTIONS)
        return cls(shift=config.get("shift", 1.0), flavour=flavour,
                   num_train_timesteps=config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS))


class FlowUniPCScheduler(_FlowScheduler):
    """Full: flow-matching UniPC multistep (bh2, solver order 2, x0 prediction, UniC corrector,
    lower order at the first and the last step).

    With alpha = 1 - sigma and lambda = ln(alpha / sigma), each step converts the velocity to an x0
    prediction m_i = x_i - sigma_i * v_i, first corrects x_i with UniC (from x_{i-1}, m_{i-1}, m_{i-2}
    and the new m_i; skipped at step 0), then predicts x_{i+1} with UniP (m_i, m_{i-1}). The last
    step (sigma_N = 0) returns m_{N-1}. Deterministic: ``needs_noise`` is False.

    Multistep state means steps must come in order 0..N-1 (set_timesteps starts a new run).

    Schedules (int64 timesteps = trunc(sigma * 1000)):
    - ``"diffusers"``: sigma_i = S_shift(linspace(1, 1/T, N + 1)[:-1]), sigma_0 -= 1e-6 when it is 1.
    - ``"official"``: sigma_max = S_shift(1 - 1/T) from the float32 training table, then
      sigma_i = S_{exp(mu)}(linspace(sigma_max, 0, N + 1)[:-1]): the shift applied twice.
      ``mu`` defaults to calculate_shift(4096) = 1.15, what the official pipeline passes for the real
      model (it uses the transformer's max_seq; pass mu=calculate_shift(max_seq) for other sizes).
    """

    kind = "flow_unipc"
    diffusers_class = "UniPCMultistepScheduler"
    timestep_dtype = np.int64
    needs_noise = False
    solver_order = 2

    def __init__(self, shift: float = 1.0, flavour: str = "diffusers",
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, mu: float | None = None):
        super().__init__(shift, flavour, num_train_timesteps)
        if self.flavour == "official":
            self.mu = calculate_shift(OFFICIAL_MAX_SEQ) if mu is None else float(mu)
            if not math.isfinite(self.mu):
                raise ValueError(f"mu must be finite, got {mu!r}")
            self.second_shift = math.exp(self.mu)
            self.sigma_max = _shift_f32(np.float32(1 - 1 / self.num_train_timesteps), self.shift)
        elif mu is not None:
            raise ValueError(f"mu={mu!r} only applies to the 'official' flavour (diffusers' UniPC ignores it)")
        else:
            self.mu = None
        self._reset()

    def _schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        ntt = self.num_train_timesteps
        if self.flavour == "official":
            sigmas = shift_sigmas(np.linspace(self.sigma_max, 0.0, n + 1)[:-1], self.second_shift)
        else:
            sigmas = shift_sigmas(np.linspace(1.0, 1.0 / ntt, n + 1)[:-1], self.shift)
            if abs(sigmas[0] - 1) < 1e-6:
                sigmas[0] -= 1e-6  # keeps alpha_0 = 1 - sigma_0 > 0, so lambda_0 is finite
        timesteps = (sigmas * ntt).astype(np.int64)  # truncation toward zero, as both references do
        return timesteps, np.append(sigmas, 0.0).astype(np.float32)

    def _reset(self) -> None:
        self._next_index = 0
        self._m_prev: np.ndarray | None = None  # x0 prediction of the previous step, m_{i-1}
        self._m_prev2: np.ndarray | None = None  # m_{i-2}
        self._last_sample: np.ndarray | None = None  # x_{i-1} after its correction
        self._last_order = 0  # predictor order used by the previous step; the corrector reuses it

    @property
    def step_index(self) -> int:
        """The index the next ``step`` call must have."""
        return self._next_index

    def _lambda(self, j: int) -> np.float32:
        """Log-SNR ln(alpha_j / sigma_j) in float32 (diffusers computes it on float32 sigmas)."""
        sigma = self._sigmas[j]
        return np.log(np.float32(1) - sigma) - np.log(sigma)

    def _step_terms(self, s: int, t: int) -> tuple[np.float32, np.float32, np.float32, np.float32]:
        """For a step from sigmas[s] to sigmas[t]: (h, phi_1, sigma_t / sigma_s, alpha_t), float32.

        h = lambda_t - lambda_s and phi_1 = expm1(-h) (x0 form, so the exponent is hh = -h). With
        bh2, B(h) = phi_1 too, so phi_1 is also the weight of the higher-order differences.
        """
        h = self._lambda(t) - self._lambda(s)
        return h, np.expm1(-h), self._sigmas[t] / self._sigmas[s], np.float32(1) - self._sigmas[t]

    def _correct(self, x_prev: np.ndarray, m_this: np.ndarray, i: int) -> np.ndarray:
        """UniC: redo the step i-1 -> i from x_{i-1}, now also using m_i (the model's output at the
        uncorrected x_i), at the order the previous predictor used."""
        h, phi_1, ratio, alpha_t = self._step_terms(i - 1, i)
        dt = x_prev.dtype.type
        m0 = self._m_prev
        x = dt(ratio) * x_prev - dt(alpha_t * phi_1) * m0
        if self._last_order == 1:
            return x - dt(alpha_t * phi_1) * (dt(0.5) * (m_this - m0))
        # Order 2 adds the difference to m_{i-2}, at log-SNR ratio r. The weights rho solve
        # [[1, 1], [r, 1]] rho = [g1, 2 g2] / B(h), with g1 = phi_1/hh - 1 and g2 = g1/hh - 1/2.
        hh = -h
        r = (self._lambda(i - 2) - self._lambda(i - 1)) / h
        g1 = phi_1 / hh - np.float32(1)
        g2 = g1 / hh - np.float32(0.5)
        b = np.array([g1 / phi_1, g2 * np.float32(2) / phi_1], dtype=np.float32)
        rho = np.linalg.solve(np.array([[1, 1], [r, 1]], dtype=np.float32), b)
        d1 = (self._m_prev2 - m0) / dt(r)
        return x - dt(alpha_t * phi_1) * (dt(rho[0]) * d1 + dt(rho[1]) * (m_this - m0))

    def _predict(self, x: np.ndarray, i: int, order: int) -> np.ndarray:
        """UniP: x_i -> x_{i+1} from m_i (and m_{i-1} at order 2, with the fixed weight 1/2)."""
        m0 = self._m_prev
        if self._sigmas[i + 1] == 0:
            # lambda = +inf: phi_1 = -1 and the sigma ratio is 0, so the update is exactly m_i.
            return m0.copy()
        h, phi_1, ratio, alpha_t = self._step_terms(i, i + 1)
        dt = x.dtype.type
        x_next = dt(ratio) * x - dt(alpha_t * phi_1) * m0
        if order == 1:
            return x_next  # == Euler x + (sigma_{i+1} - sigma_i) * v, up to rounding
        r = (self._lambda(i - 1) - self._lambda(i)) / h
        d1 = (self._m_prev2 - m0) / dt(r)
        return x_next - dt(alpha_t * phi_1) * (dt(0.5) * d1)

    def step(self, model_output: Any, index: int, sample: Any, noise: Any = None) -> np.ndarray:
        """Advance ``sample`` from sigmas[index] to sigmas[index + 1]; returns a new array in the
        sample's dtype (the model output is cast to it)."""
        i = self._check_index(index)
        if i != self._next_index:
            raise ValueError(
                f"UniPC is multistep: steps must run in order 0..{self.num_steps - 1}; expected index "
                f"{self._next_index}, got {i} (call set_timesteps to start over)")
        if noise is not None:
            raise ValueError("FlowUniPCScheduler is deterministic (needs_noise is False): pass noise=None")
        model_output, sample = self._check_arrays(model_output, sample)
        dt = sample.dtype.type
        m = sample - dt(self._sigmas[i]) * model_output.astype(sample.dtype, copy=False)

        # The history must not alias the caller's array (a sampler may update its buffer in place).
        x = self._correct(self._last_sample, m, i) if i > 0 else sample.copy()
        order = min(self.solver_order, self.num_steps - i, i + 1)  # warm-up and lower_order_final
        self._m_prev2, self._m_prev = self._m_prev, m
        self._last_sample, self._last_order = x, order
        self._next_index = i + 1
        return self._predict(x, i, order).astype(sample.dtype, copy=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], flavour: str = "diffusers",
                    mu: float | None = None) -> "FlowUniPCScheduler":
        """From a diffusers ``UniPCMultistepScheduler`` scheduler_config.json (HiDream-I1-Full).

        Only the configuration HiDream ships is implemented (flow sigmas, flow prediction, bh2, order 2,
        ...); anything else raises ValueError naming the key rather than sampling differently.
        """
        _check_class_name(config, cls)
        _check_options(config, cls.diffusers_class, _UNIPC_OPTIONS)
        return cls(shift=config.get("flow_shift", 1.0), flavour=flavour,
                   num_train_timesteps=config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS), mu=mu)


# --- diffusers scheduler_config.json ------------------------------------------------------------------

def _falsy(v: Any) -> bool:
    return not v


def _is(expected: Any) -> Callable[[Any], bool]:
    return lambda v: v == expected and type(v) is type(expected)


# key -> (diffusers' default when the key is absent, accepted?, what HiDream's config has).
# Keys not listed (betas, timestep_spacing, ...) do not affect flow-sigma sampling and are ignored.
_Option = tuple[Any, Callable[[Any], bool], str]
_UNIPC_OPTIONS: dict[str, _Option] = {
    "use_flow_sigmas": (False, _is(True), "true"),
    "prediction_type": ("epsilon", _is("flow_prediction"), '"flow_prediction"'),
    "solver_order": (2, _is(2), "2"),
    "solver_type": ("bh2", _is("bh2"), '"bh2"'),
    "predict_x0": (True, _is(True), "true"),
    "lower_order_final": (True, _is(True), "true"),
    "thresholding": (False, _is(False), "false"),
    "use_karras_sigmas": (False, _is(False), "false"),
    "use_exponential_sigmas": (False, _is(False), "false"),
    "use_beta_sigmas": (False, _is(False), "false"),
    "use_dynamic_shifting": (False, _is(False), "false"),
    "final_sigmas_type": ("zero", _is("zero"), '"zero"'),
    "disable_corrector": ([], _falsy, "[]"),
    "solver_p": (None, _falsy, "null"),
    "shift_terminal": (None, _falsy, "null"),
}
_LCM_OPTIONS: dict[str, _Option] = {
    "use_dynamic_shifting": (False, _is(False), "false"),
    "invert_sigmas": (False, _is(False), "false"),
    "shift_terminal": (None, _falsy, "null"),
    "use_karras_sigmas": (False, _is(False), "false"),
    "use_exponential_sigmas": (False, _is(False), "false"),
    "use_beta_sigmas": (False, _is(False), "false"),
    "scale_factors": (None, _falsy, "null"),
}

_SCHEDULERS: dict[str, type[_FlowScheduler]] = {
    c.diffusers_class: c for c in (FlowUniPCScheduler, FlashFlowEulerScheduler)}
_SCHEDULERS_BY_KIND: dict[str, type[_FlowScheduler]] = {
    c.kind: c for c in (FlowUniPCScheduler, FlashFlowEulerScheduler)}


def _check_class_name(config: Mapping[str, Any], cls: type[_FlowScheduler]) -> None:
    name = config.get("_class_name", cls.diffusers_class)
    if name != cls.diffusers_class:
        raise ValueError(f"scheduler config is for {name!r}, not {cls.diffusers_class!r}")


def _check_options(config: Mapping[str, Any], class_name: str, options: dict[str, _Option]) -> None:
    for key, (default, ok, expected) in options.items():
        value = config.get(key, default)
        if not ok(value):
            if key in config:
                where = f"= {json.dumps(value, default=repr)}"
            else:
                where = f"is missing (diffusers default {json.dumps(default)})"
            raise ValueError(
                f"unsupported {class_name} config: {key!r} {where}; HiDream-I1 uses {key} = {expected}")


def from_config(config: Mapping[str, Any], flavour: str = "diffusers", **kwargs: Any) -> _FlowScheduler:
    """A scheduler from a diffusers scheduler_config.json dict; ``_class_name`` picks the class.

    Reads ``flow_shift`` (UniPC) or ``shift`` (LCM) and ``num_train_timesteps``; rejects configs that
    would sample differently (e.g. ``use_dynamic_shifting: true``). ``set_timesteps`` is not called.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"scheduler config must be a mapping, got {type(config).__name__}")
    name = config.get("_class_name")
    if name not in _SCHEDULERS:
        hint = ""
        if name == "FlowMatchEulerDiscreteScheduler":
            hint = (" (HiDream's HF folders shipped this before 2025-04-17; the current ones ship "
                    "UniPCMultistepScheduler for Full and FlowMatchLCMScheduler for Dev/Fast)")
        raise ValueError(f"unsupported scheduler _class_name {name!r}; expected one of {sorted(_SCHEDULERS)}{hint}")
    return _SCHEDULERS[name].from_config(config, flavour=flavour, **kwargs)


def from_file(path: str | os.PathLike, flavour: str = "diffusers", **kwargs: Any) -> _FlowScheduler:
    """``from_config`` on a scheduler_config.json file, or on the one in a ``scheduler/`` folder or a
    model folder holding ``scheduler/``."""
    path = os.fspath(path)
    for candidate in (path, os.path.join(path, "scheduler_config.json"),
                      os.path.join(path, "scheduler", "scheduler_config.json")):
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                try:
                    config = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{candidate}: not valid JSON ({e})") from None
            try:
                return from_config(config, flavour=flavour, **kwargs)
            except ValueError as e:
                raise ValueError(f"{candidate}: {e}") from None
    raise ValueError(f"no scheduler_config.json at {path!r} (nor in its scheduler/ subfolder)")


def make_scheduler(variant: str | Variant, flavour: str = "diffusers",
                   config: Mapping[str, Any] | str | os.PathLike | None = None, *,
                   num_steps: int | None = None, mu: float | None = None) -> _FlowScheduler:
    """The scheduler of a variant's recipe (hidream_export.variants), timesteps already set.

    ``config`` (a scheduler_config.json dict, file or folder) supplies the numbers instead of the
    recipe; it must be the variant's scheduler class and shift, so a Dev folder cannot silently drive
    the Fast recipe. ``num_steps`` overrides the recipe's step count. ``mu``: official UniPC only.
    """
    v = get_variant(variant) if isinstance(variant, str) else variant
    if not isinstance(v, Variant):
        raise ValueError(f"variant must be a name or a Variant, got {variant!r}")
    cls = _SCHEDULERS_BY_KIND.get(v.scheduler)
    if cls is None:
        raise ValueError(f"variant {v.name!r} names unknown scheduler {v.scheduler!r}; "
                         f"expected one of {sorted(_SCHEDULERS_BY_KIND)}")
    if np.dtype(cls.timestep_dtype) != np.dtype(v.timestep_dtype):
        raise ValueError(f"variant {v.name!r} feeds {v.timestep_dtype} timesteps but {cls.__name__} "
                         f"produces {np.dtype(cls.timestep_dtype)}")
    kwargs = {} if mu is None else {"mu": mu}
    if mu is not None and cls is not FlowUniPCScheduler:
        raise ValueError(f"mu={mu!r} only applies to the official flow UniPC, not variant {v.name!r}")

    if config is None:
        sched = cls(shift=v.shift, flavour=flavour, **kwargs)
    else:
        if isinstance(config, Mapping):
            sched = from_config(config, flavour=flavour, **kwargs)
        else:
            sched = from_file(config, flavour=flavour, **kwargs)
        if type(sched) is not cls or sched.diffusers_class != v.diffusers_scheduler:
            raise ValueError(f"variant {v.name!r} uses {v.diffusers_scheduler}, but the config is for "
                             f"{sched.diffusers_class}")
        if sched.shift != v.shift:
            raise ValueError(f"variant {v.name!r} uses shift {v.shift}, but the config has shift "
                             f"{sched.shift}: is it the right model folder?")
    sched.set_timesteps(v.steps if num_steps is None else num_steps)
    return sched
