"""`MoEConfig`: every knob of the MoE layer, validated when constructed.

A frozen dataclass: its `__post_init__` checks each field and raises ValueError naming the field
as `MoEConfig.<field>`, the value and what is allowed (the trainer's `validate_config` reports the
same message with the field as the user wrote it, `config.model.moe.<field>`). Methods turn the
config into group and capacity sizes. The layer itself is `moejax.moe.MoELayer`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from moejax import dispatch as dispatch_lib
from moejax import grouped
from moejax import routing

# name -> (nonlinearity, gated). Gated FFNs compute act(x @ wi_gate) * (x @ wi); the dense MLP of
# moejax.model and the grouped (dropless) FFN use the same table.
ACTIVATIONS = grouped.ACTIVATIONS
NO_DROP = math.inf  # capacity_factor value that gives every token a slot.
DISPATCHES = dispatch_lib.DISPATCHES + ("dropless",)
EP_TRANSPORTS = ("auto", "buffered", "ragged")
ROUTERS = ("learned", "balanced", "random")
# Fields that only mean something with capacity buffers: with dispatch="dropless" each must keep
# its default (a ValueError names the one that does not). One rule, applied to all of them.
DROPLESS_IGNORES = ("capacity_factor", "eval_capacity_factor", "expert_capacity", "min_capacity",
                    "capacity_multiple", "capacity_convention", "priority", "overflow", "choice")


class FieldError(ValueError):
  """A bad `MoEConfig` field: `text` starts with the field's name (`"top_k=3; allowed: ..."`);
  the message prefixes the owner, `MoEConfig.` by default. `under(owner)` is the same error for a
  config the user wrote elsewhere (`config.model.moe`)."""

  def __init__(self, text: str, owner: str = "MoEConfig"):
    super().__init__(f"{owner}.{text}")
    self.text, self.owner = text, owner

  def under(self, owner: str) -> "FieldError":
    return FieldError(self.text, owner)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Every knob of the MoE layer. Construction validates all fields (ValueError names the field)."""
  # Number of experts E.
  num_experts: int = 8
  # Experts per token K (1: Switch, 2: GShard).
  top_k: int = 1
  # Hidden width F of each expert.
  d_ff: int = 1024
  # Expert activation: relu (T5/Switch), gelu, swiglu / geglu (gated: a second [E, D, F] matrix).
  activation: str = "relu"
  # Training capacity factor CF in C = ceil(K * CF * S / E); math.inf = no drop.
  capacity_factor: float = 1.25
  # Eval capacity factor (ST-MoE Table 8: eval CF 2.0 beats eval at the train CF); math.inf = no drop.
  eval_capacity_factor: float = 2.0
  # Explicit slots per expert per group, instead of a factor (train and eval; ignores min_capacity
  # and capacity_multiple, clipped to S). None: use the factors.
  expert_capacity: int | None = None
  # Floor on the capacity (flaxformer / Mesh TF use 4).
  min_capacity: int = 0
  # Round the capacity up to a multiple of this (hardware alignment; vmoe uses 4).
  capacity_multiple: int = 1
  # Capacity formula: switch (the paper's ceil(K*CF*S/E)) or another codebase's (see routing).
  capacity_convention: str = "switch"
  # Tokens per routing group S; None with num_groups None: one group per sequence.
  group_size: int | None = None
  # Number of routing groups G per batch (alternative to group_size).
  num_groups: int | None = None
  # Who chooses: token (each token its top_k experts) or expert (each expert its top-C tokens,
  # C = ceil(top_k * CF * S / E), so top_k experts per token on average; Zhou et al. 2022).
  choice: str = "token"
  # Router scores: softmax over experts, or sigmoid per expert (DeepSeek-V3; use gate="gshard").
  score: str = "softmax"
  # Combine weights: softmax (Switch raw probability), gshard / mixtral (normalised over selected).
  gate: str = "softmax"
  # Every gate times this (DeepSeek-V2/V3 `routed_scaling_factor`; 1.0 elsewhere).
  routed_scaling_factor: float = 1.0
  # Group-limited routing (DeepSeek-V3): experts in this many groups of E/n consecutive experts;
  # each token keeps its `topk_groups` best groups (a group's score: the sum of its two best
  # scores) and picks its top_k inside them. 1: no groups.
  num_expert_groups: int = 1
  # Groups each token may use (with num_expert_groups > 1).
  topk_groups: int = 1
  # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for
  # selection only, updated after every optimizer step by b_e += rate * sign(mean load - load_e)
  # from the step's global selection counts. 0: off (no bias).
  bias_update_rate: float = 0.0
  # Always-on shared experts (DeepSeek-MoE): a dense FFN of width num_shared_experts * shared_d_ff
  # applied to every token and added to the routed output, outside the all-to-all.
  num_shared_experts: int = 0
  # Hidden width of each shared expert; None: d_ff.
  shared_d_ff: int | None = None
  # Normalise gshard/mixtral gates over the router's top-K (before_drop) or the kept ones (after_drop).
  renormalize: str = "before_drop"
  # Choices after the first: all, random (GShard; training only, eval keeps all), threshold.
  second_expert_policy: str = "all"
  # Normalised-gate threshold of the `threshold` policy.
  second_expert_threshold: float = 0.2
  # Who wins a full expert: position (choice-major; Switch/GShard), token (token-major; causal for
  # any k), probability (BPR; looks at future tokens). See routing's docstring on causality.
  priority: str = "position"
  # Overflowing choices: drop (residual only) or reroute (next-best expert with room).
  overflow: str = "drop"
  # Which router choices count in the Switch balance loss's f: first (Switch) or all K (Megatron).
  balance_loss_choices: str = "first"
  # Where f and P of both balance losses are measured: per routing group, then averaged ("group",
  # Switch / GShard), or over every token of the batch on every device at once ("batch": the
  # global-batch loss of Megatron / Qwen, which lets single groups specialise).
  balance_loss_scope: str = "group"
  # Coefficient of the Switch load-balance loss (alpha, 1e-2 in Switch).
  balance_loss_weight: float = 1e-2
  # Coefficient of the GShard-form balance loss (its uniform value is 1/E^2, not 1).
  gshard_loss_weight: float = 0.0
  # Coefficient of the router z-loss (1e-3 in ST-MoE).
  z_loss_weight: float = 0.0
  # Router compute dtype: float32 (selective precision) or None (the activation dtype; ablation).
  router_dtype: str | None = "float32"
  # Multiplicative router-input jitter eps: x * U[1-eps, 1+eps] in training (Switch: 1e-2).
  router_jitter: float = 0.0
  # Router init: truncated normal, std sqrt(scale / fan_in) (Switch recommends 0.1).
  router_init_scale: float = 0.1
  # Expert weight init scale, same form (Switch: 0.1; 1.0 is standard fan-in init).
  expert_init_scale: float = 1.0
  # Dropout rate on the expert hidden activations in training (Switch "expert dropout").
  expert_dropout: float = 0.0
  # Dispatch implementation: sort (gather into capacity buffers, O(U*K*D)), onehot (einsum,
  # O(U*S*K*CF*D)), or dropless (no capacity: pairs sorted by expert, grouped matmuls; the
  # capacity-only fields above must keep their defaults, see DROPLESS_IGNORES).
  dispatch: str = "sort"
  # Dropless only. Grouped-matmul implementation (moejax.grouped): auto (blocked on CPU,
  # ragged_dot on TPU/GPU), ragged_dot, blocked, megablox (Pallas TPU kernel).
  grouped_matmul: str = "auto"
  # Dropless under expert parallelism: how pairs reach their experts' devices. buffered (a dense
  # all_to_all of a fixed receive buffer per source: runs everywhere), ragged
  # (jax.lax.ragged_all_to_all: TPU/GPU), auto (chosen when lowered: buffered for CPU, ragged for
  # TPU/GPU, so a program lowered for TPU on a CPU machine holds the ragged transport).
  ep_transport: str = "auto"
  # Dropless under expert parallelism: rows each device receives from each other device, as a
  # multiple of its fair share (M / ep for M local pairs); pairs past it are dropped and counted
  # (ep_overflow_fraction). None: the expert-axis size, which holds every pair (exact).
  receive_buffer_factor: float | None = None
  # Who picks the experts: learned (the router), or, for throughput benchmarks that must not
  # depend on router quality, balanced (exactly equal loads) or random (uniform, k distinct);
  # gates still come from the router's scores at the forced experts.
  router: str = "learned"

  def __post_init__(self):
    def fail(name, allowed):
      raise FieldError(f"{name}={getattr(self, name)!r}; allowed: {allowed}.")

    def check_choice(name, options):
      if getattr(self, name) not in options:
        fail(name, " | ".join(repr(o) for o in options))

    if not is_int(self.num_experts) or self.num_experts < 1:
      fail("num_experts", "an integer >= 1")
    if not is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts:
      fail("top_k", f"an integer in [1, num_experts={self.num_experts}]")
    if not is_int(self.d_ff) or self.d_ff < 1:
      fail("d_ff", "an integer >= 1")
    for name in ("capacity_factor", "eval_capacity_factor"):
      value = getattr(self, name)
      if not is_real(value) or math.isnan(value) or value <= 0:
        fail(name, "a number > 0, or math.inf (moejax.moe.NO_DROP) for no drop")
    if self.expert_capacity is not None and (not is_int(self.expert_capacity)
                                             or self.expert_capacity < 1):
      fail("expert_capacity", "None or an integer >= 1")
    if not is_int(self.min_capacity) or self.min_capacity < 0:
      fail("min_capacity", "an integer >= 0")
    if not is_int(self.capacity_multiple) or self.capacity_multiple < 1:
      fail("capacity_multiple", "an integer >= 1")
    if self.group_size is not None and self.num_groups is not None:
      raise FieldError(
          f"group_size={self.group_size} and num_groups={self.num_groups} are both set; "
          "set at most one (neither: one group per sequence).")
    for name in ("group_size", "num_groups"):
      value = getattr(self, name)
      if value is not None and (not is_int(value) or value < 1):
        fail(name, "None or an integer >= 1")
    check_choice("activation", tuple(ACTIVATIONS))
    check_choice("capacity_convention", routing.CAPACITY_CONVENTIONS)
    check_choice("gate", routing.GATES)
    check_choice("score", routing.SCORES)
    check_choice("choice", routing.CHOICES)
    for name in ("num_expert_groups", "topk_groups"):
      if not is_int(getattr(self, name)) or getattr(self, name) < 1:
        fail(name, "an integer >= 1")
    n = self.num_expert_groups
    if n > 1:
      if self.num_experts % n:
        fail("num_expert_groups", f"a divisor of num_experts={self.num_experts}")
      if not self.topk_groups <= n:
        fail("topk_groups", f"an integer in [1, num_expert_groups={n}]")
      if self.top_k > self.topk_groups * (self.num_experts // n):
        fail("top_k", f"at most topk_groups x experts per group = "
             f"{self.topk_groups * (self.num_experts // n)}")
      if self.overflow == "reroute":
        fail("overflow", "'drop' with num_expert_groups > 1 (rerouting would leave the groups)")
    if (not is_real(self.bias_update_rate) or not math.isfinite(self.bias_update_rate)
        or self.bias_update_rate < 0):
      fail("bias_update_rate", "a finite number >= 0 (0 = no bias)")
    if self.choice == "expert" and (n > 1 or self.bias_update_rate > 0):
      raise FieldError(
          "choice='expert' with num_expert_groups > 1 or bias_update_rate > 0: both "
          "steer the tokens' choices; allowed with choice='expert': neither.")
    if self.choice == "expert" and self.eval_capacity_factor != self.capacity_factor:
      raise FieldError(
          f"eval_capacity_factor={self.eval_capacity_factor!r} with choice='expert': "
          "the capacity sets how many experts each token gets, so eval must use the training "
          f"value; allowed: eval_capacity_factor == capacity_factor={self.capacity_factor!r}.")
    if self.choice == "expert":  # Options that only mean something when tokens choose.
      for name, default in (("gate", "softmax"), ("second_expert_policy", "all"),
                            ("priority", "position"), ("overflow", "drop")):
        if getattr(self, name) != default:
          raise FieldError(
              f"{name}={getattr(self, name)!r} with choice='expert': experts pick "
              f"tokens and gates are the scores, so only {name}={default!r} is allowed.")
    if not is_int(self.num_shared_experts) or self.num_shared_experts < 0:
      fail("num_shared_experts", "an integer >= 0")
    if self.shared_d_ff is not None and (not is_int(self.shared_d_ff) or self.shared_d_ff < 1):
      fail("shared_d_ff", "None (= d_ff) or an integer >= 1")
    if (not is_real(self.routed_scaling_factor) or not math.isfinite(self.routed_scaling_factor)
        or self.routed_scaling_factor <= 0):
      fail("routed_scaling_factor", "a finite number > 0")

    check_choice("renormalize", routing.RENORMALIZE)
    check_choice("second_expert_policy", routing.SECOND_EXPERT_POLICIES)
    check_choice("priority", routing.PRIORITIES)
    check_choice("overflow", routing.OVERFLOWS)
    check_choice("balance_loss_choices", routing.BALANCE_LOSS_CHOICES)
    check_choice("balance_loss_scope", routing.BALANCE_LOSS_SCOPES)
    check_choice("dispatch", DISPATCHES)
    check_choice("grouped_matmul", grouped.IMPLS)
    check_choice("ep_transport", EP_TRANSPORTS)
    check_choice("router", ROUTERS)
    if self.receive_buffer_factor is not None and (
        not is_real(self.receive_buffer_factor) or not math.isfinite(self.receive_buffer_factor)
        or self.receive_buffer_factor <= 0):
      fail("receive_buffer_factor", "None (exact) or a finite number > 0")
    defaults = {f.name: f.default for f in dataclasses.fields(MoEConfig)}
    if self.dispatch == "dropless":
      for name in DROPLESS_IGNORES:
        if getattr(self, name) != defaults[name]:
          raise FieldError(
              f"{name}={getattr(self, name)!r} with dispatch='dropless': dropless "
              f"experts have no capacity, so capacity-only fields keep their defaults; allowed: "
              f"{name}={defaults[name]!r}, or a capacity dispatch ('sort' | 'onehot').")
      if self.expert_dropout > 0:
        fail("expert_dropout", "0 with dispatch='dropless' (expert dropout is built for the "
             "capacity dispatches only)")
    else:
      for name in ("grouped_matmul", "ep_transport", "receive_buffer_factor"):
        if getattr(self, name) != defaults[name]:
          raise FieldError(
              f"{name}={getattr(self, name)!r} is a dropless option; allowed with "
              f"dispatch={self.dispatch!r}: {name}={defaults[name]!r}, or dispatch='dropless'.")
    if self.router != "learned":
      for name in ("choice", "overflow", "num_expert_groups", "bias_update_rate"):
        if getattr(self, name) != defaults[name]:
          raise FieldError(
              f"{name}={getattr(self, name)!r} with router={self.router!r}: a forced "
              f"router picks the experts itself; allowed: {name}={defaults[name]!r}.")
    check_choice("router_dtype", ("float32", "bfloat16", "float16", None))
    if self.gate != "softmax" and self.top_k == 1:
      raise FieldError(
          f"gate={self.gate!r} with top_k=1 normalises every gate to 1.0, so the task "
          "loss gives the router no gradient; allowed with top_k=1: gate='softmax' (Switch).")
    if self.gate == "softmax" and self.renormalize != "before_drop":
      raise FieldError(
          f"renormalize={self.renormalize!r} has no effect with gate='softmax' (raw "
          "probabilities are never normalised); allowed: gate='gshard' or 'mixtral', or leave "
          "renormalize='before_drop'.")
    for name, one_allowed in (("second_expert_threshold", True), ("router_jitter", False),
                              ("expert_dropout", False)):
      value = getattr(self, name)
      if not is_real(value) or not 0.0 <= value <= 1.0 or (value == 1.0 and not one_allowed):
        fail(name, "a number in [0, 1]" if one_allowed else "a number in [0, 1)")
    for name in ("balance_loss_weight", "gshard_loss_weight", "z_loss_weight",
                 "router_init_scale", "expert_init_scale"):
      value = getattr(self, name)
      if not is_real(value) or not math.isfinite(value) or value < 0:
        fail(name, "a finite number >= 0")

  def group_size_for(self, batch: int, length: int) -> int:
    """S for a `[batch, length]` token block; ValueError if the groups do not tile the tokens."""
    tokens = batch * length
    if self.group_size is not None:
      if tokens % self.group_size:
        raise FieldError(
            f"group_size={self.group_size} does not divide the {tokens} tokens of a "
            f"[{batch}, {length}] batch; allowed: a divisor of batch * length.")
      return self.group_size
    if self.num_groups is not None:
      if tokens % self.num_groups:
        raise FieldError(
            f"num_groups={self.num_groups} does not divide the {tokens} tokens of a "
            f"[{batch}, {length}] batch; allowed: a divisor of batch * length.")
      return tokens // self.num_groups
    return length

  def capacity(self, group_size: int, *, deterministic: bool,
               capacity_factor: float | None = None) -> int:
    """Slots per expert per group for S = `group_size` (`routing.expert_capacity`).

    With `choice="expert"` the capacity is how many experts a token gets (top_k on average), a
    part of the model rather than a drop buffer: train and eval use `capacity_factor`, and
    overrides (no-drop eval, eval-CF sweeps) do not apply."""
    if self.dispatch == "dropless":
      return group_size  # No capacity: every choice is computed (the router sees C = S).
    if self.choice == "expert":
      capacity_factor, deterministic = None, False
    if capacity_factor is None and self.expert_capacity is not None:
      return min(self.expert_capacity, group_size)
    if capacity_factor is None:
      capacity_factor = self.eval_capacity_factor if deterministic else self.capacity_factor
    return routing.expert_capacity(group_size, self.num_experts, self.top_k, capacity_factor,
                                   convention=self.capacity_convention,
                                   min_capacity=self.min_capacity,
                                   multiple=self.capacity_multiple)


def is_int(value) -> bool:
  """An integer that is not a bool (config validation: `True` is not a size)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
  """A real number that is not a bool."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)
