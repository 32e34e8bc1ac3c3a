"""SiftAdamW: AdamW on the selected components of a :class:`SiftEngine`.

State exists only for what is trained: for each targeted tensor, fp32 master
values (when the weights are bf16/fp16) and two moments of the selected
components, aligned with the engine's indices; for densely trained modules,
ordinary dense AdamW state. Updates are written into the weights in place,
so the forward pass costs nothing extra and the model can be used or saved
as is at any point.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..parallel import distributed
from ..errors import CheckpointError, ConfigError, NonFiniteGradientError


class SiftAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay on the weights) over a SIFT engine's components.

    Args:
        engine: the :class:`siftune.SiftEngine` whose selected components and
            dense modules this optimizer trains.
        lr: learning rate. Default ``1e-4``.
        betas: moment coefficients. Default ``(0.9, 0.999)``.
        eps: added to the denominator. Default ``1e-8``.
        weight_decay: decoupled weight decay, applied to the trained weight
            values themselves (not to the increment). Default ``0.0``.
        dense_lr: learning rate of densely trained modules (e.g. a new head);
            ``None`` uses ``lr``. Default ``None``.
        max_grad_norm: clip the global norm of the applied gradient (selected
            entries and dense modules); ``None`` takes the engine config's.
        nonfinite: ``"skip"`` a step whose gradient holds NaN/Inf (counted in
            :attr:`skipped_steps`, weights and state untouched) or ``"raise"``
            :class:`NonFiniteGradientError`. Default ``"skip"``.

    LR schedulers work as with any optimizer: the two param groups are
    ``param_groups[0]`` (targeted tensors) and ``param_groups[1]`` (dense).
    """

    def __init__(self, engine, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 dense_lr=None, max_grad_norm=None, nonfinite="skip"):
        if not lr > 0:
            raise ConfigError(f"lr must be > 0, got {lr}")
        if nonfinite not in ("skip", "raise"):
            raise ConfigError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self.engine = engine
        self.max_grad_norm = engine.config.max_grad_norm if max_grad_norm is None else max_grad_norm
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.last_grad_norm: float | None = None
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        groups = [{"params": [s.param for s in engine.slots], "name": "sparse"}]
        if engine.dense:
            groups.append({"params": list(engine.dense.values()), "name": "dense",
                           "lr": lr if dense_lr is None else dense_lr})
        super().__init__(groups, defaults)
        self._slot_of = {id(s.param): s for s in engine.slots}
        self._nonfinite_in_backward: list[str] = []
        if engine.config.update_in_backward:
            if self.max_grad_norm is not None:
                raise ConfigError("update_in_backward cannot clip by the global norm; pass max_grad_norm=None "
                                  "(under the Trainer: TrainingArguments(max_grad_norm=0))")
            if distributed.world_size() > 1:
                raise ConfigError("update_in_backward works in one process; with several, set it to False")
            engine.apply_in_backward = self._update_in_backward

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.engine.zero_grad()

    def state_dict(self) -> dict:
        """torch's optimizer state dict plus :attr:`skipped_steps`; every tensor keeps its dtype."""
        state = super().state_dict()
        state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` exactly; load the engine's state first.

        torch's own loader would cast the fp32 master values and moments of a
        bf16 model to bf16; this one keeps every tensor's dtype, only moving
        it to its parameter's device. The indices of state that belongs to
        the engine's current selection become that selection's tensor again;
        state of another selection (the engine's own state was not restored)
        is remapped at the next step, keeping what components that stay
        selected had.
        """
        saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
        if (not isinstance(saved_groups, list) or not isinstance(saved_state, dict)
                or [len(g.get("params", ())) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]):
            raise CheckpointError("optimizer state does not fit this optimizer's parameter groups; "
                                  "attach with the saved run's target and dense modules")
        param_of = {i: p for saved, group in zip(saved_groups, self.param_groups)
                    for i, p in zip(saved["params"], group["params"])}
        state = defaultdict(dict)
        for key, values in saved_state.items():
            if key not in param_of or not isinstance(values, dict):
                raise CheckpointError(f"optimizer state holds an entry ({key!r}) for no parameter of this optimizer")
            p = param_of[key]
            state[p] = {k: v.to(p.device) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
            slot = self._slot_of.get(id(p))
            if slot is not None and "idx" in state[p]:
                if (slot.idx is not None and state[p].get("version") == slot.version
                        and torch.equal(state[p]["idx"], slot.idx)):
                    state[p]["idx"] = slot.idx
                else:
                    state[p]["version"] = None  # no engine version: the next step remaps it
        skipped = state_dict.get("skipped_steps", 0)
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise CheckpointError(f"optimizer state: skipped_steps {skipped!r} must be an integer >= 0")
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = state
        self.skipped_steps = skipped

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self.engine.gradients()
        norm = distributed.global_norm(grads)  # with update_in_backward: of the dense modules only
        self.last_grad_norm = norm
        bad, self._nonfinite_in_backward = self._nonfinite_in_backward, []
        if not math.isfinite(norm) or bad:
            self.engine.finish_step(skipped=True)
            if self.nonfinite == "raise":
                where = f" (in {', '.join(bad)}, whose update was skipped)" if bad else ""
                raise NonFiniteGradientError(
                    f"gradient norm is {norm if not bad else 'not finite'} at step {self.engine.steps}{where}; "
                    "lower the lr, use fp32/bf16, or pass nonfinite='skip'"
                )
            self.skipped_steps += 1
            return loss
        scale = 1.0
        if self.max_grad_norm is not None:
            scale = min(1.0, self.max_grad_norm / (norm + 1e-6))
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for p, idx, grad in grads:
            group = group_of[id(p)]
            if idx is None:
                self._dense_update(p, grad, group, scale)
            else:
                self._sparse_update(p, idx, grad, group, scale)
        self.engine.finish_step()
        return loss

    # -- updates -------------------------------------------------------------
    @torch.no_grad()
    def _update_in_backward(self, slot, idx) -> None:
        """update_in_backward: one targeted tensor's update, from its backward hook."""
        if not bool(torch.isfinite(slot.grad).all()):
            self._nonfinite_in_backward.append(slot.name)
            self.engine.undo_selection(slot)  # a selection taken from this gradient is not kept
            return
        self._sparse_update(slot.param, idx, slot.grad, self.param_groups[0], 1.0)

    def _sparse_update(self, p, idx, grad, group, scale):
        slot = self._slot_of[id(p)]
        state = self.state[p]
        per_step = self.engine.config.mode == "per_step"
        low_precision = p.dtype != torch.float32 and self.engine.config.master_weights
        if per_step:
            flat = distributed.local(p).view(-1)  # a sharded weight: this rank's rows
            self._ensure_dense_state(state, flat, low_precision)
        elif state.get("version") != slot.version:
            self._remap(state, p, slot, low_precision)
        # The buffer holds the gradient's own dtype; the update math is fp32.
        grad = grad.float()  # no copy when fp32
        if scale != 1.0:
            grad = grad * scale
        if per_step:
            values = state["master"][idx] if low_precision else flat[idx].float()
            m, v, steps = state["exp_avg"][idx], state["exp_avg_sq"][idx], state["steps"][idx] + 1
            _adamw(values, grad, m, v, steps, group)
            state["exp_avg"][idx], state["exp_avg_sq"][idx], state["steps"][idx] = m, v, steps
            if low_precision:
                state["master"][idx] = values
            flat[idx] = values.to(p.dtype)  # index_put_: takes int32 indices, unlike index_copy_
        else:
            factor = self.engine.config.rate_factor(self.engine.steps)  # shrink_after: lower before the shrink
            if factor != 1.0:
                group = {**group, "lr": group["lr"] * factor}
            values = state["master"] if low_precision else slot.storage.read(idx).float()
            state["steps"] = state["steps"] + 1
            # step_scale="input": each component's rate times its input feature's factor (siftune.core.stepscale)
            lr_scale = None if slot.input is None else slot.input.at(idx)  # idx: flat indices
            _adamw(values, grad, state["exp_avg"], state["exp_avg_sq"], state["steps"], group, lr_scale)
            slot.storage.write(idx, values)

    def _dense_update(self, p, grad, group, scale):
        state = self.state[p]
        low_precision = p.dtype != torch.float32 and self.engine.config.master_weights
        p = distributed.local(p)  # a sharded parameter: state and update for this rank's part only
        if not state:
            state["steps"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            if low_precision:
                state["master"] = p.float()
        state["steps"] += 1
        values = state["master"] if low_precision else p
        g = grad.float() * scale if (scale != 1.0 or grad.dtype != values.dtype) else grad
        _adamw(values, g, state["exp_avg"], state["exp_avg_sq"], state["steps"], group)
        if low_precision:
            p.copy_(values)

    def _state_dtype(self):
        return self.engine.config.torch_state_dtype

    def _ensure_dense_state(self, state, p, low_precision):
        if state:
            return
        dtype = self._state_dtype()
        state["exp_avg"] = torch.zeros(p.numel(), dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(p.numel(), dtype=dtype, device=p.device)
        state["steps"] = torch.zeros(p.numel(), dtype=torch.int32, device=p.device)
        if low_precision:
            state["master"] = p.detach().reshape(-1).float()

    def _remap(self, state, p, slot, low_precision):
        """Carry the state of components that stay selected over to a new selection."""
        new_idx, dtype = slot.flat(), self._state_dtype()
        k = new_idx.numel()
        periodic = self.engine.config.mode == "periodic" or bool(self.engine.config.shrink_after)
        fresh = {
            "exp_avg": torch.zeros(k, dtype=dtype, device=p.device),
            "exp_avg_sq": torch.zeros(k, dtype=dtype, device=p.device),
            # Periodic mode counts steps per component: a component that joins late
            # needs its own bias correction.
            "steps": torch.zeros(k, dtype=torch.int32, device=p.device) if periodic else 0,
        }
        if low_precision:
            fresh["master"] = slot.storage.read(new_idx).float()
        old_idx = slot.flat(state["idx"]) if state.get("idx") is not None else None
        if old_idx is not None and old_idx.numel():
            pos = torch.searchsorted(old_idx, new_idx).clamp_(max=old_idx.numel() - 1)
            stays = old_idx[pos] == new_idx
            for key, value in fresh.items():
                if isinstance(value, torch.Tensor):
                    value[stays] = state[key][pos[stays]]
        state.clear()
        state.update(fresh, idx=slot.idx, version=slot.version)  # the selection as the engine stores it

    def master_values(self) -> dict[str, torch.Tensor]:
        """fp32 master values at each targeted tensor's ledger indices, where kept.

        Passed to :meth:`SiftEngine.increment` so a bf16 model's increment keeps
        the precision training had.
        """
        out = {}
        for slot in self.engine.slots:
            state = self.state.get(slot.param, {})
            if "master" not in state or slot.ever_idx is None:
                continue
            ever_idx = slot.ledger_indices()
            values = slot.storage.read(ever_idx).float()
            if self.engine.config.mode == "per_step":
                values = state["master"][ever_idx]
            else:
                pos = torch.searchsorted(ever_idx, slot.flat(state["idx"]))
                values[pos] = state["master"]
            out[slot.name] = values
        return out


def _adamw(values, grad, exp_avg, exp_avg_sq, steps, group, lr_scale=None):
    """One AdamW update of ``values`` (fp32, in place); moments may be lower precision. ``lr_scale``: a
    factor of the rate for each component (step and weight decay), or None."""
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    m = exp_avg if exp_avg.dtype == torch.float32 else exp_avg.float()
    v = exp_avg_sq if exp_avg_sq.dtype == torch.float32 else exp_avg_sq.float()
    if wd:
        values.mul_(1 - lr * wd if lr_scale is None else 1 - (lr * wd) * lr_scale)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if isinstance(steps, torch.Tensor):
        t = steps.float()
        bias1 = 1 - torch.pow(beta1, t)
        bias2_sqrt = (1 - torch.pow(beta2, t)).sqrt()
        numerator, denominator, value = m / bias1, (v.sqrt() / bias2_sqrt).add_(eps), -lr
    else:
        bias1 = 1 - beta1 ** steps
        bias2_sqrt = math.sqrt(1 - beta2 ** steps)
        numerator, denominator, value = m, (v.sqrt() / bias2_sqrt).add_(eps), -lr / bias1
    if lr_scale is None:
        values.addcdiv_(numerator, denominator, value=value)
    else:
        values.add_(numerator.div(denominator).mul_(lr_scale), alpha=value)
    if m is not exp_avg:
        exp_avg.copy_(m)
    if v is not exp_avg_sq:
        exp_avg_sq.copy_(v)
