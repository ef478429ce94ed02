"""An independent PyTorch rendering of the official CAV-MAE math (docs/official_behaviour.md).

It uses the PyTorch idioms of the official code (NCHW Conv2d, nn.LayerNorm, torch GELU, the timm
attention reshape) so that parity tests check our layout conversions against real PyTorch ops.
Masks come from explicit noise, as the official ``argsort`` masking.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.norm1_a, self.norm1_v = (nn.LayerNorm(dim) for _ in range(3))
        self.attn = Attention(dim, heads)
        self.norm2, self.norm2_a, self.norm2_v = (nn.LayerNorm(dim) for _ in range(3))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, modality=None):
        n1, n2 = {
            None: (self.norm1, self.norm2),
            "a": (self.norm1_a, self.norm2_a),
            "v": (self.norm1_v, self.norm2_v),
        }[modality]
        x = x + self.attn(n1(x))
        return x + self.mlp(n2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def patchify(imgs, c, h, w, p):
    x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(imgs.shape[0], h * w, p * p * c)


def random_masking(x, ratio, noise):
    n, length, d = x.shape
    keep = int(length * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


class Encoder(nn.Module):
    def __init__(self, cfg, visual=True):
        super().__init__()
        d, h, p = cfg.embed_dim, cfg.num_heads, cfg.patch_size
        self.p, self.grid_a = p, cfg.audio_grid
        self.patch_embed_a = PatchEmbed(p, 1, d)
        self.modality_a = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed_a = nn.Parameter(torch.zeros(1, self.grid_a[0] * self.grid_a[1], d))
        self.blocks_a = nn.ModuleList(
            Block(d, h, cfg.mlp_ratio) for _ in range(cfg.modality_specific_depth)
        )
        if visual:
            self.grid_v = cfg.visual_grid
            self.patch_embed_v = PatchEmbed(p, cfg.in_chans, d)
            self.modality_v = nn.Parameter(torch.zeros(1, 1, d))
            self.pos_embed_v = nn.Parameter(torch.zeros(1, self.grid_v[0] * self.grid_v[1], d))
            self.blocks_v = nn.ModuleList(
                Block(d, h, cfg.mlp_ratio) for _ in range(cfg.modality_specific_depth)
            )
        self.blocks_u = nn.ModuleList(Block(d, h, cfg.mlp_ratio) for _ in range(cfg.shared_depth))
        self.norm_a = nn.LayerNorm(d)
        if visual:
            self.norm_v = nn.LayerNorm(d)
        self.norm = nn.LayerNorm(d)

    def embed_a(self, a):
        a = a.unsqueeze(1).transpose(2, 3)
        return self.patch_embed_a(a) + self.pos_embed_a + self.modality_a

    def embed_v(self, v):
        return self.patch_embed_v(v) + self.pos_embed_v + self.modality_v

    def feat(self, a, v):
        a = self.embed_a(a)
        for blk in self.blocks_a:
            a = blk(a)
        for blk in self.blocks_u:
            a = blk(a, "a")
        v = self.embed_v(v)
        for blk in self.blocks_v:
            v = blk(v)
        for blk in self.blocks_u:
            v = blk(v, "v")
        return self.norm_a(a), self.norm_v(v)


class CAVMAE(Encoder):
    def __init__(self, cfg):
        super().__init__(cfg)
        dd = cfg.decoder_embed_dim
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed_a = nn.Parameter(torch.zeros(1, self.pos_embed_a.shape[1], dd))
        self.decoder_pos_embed_v = nn.Parameter(torch.zeros(1, self.pos_embed_v.shape[1], dd))
        self.decoder_embed = nn.Linear(cfg.embed_dim, dd)
        self.decoder_blocks = nn.ModuleList(
            Block(dd, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dd)
        self.decoder_pred_a = nn.Linear(dd, self.p**2)
        self.decoder_pred_v = nn.Linear(dd, self.p**2 * cfg.in_chans)

    def forward(self, a, v, noise_a, noise_v, ratio_a, ratio_v):
        cfg = self.cfg
        target_a = patchify(a.unsqueeze(1).transpose(2, 3), 1, *self.grid_a, self.p)
        target_v = patchify(v, cfg.in_chans, *self.grid_v, self.p)
        a, mask_a, ids_a = random_masking(self.embed_a(a), ratio_a, noise_a)
        v, mask_v, ids_v = random_masking(self.embed_v(v), ratio_v, noise_v)
        for blk in self.blocks_a:
            a = blk(a)
        for blk in self.blocks_v:
            v = blk(v)
        x = torch.cat((a, v), dim=1)
        for blk in self.blocks_u:
            x = blk(x)
        x = self.norm(x)
        for blk in self.blocks_u:  # the official loop: not chained
            ca = blk(a, "a")
        for blk in self.blocks_u:
            cv = blk(v, "v")
        ca, cv = self.norm_a(ca), self.norm_v(cv)
        pred_a, pred_v = self.decode(x, mask_a, ids_a, mask_v, ids_v)
        loss_a = mae_loss(target_a, pred_a, mask_a, cfg.norm_pix_loss)
        loss_v = mae_loss(target_v, pred_v, mask_v, cfg.norm_pix_loss)
        loss_c, c_acc = contrastive(ca.mean(1), cv.mean(1), cfg.bidirect_contrast)
        loss_c = cfg.contrast_loss_weight * loss_c
        return dict(
            loss=loss_a + loss_v + loss_c,
            loss_mae_a=loss_a,
            loss_mae_v=loss_v,
            loss_c=loss_c,
            c_acc=c_acc,
            mask_a=mask_a,
            mask_v=mask_v,
            pred_a=pred_a,
            pred_v=pred_v,
            latent=x,
            latent_c_a=ca,
            latent_c_v=cv,
        )

    def decode(self, x, mask_a, ids_a, mask_v, ids_v):
        x = self.decoder_embed(x)
        n_a, n_v = int(mask_a[0].sum()), int(mask_v[0].sum())
        len_a = self.pos_embed_a.shape[1]
        keep_a = len_a - n_a
        xa = torch.cat([x[:, :keep_a], self.mask_token.repeat(x.shape[0], n_a, 1)], dim=1)
        xa = torch.gather(xa, 1, ids_a.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        xv = torch.cat([x[:, keep_a:], self.mask_token.repeat(x.shape[0], n_v, 1)], dim=1)
        xv = torch.gather(xv, 1, ids_v.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([xa, xv], dim=1)
        x = x + torch.cat([self.decoder_pos_embed_a, self.decoder_pos_embed_v], dim=1)
        x[:, :len_a] = x[:, :len_a] + self.decoder_modality_a
        x[:, len_a:] = x[:, len_a:] + self.decoder_modality_v
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred_a(x[:, :len_a]), self.decoder_pred_v(x[:, len_a:])


def mae_loss(target, pred, mask, norm_pix):
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def contrastive(a, v, bidirect):
    a, v = F.normalize(a, dim=-1), F.normalize(v, dim=-1)
    total = a @ v.t() / 0.05
    nce = -torch.mean(torch.diag(F.log_softmax(total, dim=0)))
    acc = torch.mean(
        (torch.argmax(F.softmax(total, dim=0), dim=0) == torch.arange(a.shape[0])).float()
    )
    if bidirect:
        nce2 = -torch.mean(torch.diag(F.log_softmax(total.t(), dim=0)))
        acc2 = torch.mean(
            (torch.argmax(F.softmax(total.t(), dim=0), dim=0) == torch.arange(a.shape[0])).float()
        )
        return (nce + nce2) / 2, (acc + acc2) / 2
    return nce, acc


class CAVMAEFT(Encoder):
    def __init__(self, cfg, visual=True):
        super().__init__(cfg, visual)
        self.mlp_head = nn.Sequential(
            nn.LayerNorm(cfg.embed_dim), nn.Linear(cfg.embed_dim, cfg.label_dim)
        )

    def branch(self, x, blocks):
        for blk in blocks:
            x = blk(x)
        return x

    def specific(self, x, modality):
        for blk in self.blocks_u:
            x = blk(x, modality)
        return getattr(self, f"norm_{modality}")(x)

    def joint(self, x):
        for blk in self.blocks_u:
            x = blk(x)
        return self.norm(x)

    def forward(self, a, v, mode):
        if mode == "audioonly" or v is None:
            x = self.specific(self.branch(self.embed_a(a), self.blocks_a), "a").mean(1)
        elif mode == "multimodal":
            a = self.branch(self.embed_a(a), self.blocks_a)
            v = self.branch(self.embed_v(v), self.blocks_v)
            x = self.joint(torch.cat((a, v), dim=1)).mean(1)
        elif mode == "videoonly":
            x = self.specific(self.branch(self.embed_v(v), self.blocks_v), "v").mean(1)
        else:
            m = "a" if mode == "missingaudioonly" else "v"
            embed, blocks = (
                (self.embed_a, self.blocks_a) if m == "a" else (self.embed_v, self.blocks_v)
            )
            x = self.branch(embed(a if m == "a" else v), blocks)
            x = (self.joint(x).mean(1) + self.specific(x, m).mean(1)) / 2
        return self.mlp_head(x)


def load_numpy_state(module: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Load {official name: array} strictly."""
    module.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True
    )
