"""A slow, obviously correct SIFT: dense gradients, dense masks, masked AdamW.

It keeps everything dense (gradients, masks, moments, per-component step
counts, fp32 masters) and spells out the algorithm with no hooks and no index
bookkeeping, so the tests can hold the fast engine to it step by step. Use
it in a plain loop::

    ref = ReferenceSift(model, config, lr=1e-3)
    for batch in batches:
        model(**batch).loss.backward()
        ref.after_backward()          # once per micro-batch
        if end_of_accumulation:
            ref.step()                # update, then zero the gradients
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import SiftConfig
from .budget import change_ranking
from .engine import earlier_changes
from .select import count_selected, find_targets, line_caps, random_indices, tensor_generator, top_k_indices
from .stepscale import factors, feature_axis, scalable
from .structured import random_lines, selected_count


class ReferenceSift:
    """The dense twin of :class:`SiftEngine` + :class:`SiftAdamW` (same arguments)."""

    def __init__(self, model: nn.Module, config: SiftConfig, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, dense_lr=None):
        self.model = model
        self.lr, self.dense_lr = lr, lr if dense_lr is None else dense_lr
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        targeted, self.dense = find_targets(model, config.target_modules, config.dense_modules)
        self.config = config = config.resolve(scalable=scalable(model, targeted))
        self.targeted = targeted
        trainable = {id(p) for p in targeted.values()} | {id(p) for p in self.dense.values()}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        self.k = {n: count_selected(p.numel(), config.selected_density) for n, p in targeted.items()}
        self.final_k = {n: count_selected(p.numel(), config.density) for n, p in targeted.items()}  # shrink_after
        if config.structure:  # whole rows (columns): the count rounded to whole ones
            self.k = {n: selected_count(tuple(p.shape), config.density, config.structure) for n, p in targeted.items()}
        self.generators = {n: tensor_generator(config.seed, i) for i, n in enumerate(targeted)}
        state_dtype = config.torch_state_dtype
        self.mask = {n: None for n in targeted}
        self.score = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in targeted.items()}
        self.seen = {n: 0 for n in targeted}
        self.window_grad = {n: None for n in targeted}  # score="grad_squared": this step's gradient in the window
        self.window_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in targeted.items()}  # grad_snr: the window's
        self.complete = []  # tensors whose window is complete, waiting for a global selection
        params = {**targeted, **self.dense}
        self.m = {n: torch.zeros_like(p, dtype=state_dtype if n in targeted else torch.float32) for n, p in params.items()}
        self.v = {n: torch.zeros_like(p, dtype=state_dtype if n in targeted else torch.float32) for n, p in params.items()}
        self.t = {n: torch.zeros_like(p, dtype=torch.int32) for n, p in params.items()}
        self.master = {n: p.detach().float().clone() for n, p in params.items()}
        self.untrained = {n: p.detach().float().clone() for n, p in targeted.items()}  # grow_drop, shrink_after
        self.previous_mask = {n: None for n in targeted}
        self.changes = earlier_changes(config.select_from, {n: tuple(p.shape) for n, p in targeted.items()}) \
            if config.select_from else None  # select_from: the earlier run's change ranks the selection
        self.steps = 0
        # step_scale="input": each tensor's window inputs (sum of x_j^2, tokens) and its dense rate factors
        self.inputs = {n: [torch.zeros(0), 0] for n in targeted}
        self.lr_scale = {n: None for n in targeted}
        if config.step_scale:
            for name in targeted:
                module = model.get_submodule(name.rpartition(".")[0])
                feature_axis(module, name)
                module.register_forward_hook(self._count_inputs(name))

    def _count_inputs(self, name):
        def hook(module, args, output):
            if torch.is_grad_enabled() and self.mask[name] is None and self.steps >= self.config.select_after:
                x = args[0].detach().float()
                x = x.reshape(-1, x.shape[-1])
                sums, count = self.inputs[name]
                self.inputs[name] = [(x * x).sum(0) + (sums if count else 0), count + x.shape[0]]
        return hook

    def _take_lr_scale(self, name):
        """The rate factor of every component: its input feature's median(r) / r_j (siftune.core.stepscale)."""
        p = self.targeted[name]
        axis = feature_axis(self.model.get_submodule(name.rpartition(".")[0]), name)
        sums, count = self.inputs[name]
        per_feature = factors(sums if count else torch.zeros(p.shape[axis]), count)
        self.lr_scale[name] = (per_feature[None, :] if axis == 1 else per_feature[:, None]).expand(p.shape).clone()
        self.inputs[name] = [torch.zeros(0), 0]

    def _ranking(self, name):
        """The score components are ranked by, by magnitude."""
        if self.config.score == "grad_weight":
            return self.score[name] * self.targeted[name].detach().float()
        if self.config.score == "grad_snr":  # |sum g| / sqrt(sum g^2), 0 where every gradient was 0
            squares = self.score[name]
            return torch.where(squares > 0, self.window_sum[name].abs() / squares.sqrt(), torch.zeros_like(squares))
        return self.score[name]

    def _select(self, name):
        """New mask from the score, per tensor."""
        p = self.targeted[name]
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        k, ranking = self.k[name], self._ranking(name).reshape(-1).abs()
        if self.changes is not None:
            ranking = change_ranking(self.changes[name], (p.numel(),), "cpu")
        if self.config.structure:
            mask = self._lines_mask(name)
        elif self.config.selection == "random":
            mask[random_indices(p.numel(), k, self.generators[name], "cpu")] = True
        elif self.config.selection == "mixed":
            top = round(self.config.score_share * k)
            if top:
                mask[top_k_indices(ranking, top)] = True
            drawn = [i for i in torch.randperm(p.numel(), generator=self.generators[name]).tolist() if not mask[i]]
            mask[drawn[:k - top]] = True
        elif self.config.selection == "balanced":
            for i in self._balanced(ranking.view(p.shape[0], -1), k):
                mask[i] = True
        elif self.config.selection == "grow_drop" and self.previous_mask[name] is not None:
            held = self.previous_mask[name].reshape(-1).cpu()
            change = (p.detach().float() - self.untrained[name]).abs().reshape(-1)
            drop = round(self.config.drop_share * k)
            dropped = sorted(held.nonzero().squeeze(1).tolist(), key=lambda i: (change[i], i))[:drop]
            grown = sorted((~held).nonzero().squeeze(1).tolist(), key=lambda i: (-ranking[i], i))[:drop]
            mask[held] = True
            mask[dropped] = False
            mask[grown] = True
        else:
            mask[top_k_indices(ranking, k)] = True
        self._use(name, mask)

    def _balanced(self, score, k):
        """selection="balanced", one component at a time: rounds of row proposals and column choices
        within the caps, then chains of swaps within the caps while fewer than k. Flat indices."""
        rows, columns = score.shape
        row_cap, column_cap = line_caps((rows, columns), k, self.config.line_cap)
        in_row, in_column, chosen = [0] * rows, [0] * columns, set()
        best_first = lambda places: sorted(places, key=lambda rc: (-float(score[rc]), rc[0] * columns + rc[1]))
        while len(chosen) < k:
            open_ = [(r, c) for r in range(rows) for c in range(columns)
                     if (r, c) not in chosen and in_row[r] < row_cap and in_column[c] < column_cap]
            if not open_:
                break
            proposed = []
            for r in range(rows):
                mine = sorted((rc for rc in open_ if rc[0] == r), key=lambda rc: (-float(score[rc]), rc[1]))
                proposed += mine[:row_cap - in_row[r]]
            kept = []
            for c in range(columns):
                mine = sorted((rc for rc in proposed if rc[1] == c), key=lambda rc: (-float(score[rc]), rc[0]))
                kept += mine[:column_cap - in_column[c]]
            for r, c in best_first(kept)[:k - len(chosen)]:
                chosen.add((r, c))
                in_row[r] += 1
                in_column[c] += 1
        while len(chosen) < k:
            self._swap_chain(score, chosen, in_row, in_column, row_cap, column_cap)
        return [r * columns + c for r, c in chosen]

    @staticmethod
    def _swap_chain(score, chosen, in_row, in_column, row_cap, column_cap):
        """One more component by the shortest chain of swaps within the caps (a row with room takes a
        component in a full column, which gives up one in another row, ... until a column with room takes
        one) whose taken less given-up scores is largest, in fp32; ties: the lower row, column."""
        rows, columns = len(in_row), len(in_column)
        frontier = {r: torch.tensor(0.0) for r in range(rows) if in_row[r] < row_cap}  # row -> its chain's gain
        row_seen, column_seen, row_from, column_from = set(frontier), set(), {}, {}
        while frontier:
            reached = {}  # column -> (gain, row that takes it)
            for c in range(columns):
                if c in column_seen:
                    continue
                takers = [(gain + score[r, c], r) for r, gain in sorted(frontier.items()) if (r, c) not in chosen]
                if takers:
                    reached[c] = max(takers, key=lambda t: (float(t[0]), -t[1]))
            column_seen |= set(reached)
            column_from.update({c: r for c, (_, r) in reached.items()})
            ends = [(gain, c) for c, (gain, _) in sorted(reached.items()) if in_column[c] < column_cap]
            if ends:
                c = max(ends, key=lambda t: (float(t[0]), -t[1]))[1]
                in_column[c] += 1
                while True:
                    r = column_from[c]
                    chosen.add((r, c))
                    if r not in row_from:
                        in_row[r] += 1
                        return
                    c = row_from[r]
                    chosen.remove((r, c))
            frontier = {}
            for r in set(range(rows)) - row_seen:
                givers = [(reached[c][0] - score[r, c], c) for c in sorted(reached) if (r, c) in chosen]
                if givers:
                    frontier[r], row_from[r] = max(givers, key=lambda t: (float(t[0]), -t[1]))
            row_seen |= set(frontier)

    def _lines_mask(self, name):
        """Flat mask of whole rows (columns): those whose |ranking| sum is largest, or random ones."""
        p, structure = self.targeted[name], self.config.structure
        rows = structure == "rows"
        count = self.k[name] // (p.shape[1] if rows else p.shape[0])
        if self.config.selection == "random":
            flat = random_lines(tuple(p.shape), self.k[name], structure, self.generators[name], "cpu")
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            mask[flat] = True
            return mask
        sums = self._ranking(name).abs().sum(dim=1 if rows else 0).cpu()
        lines = torch.sort(sums, descending=True, stable=True).indices[:count]
        mask = torch.zeros(p.shape, dtype=torch.bool)
        if rows:
            mask[lines, :] = True
        else:
            mask[:, lines] = True
        return mask.reshape(-1)

    def _select_globally(self):
        """One ranking of all targeted tensors' components (model order breaks ties) for the total count,
        after each tensor's top ``min_density`` share (its floor)."""
        floors, others = {}, []
        for name, p in self.targeted.items():
            ranking = self._ranking(name).reshape(-1).abs()
            floor = round(p.numel() * self.config.min_density)
            floors[name] = torch.zeros(p.numel(), dtype=torch.bool)
            floors[name][torch.sort(ranking, descending=True, stable=True).indices[:floor]] = True
            others.append(torch.where(floors[name], -torch.inf, ranking))
        rest = sum(self.k.values()) - sum(int(f.sum()) for f in floors.values())
        chosen = torch.zeros(sum(p.numel() for p in self.targeted.values()), dtype=torch.bool)
        chosen[torch.sort(torch.cat(others), descending=True, stable=True).indices[:rest]] = True
        offset = 0
        for name, p in self.targeted.items():
            self._use(name, floors[name] | chosen[offset:offset + p.numel()])
            offset += p.numel()

    def _use(self, name, mask):
        """Take ``mask`` (flat) as the selection; components that do not stay selected restart their state."""
        p = self.targeted[name]
        mask = mask.view_as(p).to(p.device)
        if self.config.step_scale:
            self._take_lr_scale(name)
        if self.config.mode != "per_step":
            old = self.previous_mask[name]
            restart = ~(mask & old) if old is not None else torch.ones_like(mask)
            self.m[name][restart] = 0
            self.v[name][restart] = 0
            self.t[name][restart] = 0
            self.master[name][restart] = p.detach().float()[restart]
        self.mask[name] = mask

    @torch.no_grad()
    def after_backward(self) -> None:
        """Count one micro-batch; complete a selection whose N-th micro-batch this was."""
        if self.config.mode == "per_step":
            return
        if self.steps < self.config.select_after:  # the dense modules train alone
            for p in self.targeted.values():
                p.grad = None
            return
        for name, p in self.targeted.items():
            if self.mask[name] is None and p.grad is not None and name not in self.complete:
                self.seen[name] += 1
                done = self.seen[name] == self.config.selection_batches
                if self.config.score in ("grad_squared", "grad_snr"):  # each micro-batch's gradient on its own
                    g, p.grad = p.grad, None
                    self.window_grad[name] = g if self.window_grad[name] is None else self.window_grad[name] + g
                    self.score[name] += g.float() ** 2
                    self.window_sum[name] += g.float()
                    if done:
                        p.grad, self.window_grad[name] = self.window_grad[name], None
                elif done:
                    self.score[name] += p.grad.float()  # p.grad: this window's sum so far
                if done:
                    self.complete.append(name)
        if self.config.budget == "per_tensor":
            for name in self.complete:
                self._select(name)
            self.complete = []
        elif len(self.complete) == len(self.targeted):
            self._select_globally()
            self.complete = []

    def select(self, batches, loss_of=None) -> int:
        """:meth:`SiftEngine.select`: backward on ``batches`` until every tensor has selected; nothing is
        trained and no step counted."""
        loss_of = loss_of or (lambda model, batch: model(**batch).loss)
        used = 0
        for batch in batches:
            loss_of(self.model, batch).backward()
            self.after_backward()
            used += 1
            if all(mask is not None for mask in self.mask.values()):
                break
        for p in {**self.targeted, **self.dense}.values():
            p.grad = None
        self.window_grad = {n: None for n in self.targeted}
        return used

    @torch.no_grad()
    def step(self, max_grad_norm=None) -> None:
        grads = {}
        for name, p in self.targeted.items():
            if self.mask[name] is None:
                self.window_grad[name] = None  # the window goes on: this step's gradient is not applied
            if p.grad is None:
                continue
            if self.config.mode == "per_step":
                self.score[name] = p.grad.float()
                self._select(name)
            if self.mask[name] is None:
                self.score[name] += p.grad.float()  # selection continues into the next window
                continue
            grads[name] = p.grad.float() * self.mask[name]
        for name, p in self.dense.items():
            if p.grad is not None:
                grads[name] = p.grad.float()
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values())) if grads else torch.tensor(0.0)
        max_grad_norm = self.config.max_grad_norm if max_grad_norm is None else max_grad_norm
        scale = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (float(norm) + 1e-6))
        params = {**self.targeted, **self.dense}
        for name, g in grads.items():
            p = params[name]
            mask = self.mask[name] if name in self.targeted else torch.ones_like(p, dtype=torch.bool)
            lr = self.lr * self.config.rate_factor(self.steps) if name in self.targeted else self.dense_lr
            if self.lr_scale.get(name) is not None:
                lr = lr * self.lr_scale[name].to(p.device)
            g = g * scale
            beta1, beta2 = self.betas
            m, v = self.m[name].float(), self.v[name].float()
            t = self.t[name] + mask.int()
            new_m = beta1 * m + (1 - beta1) * g
            new_v = beta2 * v + (1 - beta2) * g * g
            bias1 = 1 - beta1 ** t.double()
            bias2 = 1 - beta2 ** t.double()
            w = self.master[name] * (1 - lr * self.weight_decay)
            new_w = w - lr * (new_m / bias1.float()) / (new_v.sqrt() / bias2.sqrt().float() + self.eps)
            self.m[name] = torch.where(mask, new_m, m).to(self.m[name].dtype)
            self.v[name] = torch.where(mask, new_v, v).to(self.v[name].dtype)
            self.t[name] = t
            self.master[name] = torch.where(mask, new_w, self.master[name])
            p.copy_(self.master[name].to(p.dtype))
        for p in params.values():
            p.grad = None
        self.steps += 1
        if self.config.shrink_after and self.steps == self.config.shrink_after:
            for name in self.targeted:
                self._shrink(name)
        if self.config.mode == "periodic" and self.steps % self.config.refresh_every == 0:
            self._restart_selection()

    def _shrink(self, name) -> None:
        """shrink_after: the final count of the selected components with the largest trained change (by the
        selection's rule, unselected ones ranked 0); the others back to their untrained values and state."""
        p, k = self.targeted[name], self.final_k[name]
        self.k[name] = k
        if self.mask[name] is None:  # not selected yet: it selects at the final count
            return
        held = self.mask[name].reshape(-1).cpu()
        change = (p.detach().float() - self.untrained[name]).abs().reshape(-1).cpu()
        ranking = torch.where(held, change, torch.zeros_like(change))
        keep = torch.zeros(p.numel(), dtype=torch.bool)
        if self.config.selection == "balanced":
            for i in self._balanced(ranking.view(p.shape[0], -1), k):
                keep[i] = True
        else:
            keep[top_k_indices(ranking, k)] = True
        keep = keep.view_as(p).to(p.device)
        out = ~keep
        for state in (self.m, self.v, self.t):
            state[name][out] = 0
        self.master[name][out] = self.untrained[name].to(p.device)[out]
        p.copy_(self.master[name].to(p.dtype))
        self.mask[name] = keep

    def _restart_selection(self) -> None:
        for name in self.targeted:
            self.previous_mask[name] = self.mask[name]
            self.mask[name] = None
            self.seen[name] = 0
            self.score[name].zero_()
            self.window_sum[name].zero_()
