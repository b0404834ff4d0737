"""Train the demo world's residual-stream SAEs: TopK training, shipped as JumpReLU.

TopK needs no sparsity-coefficient tuning, which matters for a build that must work unattended.
After training, each latent gets its own JumpReLU threshold, chosen so that it fires as often as
it did under TopK (the way Llama Scope ships TopK SAEs as JumpReLU). JumpReLU is what the exact
sparse-ablation engine handles with only the ablated latents' encoder columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm


@dataclass
class SAEWeights:
    W_enc: Tensor  # [d, m]
    b_enc: Tensor  # [m]
    W_dec: Tensor  # [m, d]
    b_dec: Tensor  # [d]
    threshold: Tensor | None = None  # [m], JumpReLU (None while TopK)

    def encode(self, x: Tensor) -> Tensor:
        pre = x @ self.W_enc + self.b_enc
        assert self.threshold is not None, "encode needs JumpReLU thresholds"
        return pre * (pre > self.threshold)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec


def input_scale(X: Tensor) -> Tensor:
    """Scalar that brings a typical token to squared norm d (median, so sinks do not set it)."""
    norms = X[: min(len(X), 20_000)].float().norm(dim=1)
    return X.shape[1] ** 0.5 / norms.median()


def ordinary_tokens(X: Tensor, ratio: float = 4.0) -> Tensor:
    """Mask of rows that are not attention sinks (norm within `ratio` x the median). Like Gemma
    Scope, which leaves BOS out, the SAEs are trained on ordinary tokens only."""
    norms = X.float().norm(dim=1)
    return norms <= ratio * norms.median()


def relative_mse(recon: Tensor, x: Tensor) -> Tensor:
    """Mean squared error per token, relative to d (inputs are scaled to squared norm ~d)."""
    return (recon - x).pow(2).sum(1).mean() / x.shape[1]


def train_topk(X: Tensor, d_sae: int, k: int, epochs: int, lr: float, batch_size: int, seed: int,
               desc: str = "SAE", quiet: bool = False) -> tuple[SAEWeights, Tensor]:
    """Train a TopK SAE on rows of X; returns weights in the input's scale (no b_dec applied to
    the input: it is folded into b_enc) and the per-latent firing frequency on X."""
    gen = torch.Generator().manual_seed(seed)
    n, d = X.shape
    scale = input_scale(X)
    W_dec = torch.randn(d_sae, d, generator=gen)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).requires_grad_()
    W_enc = W_dec.detach().t().clone().requires_grad_()
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = (X[: min(n, 20_000)].float().mean(0) * scale).clone().requires_grad_()
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr, betas=(0.9, 0.999))
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, 5 * (1 - s / steps)))
    bar = tqdm(total=steps, desc=desc, disable=quiet, leave=False)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            x = X[order[start:start + batch_size]].float() * scale
            pre = (x - b_dec) @ W_enc + b_enc
            vals, idx = pre.topk(k, dim=1)
            recon = F.embedding_bag(idx, W_dec, per_sample_weights=F.relu(vals), mode="sum") + b_dec
            loss = relative_mse(recon, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                W_dec /= W_dec.norm(dim=1, keepdim=True)
            bar.update(1)
    bar.close()
    with torch.no_grad():
        weights = SAEWeights(W_enc * scale, b_enc - b_dec @ W_enc, W_dec / scale, b_dec / scale)
        freq = torch.zeros(d_sae)
        for start in range(0, n, 4096):
            pre = X[start:start + 4096].float() @ weights.W_enc + weights.b_enc
            vals, idx = pre.topk(k, dim=1)
            freq += torch.zeros(d_sae).index_add_(0, idx[vals > 0], torch.ones(int((vals > 0).sum())))
    return weights, freq / n


@torch.no_grad()
def to_jumprelu(weights: SAEWeights, X: Tensor, freq: Tensor) -> SAEWeights:
    """Per-latent thresholds: latent i fires on the same share of X's rows as under TopK."""
    pre = (X.float() @ weights.W_enc + weights.b_enc).t().contiguous()  # [m, n]: sort rows
    n = pre.shape[1]
    fires = (freq * n).round().long().clamp(0, n - 1)
    # only ranks up to the most frequent latent's are needed: a partial sort (topk) suffices
    ranked = pre.topk(int(fires.max()) + 1, dim=1).values
    theta = ranked.gather(1, fires.unsqueeze(1)).squeeze(1)
    theta = torch.where(freq > 0, theta, ranked[:, 0] + 1.0)  # never-firing latents stay off
    return SAEWeights(weights.W_enc, weights.b_enc, weights.W_dec, weights.b_dec, theta.clamp(min=0.0))


@torch.no_grad()
def quality(weights: SAEWeights, X_eval: Tensor, X_dead: Tensor) -> dict:
    """Explained variance and L0 on held-out rows; dead = never fires on held-out + a train sample."""
    x = X_eval.float()
    f = weights.encode(x)
    recon = weights.decode(f)
    ev = 1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    ever = (f > 0).any(0)
    for start in range(0, X_dead.shape[0], 4096):
        ever |= (weights.encode(X_dead[start:start + 4096].float()) > 0).any(0)
    return {"explained_variance": round(ev.item(), 4), "l0": round((f > 0).sum(1).float().mean().item(), 2),
            "dead_fraction": round(1 - ever.float().mean().item(), 4)}


class _JumpReLU(torch.autograd.Function):
    """f = pre·H(pre−θ) with the rectangle-kernel pseudo-derivative for θ (Rajamanoharan et al.)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        near = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        g_theta = (grad * -(theta / eps) * near).sum(0)
        return grad * (pre > theta), g_theta, None


class _Step(torch.autograd.Function):
    """H(pre−θ) for the L0 count; gradient only to θ through the same kernel."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.eps / 2).to(grad.dtype)
        return None, (grad * -(1.0 / ctx.eps) * near).sum(0), None


def finetune_jumprelu(w: SAEWeights, X: Tensor, target_l0: float, epochs: int, lr: float,
                      batch_size: int, seed: int, eps: float = 0.05, desc: str = "JumpReLU",
                      quiet: bool = False) -> SAEWeights:
    """Train a JumpReLU SAE (MSE + λ·L0, λ steered to hit target_l0) from converted TopK weights:
    the frequency-matched thresholds are a start, this fits them to reconstruction."""
    gen = torch.Generator().manual_seed(seed)
    n, d = X.shape
    scale = input_scale(X)
    W_enc = (w.W_enc / scale).clone().requires_grad_()
    b_enc = w.b_enc.clone().requires_grad_()
    W_dec = (w.W_dec * scale).clone().requires_grad_()
    b_dec = (w.b_dec * scale).clone().requires_grad_()
    assert w.threshold is not None, "fitting thresholds needs a start"
    log_theta = w.threshold.clamp(min=1e-3).log().clone().requires_grad_()
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec, log_theta], lr=lr, betas=(0.0, 0.999))
    lam = 1e-3
    steps = epochs * ((n + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc=desc, disable=quiet, leave=False)
    for _ in range(epochs):
        draws = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            x = X[draws[start:start + batch_size]].float() * scale
            pre = x @ W_enc + b_enc
            theta = log_theta.exp()
            f = _JumpReLU.apply(pre, theta, eps)
            mse = relative_mse(f @ W_dec + b_dec, x)
            l0 = _Step.apply(pre, theta, eps).sum(1).mean()
            loss = mse + lam * l0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lam *= 1.02 if l0.item() > target_l0 else 0.98
            with torch.no_grad():
                W_dec /= W_dec.norm(dim=1, keepdim=True)
            bar.update(1)
    bar.close()
    with torch.no_grad():
        return SAEWeights(W_enc * scale, b_enc.detach().clone(), W_dec / scale, b_dec / scale,
                          log_theta.exp().detach().clone())
