"""Feature-map terms on one (student, teacher) pair of `[B, C, H, W]` maps: FitNets, AT, NST; FitNets on ViT
tokens `[B, N, D]`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two feature maps `[B, C, H, W]` to the other's spatial size."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if a.shape[-1] > b.shape[-1]:
        return F.adaptive_avg_pool2d(a, b.shape[-2:]), b
    return a, F.adaptive_avg_pool2d(b, a.shape[-2:])


class FitNetsLoss(nn.Module):
    """Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015).

    A 1x1 conv + BN regressor maps the student's hint layer to the teacher's channel count; the loss is the
    mean squared error to the teacher's feature, spatial sizes matched by average pooling.
    `forward(student_feature [B, Cs, Hs, Ws], teacher_feature [B, Ct, Ht, Wt]) -> []`.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.regressor = nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                                       nn.BatchNorm2d(teacher_channels))

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(self.regressor(student_feature), teacher_feature.to(student_feature.dtype))
        return F.mse_loss(s.float(), t.float())


def token_grid(tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`[B, N, D]` -> (the first prefix (class) token `[B, 1, D]` or None, the patch grid `[B, D, g, g]`); the patch
    tokens are the last `g * g` (`models.prefix_tokens`)."""
    b, n, d = tokens.shape
    side = math.isqrt(n)
    prefix = n - side * side
    grid = tokens[:, prefix:].transpose(1, 2).reshape(b, d, side, side)
    return (tokens[:, :1] if prefix else None), grid


class TokenFitNetsLoss(nn.Module):
    """FitNets (Romero et al., ICLR 2015) on ViT token features.

    A trained regressor maps every student token to the teacher's width: linear, then LayerNorm (the token
    analogue of the 1x1 conv + BN on maps; a bare linear map diverges under the hint weight 100 at lr 0.1, as
    a bare 1x1 conv does); the loss is the mean squared
    error to the teacher's tokens over the class token (when both have one) and the patch grid, the student's
    grid resized to the teacher's by bilinear interpolation where the token counts differ (e.g. patch 16 vs 8).
    `forward(student_tokens [B, Ns, Ds], teacher_tokens [B, Nt, Dt]) -> []`.
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.regressor = nn.Sequential(nn.Linear(student_dim, teacher_dim), nn.LayerNorm(teacher_dim))

    def forward(self, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
        s_cls, s_grid = token_grid(self.regressor(student_tokens))
        t_cls, t_grid = token_grid(teacher_tokens.to(s_grid.dtype))
        if s_grid.shape[-1] != t_grid.shape[-1]:
            s_grid = F.interpolate(s_grid, size=t_grid.shape[-2:], mode="bilinear", align_corners=False)
        s_all, t_all = [s_grid.flatten(2).transpose(1, 2)], [t_grid.flatten(2).transpose(1, 2)]
        if s_cls is not None and t_cls is not None:
            s_all.insert(0, s_cls)
            t_all.insert(0, t_cls)
        return F.mse_loss(torch.cat(s_all, 1).float(), torch.cat(t_all, 1).float())


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis's spatial attention: `normalize(mean_c(f^2))`, `[B, C, H, W] -> [B, H * W]`, unit
    L2 norm per sample."""
    return F.normalize(feature.float().pow(2).mean(dim=1).flatten(1), dim=1)


class ATLoss(nn.Module):
    """Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017).

    Mean over batch and positions of the squared difference of the normalised attention maps (so the usual
    beta = 1000 applies, as in the RepDistiller benchmarks). Spatial sizes are matched by average pooling.
    `forward(student_feature [B, Cs, H, W], teacher_feature [B, Ct, H', W']) -> []`.
    """

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        if teacher_feature.dim() == 3:  # a cached attention map [B, H, W] (--targets attention)
            return self.from_map(student_feature, teacher_feature)
        s, t = match_spatial(student_feature, teacher_feature)
        return (attention_map(s) - attention_map(t)).pow(2).mean()

    def from_map(self, student_feature: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        """AT against the teacher's stored map `[B, H, W]` (already normalised). A larger student feature is
        pooled to the map's size as on the features path; a larger map is pooled and renormalised."""
        size = teacher_map.shape[-2:]
        if student_feature.shape[-1] > size[-1]:
            student_feature = F.adaptive_avg_pool2d(student_feature, size)
        elif student_feature.shape[-1] < size[-1]:
            teacher_map = F.adaptive_avg_pool2d(teacher_map[:, None].float(), student_feature.shape[-2:])[:, 0]
        t = F.normalize(teacher_map.float().flatten(1), dim=1)
        return (attention_map(student_feature) - t).pow(2).mean()


class NSTLoss(nn.Module):
    """Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer" (2017).

    Each channel's map, flattened and L2-normalised over positions, is a sample of that network's neuron
    selectivity distribution; the loss is the squared MMD with the polynomial kernel k(a, b) = (a . b)^2:
        mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') - 2 mean_{j,i} k(s_j, t_i)
    per sample, averaged over the batch (channel counts may differ; the larger spatial size is average-pooled
    to the smaller). Weight 50 in the CRD benchmark. `forward(s [B, Cs, H, W], t [B, Ct, H', W']) -> []`.
    """

    @staticmethod
    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b.transpose(1, 2)).pow(2)   # [B, Ca, Cb]

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(student.float(), teacher.float())
        s, t = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2).detach()
        return self.kernel(t, t).mean() + self.kernel(s, s).mean() - 2 * self.kernel(s, t).mean()


class GramLoss(nn.Module):
    """The seed article's channel Gram-matrix feature loss (the style statistic of Gatys et al., 2016).

    Per sample, `G = F Fᵀ / (H W)` `[C, C]` of the map F `[C, H·W]`: which channels fire together, wherever they
    fire. The loss is the seed's `‖G_s − G_t‖²_F`, divided by C² (the mean over the entries, so one weight serves
    layers of any width), averaged over the batch. The spatial sizes may differ (G has none); the channel counts
    must be equal, checked when the pair is planned. `forward(s [B, C, Hs, Ws], t [B, C, Ht, Wt]) -> []`.
    """

    @staticmethod
    def gram(f: torch.Tensor) -> torch.Tensor:
        f = f.float().flatten(2)
        return torch.bmm(f, f.transpose(1, 2)) / f.shape[-1]

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return (self.gram(student) - self.gram(teacher).detach()).pow(2).mean()


class VIDLoss(nn.Module):
    """Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019).

    The teacher's map t is modelled as Gaussian given the student's s: mean μ = r(s), r three 1x1 convs (Cs → Ct
    → Ct → Ct, ReLU between, no biases: RepDistiller's, mid width = the teacher's), and a per-channel variance
    σ² = softplus(α_c) + 1e-5, α initialised so that σ² starts at 5. The loss is the negative log-likelihood
    without its constant, `mean over (B, C, H, W) of ½ ((μ − t)² / σ² + log σ²)`; the larger map is average-pooled
    to the smaller first. Both r and α train with the student (RepDistiller trains α; mdistiller's copy leaves it
    unregistered). Weight 1 (RepDistiller `-b 1`). `forward(s [B, Cs, H, W], t [B, Ct, H', W']) -> []`.
    """

    def __init__(self, student_channels: int, teacher_channels: int, init_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        mid = teacher_channels
        self.regressor = nn.Sequential(nn.Conv2d(student_channels, mid, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(mid, mid, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(mid, teacher_channels, 1, bias=False))
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), math.log(math.expm1(init_var - eps))))
        self.eps = eps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(student, teacher.to(student.dtype))
        mu = self.regressor(s).float()
        var = (F.softplus(self.log_scale) + self.eps)[None, :, None, None]
        return (0.5 * ((mu - t.float()).pow(2) / var + torch.log(var))).mean()


def _encoder(cin: int, mid: int, out: int, bn: bool, transposed: bool = False) -> nn.Sequential:
    """Three 3x3 convs (cin → mid → out → out, or transposed ones), each followed by BN (if `bn`) and
    LeakyReLU(0.1): FT's paraphraser (no BN) and translator (BN) blocks."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for a, b in ((cin, mid), (mid, out), (out, out)):
        layers += [conv(a, b, 3, 1, 1), *([nn.BatchNorm2d(b)] if bn else []), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class FTLoss(nn.Module):
    """Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer" (NeurIPS 2018), as
    RepDistiller runs it (on the last stage's map).

    A paraphraser (an autoencoder of the teacher's map: encoder Ct → Ct → k·Ct → k·Ct, decoder back, 3x3 convs
    and LeakyReLU, rate k = 0.5) is trained first, on the cached teacher maps alone, to reconstruct them (MSE;
    `init_loss`, the `init_epochs` stage). Then it is frozen, and a translator (the same encoder shape, with BN)
    maps the student's map to factors; with `factor(f) = normalize(mean_c(f²))` over positions, the loss is
    `mean |factor(translator(s)) − factor(encoder(t))|` (the larger map average-pooled to the smaller).
    Weight 200 (RepDistiller `-b 200`). `forward(s [B, Cs, H, W], t [B, Ct, H', W']) -> []`.
    """

    continues_after_init = True   # the main stage uses it, its paraphraser frozen

    def __init__(self, student_channels: int, teacher_channels: int, rate: float = 0.5):
        super().__init__()
        factor = int(teacher_channels * rate)
        self.encoder = _encoder(teacher_channels, teacher_channels, factor, bn=False)
        self.decoder = _encoder(factor, factor, teacher_channels, bn=False, transposed=True)
        self.translator = _encoder(student_channels, student_channels, factor, bn=True)

    def init_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The paraphraser's reconstruction error of the teacher's map (the student plays no part)."""
        t = teacher.float()
        return F.mse_loss(self.decoder(self.encoder(t)).float(), t)

    @staticmethod
    def factor(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.float().pow(2).mean(1).flatten(1), dim=1)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f_t = self.encoder(teacher.to(student.dtype))
        f_s, f_t = match_spatial(self.translator(student), f_t)
        return (self.factor(f_s) - self.factor(f_t)).abs().mean()


class GradientATLoss(nn.Module):
    """Gradient-based attention transfer (Zagoruyko & Komodakis, ICLR 2017, sec. 3.2), the seed's variant: where
    each network's top-class score is sensitive to the input. The teacher's map (`models.input_gradient_map` of
    `∂z_c/∂x`, c its top class, cached once per view: `dump-teacher --layers input_gradient`) against the
    student's map of its own score for the same class c (double backpropagation: the loss's gradient flows
    through the student's input gradient): `mean((a_s − a_t)²)` over the batch and positions, the larger map
    average-pooled (and renormalised) to the smaller, as `at` does. Weight `--beta`, as `at`.
    `forward(student_map [B, H, W], teacher_map [B, H', W']) -> []`.
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(student.float()[:, None], teacher.float()[:, None])
        s, t = F.normalize(s.flatten(1), dim=1), F.normalize(t.flatten(1), dim=1)
        return (s - t).pow(2).mean()
