"""The FCD train step and anomaly score of METHOD.md, written idiomatically in PyTorch.

This is the peer that ``benchmarks/bench.py`` times fcd-jax against, so it is given PyTorch's
best settings: ``OMP_WAIT_POLICY=PASSIVE`` (set before torch is imported; without it OpenMP
spin-waiting makes eager PyTorch several times slower on small shared machines), one thread per
core, a fused qkv projection with ``F.scaled_dot_product_attention``, the teacher under
``no_grad``/``inference_mode``, foreach SGD, and optionally ``torch.compile``.

The weights are loaded from fcd-jax's own parameter tree (:func:`vit_from_params`), so both
implementations provably hold the same numbers. Only METHOD.md's default forms are implemented:
distillation eq. 8 mean, Gram ``||G_T - G_S||_F / D``, exact running-mean anchor, score eq. 10.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must be set before torch is imported

from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

TokenList = list[torch.Tensor]  # one [batch, tokens, width] tensor per encoder block


class Block(nn.Module):
    """Pre-LayerNorm encoder block (timm layout: fused qkv, then proj)."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, eps: float,
                 gelu_approximate: bool):
        super().__init__()
        self.num_heads = num_heads
        self.ln1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.gelu_approximate = "tanh" if gelu_approximate else "none"

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, width = tokens.shape
        qkv = self.qkv(self.ln1(tokens)).reshape(batch, length, 3, self.num_heads, -1)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [batch, heads, tokens, head_dim]
        attended = F.scaled_dot_product_attention(query, key, value)
        tokens = tokens + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        hidden = F.gelu(self.fc1(self.ln2(tokens)), approximate=self.gelu_approximate)
        return tokens + self.fc2(hidden)


class TorchViT(nn.Module):
    """ViT encoder returning the tokens of every block it runs (cls token first)."""

    def __init__(self, patch_size: int, width: int, depth: int, num_heads: int, mlp_dim: int,
                 num_tokens: int, eps: float = 1e-6, gelu_approximate: bool = False):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_dim, eps, gelu_approximate) for _ in range(depth)
        )

    def forward(self, images: torch.Tensor) -> TokenList:
        """``images``: normalised NCHW float images -> every block's ``[batch, tokens, width]``."""
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed
        outputs = []
        for block in self.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
        return outputs


def _tensor(array: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))


def vit_from_params(params: Mapping[str, Any], num_heads: int, depth: int | None = None,
                    eps: float = 1e-6, gelu_approximate: bool = False) -> TorchViT:
    """A :class:`TorchViT` holding fcd-jax's ``params`` (``fcd_jax.models.vit.ViT`` layout).

    The architecture is read off the parameter shapes; ``depth`` keeps only the first blocks.
    """
    kernel = np.asarray(params["embedding_kernel"])  # [patch, patch, channels, width]
    patch_size, _, _, width = kernel.shape
    stacked = params["blocks"]
    depth = depth or len(np.asarray(stacked["ln1"]["scale"]))
    mlp_dim = np.asarray(stacked["mlp"]["fc1"]["kernel"]).shape[-1]
    num_tokens = np.asarray(params["pos_embedding"]).shape[1]
    model = TorchViT(patch_size, width, depth, num_heads, mlp_dim, num_tokens, eps,
                     gelu_approximate)
    with torch.no_grad():
        model.patch_embed.weight.copy_(_tensor(kernel.transpose(3, 2, 0, 1)))
        model.patch_embed.bias.copy_(_tensor(params["embedding_bias"]))
        model.cls_token.copy_(_tensor(params["cls"]))
        model.pos_embed.copy_(_tensor(params["pos_embedding"]))
        for i, block in enumerate(model.blocks):
            layer = block_params(stacked, i)
            attn = layer["attn"]
            qkv = [attn[name] for name in ("query", "key", "value")]  # kernels [width, heads, dim]
            qkv_kernel = np.concatenate([p["kernel"].reshape(width, width) for p in qkv], axis=1)
            block.qkv.weight.copy_(_tensor(qkv_kernel.T))
            block.qkv.bias.copy_(_tensor(np.concatenate([p["bias"].reshape(width) for p in qkv])))
            block.proj.weight.copy_(_tensor(attn["out"]["kernel"].reshape(width, width).T))
            block.proj.bias.copy_(_tensor(attn["out"]["bias"]))
            for norm in ("ln1", "ln2"):
                getattr(block, norm).weight.copy_(_tensor(layer[norm]["scale"]))
                getattr(block, norm).bias.copy_(_tensor(layer[norm]["bias"]))
            for dense in ("fc1", "fc2"):
                getattr(block, dense).weight.copy_(_tensor(layer["mlp"][dense]["kernel"].T))
                getattr(block, dense).bias.copy_(_tensor(layer["mlp"][dense]["bias"]))
    return model


def block_params(tree: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Block ``index`` of a parameter tree stacked on a leading depth axis, as NumPy arrays."""
    return {
        key: block_params(value, index) if isinstance(value, Mapping) else np.asarray(value)[index]
        for key, value in tree.items()
    }


# ---------------------------------------------------------------- METHOD.md losses and score


def token_diff(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Diff_{c,p} = ||T - S||_2 + 1 - cos(T, S) per token (eq. 8): ``[..., width] -> [...]``."""
    return torch.linalg.vector_norm(teacher - student, dim=-1) + 1 - F.cosine_similarity(
        teacher, student, dim=-1, eps=1e-8
    )


def update_anchor(anchor: torch.Tensor, num_seen: torch.Tensor, teacher_cls: torch.Tensor
                  ) -> torch.Tensor:
    """Exact running mean of the teacher's cls tokens (eq. 1): ``teacher_cls`` is ``[batch, ...]``,
    ``num_seen`` a 0-d tensor (a tensor, so that torch.compile does not recompile every step)."""
    batch = len(teacher_cls)
    return anchor + (teacher_cls.mean(0) - anchor) * (batch / (num_seen + batch))


def gram(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """G = phi_c1^T phi_c2 / N_tokens (eq. 4), one ``[width, width]`` matrix per image."""
    return first.transpose(1, 2) @ second / first.shape[1]


def fcd_loss(teacher: TokenList, student: TokenList, anchor: torch.Tensor,
             layers: Sequence[int], anchor_layers: Sequence[int], lam: float) -> torch.Tensor:
    """L = L_distill + lam * (L_anchor + L_Gram) (eq. 6), default forms, mean over the batch.

    ``anchor``: ``[len(anchor_layers), width]``, already updated with this batch.
    """
    distill = sum(token_diff(teacher[c], student[c]).mean(1) for c in layers)
    anchor_loss = sum(
        torch.linalg.vector_norm(student[c][:, 0] - anchor[i], dim=-1)
        for i, c in enumerate(anchor_layers)
    )
    width = teacher[layers[0]].shape[-1]
    gram_loss = sum(
        torch.linalg.matrix_norm(gram(teacher[a], teacher[b]) - gram(student[a], student[b]))
        for a, b in zip(layers[:-1], layers[1:], strict=True)
    ) / width
    return (distill + lam * (anchor_loss + gram_loss)).mean()


def anomaly_scores(teacher: TokenList, student: TokenList, anchor: torch.Tensor,
                   layers: Sequence[int], anchor_layers: Sequence[int], top_k: int) -> torch.Tensor:
    """Score = S_D + S_A (eq. 7-10), one per image."""
    score = 0.0
    for c in layers:
        diff = token_diff(teacher[c], student[c])  # [batch, tokens]
        score = score + diff[:, 0] + diff[:, 1:].topk(top_k, dim=1).values.mean(1)
    for i, c in enumerate(anchor_layers):
        score = score + torch.linalg.vector_norm(teacher[c][:, 0] - anchor[i], dim=-1)
        score = score + torch.linalg.vector_norm(student[c][:, 0] - anchor[i], dim=-1)
    return score


# ---------------------------------------------------------------- train step and score


def warmup_constant_lr(lr: float, warmup_steps: int) -> Callable[[int], float]:
    """The learning rate of update ``step`` (0-based): linear warmup reaching ``lr`` at update
    ``warmup_steps - 1``, then constant (fcd_jax.train_state.learning_rate, schedule "constant")."""
    return lambda step: lr * min(1.0, (step + 1) / max(warmup_steps, 1))


class TorchFcd:
    """Teacher, student, anchor and SGD state; ``train_step`` and ``score`` take uint8 NHWC.

    ``lr_schedule(step)`` gives the learning rate of update ``step`` (0-based), ``compile`` wraps
    the forward computations in ``torch.compile(mode=compile_mode)``.
    """

    def __init__(self, teacher_params: Mapping[str, Any], student_params: Mapping[str, Any], *,
                 num_heads: int, layers: Sequence[int], anchor_layers: Sequence[int] = (11,),
                 lam: float = 1.0, top_k: int = 20, image_size: int = 224, mean: float = 0.5,
                 std: float = 0.5, eps: float = 1e-6, gelu_approximate: bool = False,
                 lr_schedule: Callable[[int], float] = lambda step: 0.1, momentum: float = 0.0,
                 clip_norm: float = 1.0, freeze_pos_embedding: bool = True,
                 compile: bool = False, compile_mode: str | None = None):
        self.layers, self.anchor_layers = tuple(layers), tuple(anchor_layers)
        self.lam, self.top_k, self.image_size = lam, top_k, image_size
        self.mean, self.std, self.clip_norm = mean, std, clip_norm
        needed_depth = max(self.layers + self.anchor_layers) + 1  # stop after the last used block
        vit = dict(num_heads=num_heads, depth=needed_depth, eps=eps,
                   gelu_approximate=gelu_approximate)
        self.teacher = vit_from_params(teacher_params, **vit).eval().requires_grad_(False)
        self.student = vit_from_params(student_params, **vit).train()
        self.student.pos_embed.requires_grad_(not freeze_pos_embedding)
        width = self.student.cls_token.shape[-1]
        self.anchor = torch.zeros(len(self.anchor_layers), width)
        self.num_seen = torch.zeros(())
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.lr_schedule = lr_schedule
        self.optimizer = torch.optim.SGD(self.trainable, lr=lr_schedule(0), momentum=momentum,
                                         foreach=True)
        self.step_count = 0
        self._loss_and_anchor = self._forward_loss
        self._scores = self._forward_scores
        if compile:
            self._loss_and_anchor = torch.compile(self._forward_loss, mode=compile_mode)
            self._scores = torch.compile(self._forward_scores, mode=compile_mode)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> normalised float NCHW at ``image_size`` (bilinear resize if needed)."""
        images = images.permute(0, 3, 1, 2).float() / 255.0
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size),
                                   mode="bilinear", antialias=True, align_corners=False)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return (images - self.mean) / self.std

    def _forward_loss(self, images: torch.Tensor, anchor: torch.Tensor, num_seen: torch.Tensor):
        images = self.preprocess(images)
        with torch.no_grad():
            teacher = self.teacher(images)
            teacher_cls = torch.stack([teacher[c][:, 0] for c in self.anchor_layers], dim=1)
            anchor = update_anchor(anchor, num_seen, teacher_cls)
        student = self.student(images)
        loss = fcd_loss(teacher, student, anchor, self.layers, self.anchor_layers, self.lam)
        return loss, anchor

    def _forward_scores(self, images: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        images = self.preprocess(images)
        teacher, student = self.teacher(images), self.student(images)
        return anomaly_scores(teacher, student, anchor, self.layers, self.anchor_layers, self.top_k)

    def train_step(self, images: torch.Tensor) -> torch.Tensor:
        """One SGD step on a uint8 NHWC batch; returns the (detached) loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_schedule(self.step_count)
        loss, self.anchor = self._loss_and_anchor(images, self.anchor, self.num_seen)
        self.num_seen = self.num_seen + len(images)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm:
            nn.utils.clip_grad_norm_(self.trainable, self.clip_norm, foreach=True)
        self.optimizer.step()
        self.step_count += 1
        return loss.detach()

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """Anomaly scores (eq. 10) of a uint8 NHWC batch."""
        with torch.inference_mode():
            return self._scores(images, self.anchor)
