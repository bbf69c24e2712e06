"""The measures of the analyses: tensors in, numbers out. No models, files or figures here.

Outcome scenarios. Per test image, four things are right (1) or wrong (0): the left hemisphere
(L, fine), the right hemisphere (R, coarse), the bilateral fine head (F) and coarse head (C).
A scenario is named hemispheres-then-bilateral, "L1R0-F1C1"; the 4x4 table has the hemisphere
outcomes as rows and the bilateral outcomes as columns, all-right first.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

OUTCOMES = ("left", "right", "bilateral_fine", "bilateral_coarse")
HEMI_CODES = ("L1R1", "L1R0", "L0R1", "L0R0")
BILAT_CODES = ("F1C1", "F1C0", "F0C1", "F0C0")
SCENARIOS = tuple(f"{h}-{b}" for h in HEMI_CODES for b in BILAT_CODES)


# -------------------------------------------------------------------------------- outcomes

def correct(out: dict, fine: torch.Tensor, coarse: torch.Tensor) -> dict:
    """The four bool tensors of OUTCOMES from logits: left_logits (the left hemisphere's own
    fine head), right_logits (the right's coarse head), fine and coarse (the bilateral heads)."""
    return {"left": out["left_logits"].argmax(1) == fine,
            "right": out["right_logits"].argmax(1) == coarse,
            "bilateral_fine": out["fine"].argmax(1) == fine,
            "bilateral_coarse": out["coarse"].argmax(1) == coarse}


def scenario_index(right: dict) -> torch.Tensor:
    """Index into SCENARIOS of every image, from the four bool tensors of OUTCOMES."""
    L, R, Fc, Cc = (right[k].long() for k in OUTCOMES)
    hemi = (1 - L) * 2 + (1 - R)       # L1R1=0, L1R0=1, L0R1=2, L0R0=3
    bil = (1 - Fc) * 2 + (1 - Cc)
    return hemi * 4 + bil


def scenario_names(index: torch.Tensor) -> list[str]:
    return [SCENARIOS[int(s)] for s in index]


def scenario_table(index: torch.Tensor, margins: bool = False) -> pd.DataFrame:
    """Images per scenario: rows = hemisphere outcomes, columns = bilateral outcomes."""
    counts = torch.bincount(index, minlength=16).reshape(4, 4).numpy()
    t = pd.DataFrame(counts, index=pd.Index(HEMI_CODES, name="hemispheres"),
                     columns=pd.Index(BILAT_CODES, name="bilateral"))
    if margins:
        t["total"] = t.sum(axis=1)
        t.loc["total"] = t.sum(axis=0)
    return t


# ------------------------------------------------------------------------------ similarity

def same_label_pairs(labels: torch.Tensor, members: torch.Tensor | None = None,
                     max_pairs: int | None = None, generator=None):
    """(i, j), i < j, of the images among `members` (indices; default all) that share a label,
    and the number of such pairs before subsampling to max_pairs. Unsampled pairs come in
    class order; `shuffled` mixes them before anything cuts them further."""
    members = torch.arange(len(labels)) if members is None else torch.as_tensor(members)
    ii, jj = [], []
    lab = labels[members]
    for c in torch.unique(lab):
        idx = members[lab == c]
        if len(idx) >= 2:
            t = torch.triu_indices(len(idx), len(idx), 1)
            ii.append(idx[t[0]])
            jj.append(idx[t[1]])
    if not ii:
        e = torch.empty(0, dtype=torch.long)
        return e, e, 0
    i, j = torch.cat(ii), torch.cat(jj)
    total = len(i)
    if max_pairs is not None and total > max_pairs:
        keep = torch.randperm(total, generator=generator)[:max_pairs]
        i, j = i[keep], j[keep]
    return i, j, total


def shuffled(n: int, limit: int, generator) -> torch.Tensor:
    """The first `limit` of a seeded permutation of range(n): a cut that favours no class."""
    return torch.randperm(n, generator=generator)[:limit]


def pair_cosine(feats: torch.Tensor, i, j) -> torch.Tensor:
    f = F.normalize(feats.float(), dim=1)
    return (f[i] * f[j]).sum(1)


# ----------------------------------------------------------------------------- attribution

def head_contributions(weight: torch.Tensor, feats: torch.Tensor, n_left: int,
                       target: torch.Tensor | None = None, centre: torch.Tensor | None = None):
    """Signed contributions (left, right) per image of each half of [left | right] features
    to the target logit (default: the predicted class) of a linear head.

    Softmax ignores what every class shares, so the weights are centred over classes. The
    features are non-negative (ReLU then pooling), so an uncentred half always adds its
    image-independent mean too; `centre` (the features' training mean) removes it: the
    contribution is then what this image adds over the average training image."""
    w = weight.float()
    feats = feats.float().to(w.device)
    if target is None:
        target = (feats @ w.T).argmax(1)
    if centre is not None:
        feats = feats - centre.float().to(w.device)
    wc = (w - w.mean(0, keepdim=True))[target.to(w.device)]          # (N, D)
    contrib = wc * feats
    return contrib[:, :n_left].sum(1), contrib[:, n_left:].sum(1)


def left_share(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """|left| / (|left| + |right|) per image; NaN where both are 0."""
    total = left.abs() + right.abs()
    return torch.where(total > 0, left.abs() / total.clamp_min(1e-30), torch.full_like(total, float("nan")))


def head_attribution(weight, feats, n_left: int, target=None, centre=None) -> torch.Tensor:
    """Left share per image of the target logit; the right share is 1 minus it."""
    return left_share(*head_contributions(weight, feats, n_left, target, centre))


# ---------------------------------------------------------------------------------- probes

@dataclasses.dataclass
class Probe:
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, x):
        return ((x.float().to(self.mean.device) - self.mean) / self.std) @ self.weight + self.bias

    def accuracy(self, x, y) -> float:
        return (self.logits(x).argmax(1).cpu() == y.cpu()).float().mean().item()


def fit_probe(x, y, n_classes: int, l2: float = 1e-4, iters: int = 200) -> Probe:
    """Multinomial logistic regression on standardised features: full-batch L-BFGS on
    mean cross-entropy + l2 * |w|^2 (the bias is not penalised; scikit-learn's
    LogisticRegression with C = 1 / (2 n l2) minimises the same function)."""
    x = x.float()
    y = y.to(x.device)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], n_classes, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-8)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(mean, std, w.detach(), b.detach())


@dataclasses.dataclass
class PCA:
    """Projection on the first k principal axes of the data it was fitted on."""
    mean: torch.Tensor
    axes: torch.Tensor            # (D, k)

    def __call__(self, x):
        return (x.float().to(self.mean.device) - self.mean) @ self.axes


def fit_pca(x: torch.Tensor, k: int) -> PCA:
    x = x.double()
    if not 0 < k <= min(x.shape):
        raise ValueError(f"PCA to {k} dimensions needs 0 < k <= min{tuple(x.shape)}")
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    return PCA(mean.float(), vh[:k].T.float().contiguous())


def differential_specialisation(acc: dict) -> dict:
    """acc[(side, level)] -> gaps and their mean; > 0 when each hemisphere is better at its own
    level (left: fine, right: coarse) than the other hemisphere is."""
    gap_fine = acc[("left", "fine")] - acc[("right", "fine")]
    gap_coarse = acc[("right", "coarse")] - acc[("left", "coarse")]
    return {"gap_fine": gap_fine, "gap_coarse": gap_coarse,
            "differential_specialisation": (gap_fine + gap_coarse) / 2}


# ------------------------------------------------------------------------------ statistics

def spread(values, prefix: str) -> dict:
    """Mean, sample std, quartiles and count of the finite values, as {prefix.stat: float}."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {}
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {f"{prefix}.mean": float(v.mean()), f"{prefix}.std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            f"{prefix}.median": float(med), f"{prefix}.q25": float(q25), f"{prefix}.q75": float(q75),
            f"{prefix}.n": float(len(v))}
