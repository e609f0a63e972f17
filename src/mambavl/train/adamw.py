"""AdamW whose step is one Triton launch over every parameter (`ops.triton.adamw`), and the gradients' norm
for clipping in one launch too.

It is `torch.optim.AdamW` in everything but the step's kernels: the same hyperparameters, the same state
(`step`, `exp_avg`, `exp_avg_sq`) and state dict, so checkpoints move between the two and LR schedulers
work unchanged. A step whose parameters the kernels cannot take (not fp32, not contiguous, amsgrad,
maximize, a tensor learning rate) runs torch's own step instead, with the same result.
"""

from __future__ import annotations

import torch

from mambavl.ops.dispatch import interpreting, triton_available
from mambavl.runtime import to_device


def _kernels():
    """`ops.triton.adamw`, imported where it is used: this module (and the trainer's clipping, which
    checks for this class) stays importable where Triton is not installed."""
    from mambavl.ops.triton import adamw

    return adamw


class TritonAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW(params, lr, betas, eps, weight_decay)` stepping every tensor in one launch.

    `grad_scale`: when set to a device scalar before `step()`, the gradients are divided by it inside the
    update (as fused AdamW's `grad_scale`), which is how clipping takes effect without a pass over the
    gradients (`grad_norm`, `recipe.clip_and_step`)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **options):
        """`options`: AdamW's others (amsgrad, maximize, ...), which take torch's step; not fused or
        foreach, which name torch's own kernels."""
        if options.get("fused") or options.get("foreach"):
            raise ValueError("TritonAdamW has its own kernels: fused= and foreach= are torch.optim.AdamW's")
        options.update(fused=None, foreach=False)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)
        self._blocks: dict[tuple, object] = {}  # (device, sizes) -> ops.triton.adamw.Blocks
        self.grad_scale: torch.Tensor | None = None

    def _blocks_for(self, tensors: list[torch.Tensor]):
        sizes = tuple(t.numel() for t in tensors)
        key = (tensors[0].device, sizes)
        if key not in self._blocks:
            self._blocks[key] = _kernels().Blocks.of(list(sizes), tensors[0].device)
        return self._blocks[key]

    def _with_grads(self) -> list[tuple[dict, torch.Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None and p.numel()]

    def _kernel_problem(self, pairs) -> str | None:
        """Why this step cannot run the kernels (None if it can)."""
        if not pairs:
            return "no gradients"
        if not triton_available():
            return "Triton is not installed"
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["differentiable"]:
                return "amsgrad, maximize or differentiable"
            if isinstance(group["lr"], torch.Tensor):
                return "a tensor learning rate"
        tensors = [t for _, p in pairs for t in (p, p.grad)]
        if tensors[0].device.type != "cuda" and not interpreting():
            return "CPU tensors"
        return _kernels().check_tensors(*tensors)

    def grad_norm(self) -> torch.Tensor:
        """The L2 norm of every gradient together, an fp32 device scalar (`clip_grad_norm_`'s total norm),
        in one launch where the kernels apply."""
        pairs = self._with_grads()
        if self._kernel_problem(pairs) is not None:
            return torch.nn.utils.get_total_norm([p.grad for _, p in pairs], 2.0, foreach=True)
        grads = [p.grad for _, p in pairs]
        return _kernels().sum_squares(grads, self._blocks_for(grads)).sqrt()

    def _torch_step(self, grads: list[torch.Tensor]) -> None:
        """torch's own step; its non-fused path has no divisor, so `grad_scale` divides the gradients."""
        scale, self.grad_scale = self.grad_scale, None
        try:
            if scale is not None and grads:
                torch._foreach_div_(grads, scale)
            super().step()
        finally:
            self.grad_scale = scale

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs = self._with_grads()
        if self._kernel_problem(pairs) is not None:
            self._torch_step([p.grad for _, p in pairs])
            return loss
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for _, p in pairs:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state["step"].device.type != "cpu":  # from a fused or capturable optimizer's state dict
                state["step"] = state["step"].cpu()
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if _kernels().check_tensors(params[0], *exp_avgs, *exp_avg_sqs) is not None:
            self._torch_step(grads)  # state loaded in another dtype or layout: torch's step from it
            return loss
        torch._foreach_add_(steps, 1.0)
        rows = []
        for (group, _), step in zip(pairs, steps, strict=True):
            beta1, beta2 = group["betas"]
            t, lr = float(step), group["lr"]
            rows.append(
                [1.0 - lr * group["weight_decay"], lr / (1.0 - beta1**t), (1.0 - beta2**t) ** 0.5,
                 1.0 - beta1, beta2, group["eps"]]
            )  # fmt: skip
        device = params[0].device
        hyper = to_device(rows, device, torch.float32)
        _kernels().adamw_update(
            params, grads, exp_avgs, exp_avg_sqs, hyper, self._blocks_for(params), self.grad_scale
        )
        return loss
