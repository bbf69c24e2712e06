"""Grad-CAM heatmaps (the `grad-cam` package) for hemispheres and bilateral models.

The library wants a model that returns one logits tensor and a list of target layers. Our
models return a dict of heads (`HeadLogits` returns the chosen heads' logits side by side), and
the bilateral hemispheres are frozen, so without help no graph would be built. Instead of making
the input require grad (which also works, but backpropagates through both hemispheres down to
the pixels), `gradcam` switches every parameter's requires_grad off for the call and lets the
target layers' outputs start the graph: the backward pass then runs only from the logits down
to the target layers, and the other hemisphere builds no graph at all. A target is a sum of
logits (one class per head), so "both heads together" is the sum of the fine and the coarse
head's top logits.

Target layers: ResNet-9 and its pyramid `res1` + `res2` (the residual blocks, as in the
study), ResNet-18/34 `layer4`, VGG-11 `features[-2]` (the last conv's ReLU). With several
layers the library min-max scales each layer's map and averages them. Layers of the two
hemispheres are never passed together: the library pairs activations with gradients by
order, and the backward order of two parallel branches is not the forward order.

`cam_maps` computes every heatmap kind of the analyses at once: one forward pass of the
bilateral model per batch (the hemisphere models are its own frozen hemispheres with their own
heads) and one backward pass per target, with the gradients of each layer taken by name, so
both hemispheres come from the same pass. Per layer it does what the library's GradCAM does
(channel weights = spatial mean of the gradients, ReLU, min-max scaling to the image size with
the library's `scale_cam_image`, then the mean over layers, scaled again), so its maps equal
`gradcam`'s (tests/test_analysis.py checks this) at a quarter of the passes.
"""
from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image, show_cam_on_image

# Heatmap kinds: the hemisphere models alone, and the bilateral model per head (or both heads
# summed), on both hemispheres' residual blocks together or on one hemisphere's.
CAM_KINDS = ("left_hemisphere", "right_hemisphere", "bilateral_fine", "bilateral_coarse",
             "bilateral_both", "bilateral_fine.left", "bilateral_fine.right",
             "bilateral_coarse.left", "bilateral_coarse.right",
             "bilateral_both.left", "bilateral_both.right")


def target_layers(backbone) -> list:
    if hasattr(backbone, "res1") and hasattr(backbone, "res2"):
        return [backbone.res1, backbone.res2]
    if hasattr(backbone, "layer4"):
        return [backbone.layer4]
    if hasattr(backbone, "features"):
        return [backbone.features[-2]]
    raise ValueError(f"no Grad-CAM target layers known for {type(backbone).__name__}")


class HeadLogits(torch.nn.Module):
    """model(x)[head] for the given heads, concatenated, as one tensor."""

    def __init__(self, model, heads):
        super().__init__()
        self.model, self.heads = model, tuple(heads)

    def forward(self, x):
        out = self.model(x)
        return torch.cat([out[h] for h in self.heads], 1)


class LogitSum:
    """Grad-CAM target: the sum of the given logits of one image's output row."""

    def __init__(self, indices):
        self.indices = list(indices)

    def __call__(self, output):
        return output[..., self.indices].sum(-1)


def n_classes(model, head) -> int:
    return model.heads[head][-1].out_features


def gradcam(model, layers, x, heads, classes, batch_size=64) -> np.ndarray:
    """Heatmaps (N, H, W) in [0, 1] for images x (N, C, H, W), normalised as the model expects.

    heads: names of the model's heads whose logits are summed; classes: (N, len(heads)) the
    target class of every image for each of those heads.
    """
    classes = torch.as_tensor(classes).reshape(len(x), len(heads)).cpu()
    offsets = torch.tensor(np.cumsum([0] + [n_classes(model, h) for h in heads[:-1]]))
    wrapper = HeadLogits(model, heads)
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    # registered before the library's own hooks, so they see an output that requires grad
    handles = [layer.register_forward_hook(_start_graph) for layer in layers]
    maps = []
    try:
        with torch.enable_grad(), GradCAM(model=wrapper, target_layers=list(layers)) as cam:
            for i in range(0, len(x), batch_size):
                xb, cb = x[i:i + batch_size], classes[i:i + batch_size] + offsets
                m = cam(input_tensor=xb, targets=[LogitSum(row.tolist()) for row in cb])
                if m is None:  # GradCAM.__exit__ swallows IndexErrors
                    raise RuntimeError("Grad-CAM failed (an IndexError inside the library)")
                maps.append(m)
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    return np.concatenate(maps).astype(np.float32)


def cam_maps(bil, left_head, right_head, x, pred: dict, batch_size: int = 64) -> dict:
    """Every CAM_KINDS heatmap (N, H, W) of images x, normalised as the models expect.

    bil: the bilateral model; left_head / right_head: the hemisphere models' own heads (their
    backbones are bil.left and bil.right); pred: the target class per image of "left" (the
    left hemisphere's fine head), "right" (the right's coarse head), "fine" and "coarse" (the
    bilateral heads), usually the predictions.
    """
    pred = {k: torch.as_tensor(v).cpu() for k, v in pred.items()}
    layers = {side: target_layers(getattr(bil, side)) for side in ("left", "right")}
    parts = []
    for i in range(0, len(x), batch_size):
        parts.append(_batch_maps(bil, left_head, right_head, x[i:i + batch_size], layers,
                                 {k: v[i:i + batch_size] for k, v in pred.items()}))
    maps = {k: np.concatenate([p[k] for p in parts]).astype(np.float32) for k in parts[0]}
    for t in ("fine", "coarse", "both"):
        maps[f"bilateral_{t}"] = combine(maps[f"bilateral_{t}.left"], maps[f"bilateral_{t}.right"])
    return {k: maps[k] for k in CAM_KINDS}


def _batch_maps(bil, left_head, right_head, xb, layers, pred) -> dict:
    acts = {}
    hooks = [layer.register_forward_hook(_keep(acts, (side, k)))
             for side, ls in layers.items() for k, layer in enumerate(ls)]
    mods = (bil, left_head, right_head)
    modes = [m.training for m in mods]
    trainable = [p for m in mods for p in m.parameters() if p.requires_grad]
    for p in trainable:  # the graph starts at the target layers (see the module's docstring)
        p.requires_grad_(False)
    try:
        for m in mods:
            m.eval()
        with torch.enable_grad():
            out = bil(xb, return_features=True)  # not left(x), right(x): a callosal model mixes them
            fl, fr = out["left"], out["right"]
            lh, rh = left_head(fl), right_head(fr)
            pick = lambda logits, cls: logits.gather(1, cls.to(logits.device)[:, None]).sum()  # noqa: E731
            targets = {  # each hemisphere head reaches only its own hemisphere's layers
                "hemisphere": pick(lh, pred["left"]) + pick(rh, pred["right"]),
                "bilateral_fine": pick(out["fine"], pred["fine"]),
                "bilateral_coarse": pick(out["coarse"], pred["coarse"]),
                "bilateral_both": pick(out["fine"], pred["fine"]) + pick(out["coarse"], pred["coarse"])}
            keys = list(acts)
            size = (xb.shape[-1], xb.shape[-2])
            maps = {}
            for t, loss in targets.items():
                grads = dict(zip(keys, torch.autograd.grad(loss, [acts[k] for k in keys],
                                                           retain_graph=True)))
                for side in layers:
                    name = f"{side}_hemisphere" if t == "hemisphere" else f"{t}.{side}"
                    maps[name] = _grad_cam([acts[k] for k in keys if k[0] == side],
                                           [grads[k] for k in keys if k[0] == side], size)
    finally:
        for h in hooks:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        for m, mode in zip(mods, modes):
            m.train(mode)
    return maps


def _keep(store, key):
    def hook(module, inputs, output):
        _start_graph(module, inputs, output)
        store[key] = output
    return hook


def _grad_cam(acts, grads, size) -> np.ndarray:
    """The library's GradCAM of several layers, from their activations and gradients."""
    per_layer = []
    for a, g in zip(acts, grads):
        a, g = a.detach().cpu().numpy(), g.cpu().numpy()
        w = np.mean(g, axis=(2, 3))
        cam = np.maximum((w[:, :, None, None] * a).sum(axis=1), 0)
        per_layer.append(scale_cam_image(cam, size)[:, None, :])
    return scale_cam_image(np.mean(np.maximum(np.concatenate(per_layer, axis=1), 0), axis=1))


def _start_graph(module, inputs, output):
    if not output.requires_grad:
        output.requires_grad_(True)


def combine(*maps) -> np.ndarray:
    """One map from several of the same images (e.g. both hemispheres): mean, rescaled to [0, 1]."""
    return scale_cam_image(np.mean(np.stack(maps), 0)).astype(np.float32)


def localisation(maps, frac: float = 0.5) -> np.ndarray:
    """Fraction of each map's pixels at or above `frac` of its peak: small = local, 1 = diffuse.

    A map with no positive value (Grad-CAM found no evidence, or a constant map that the
    library's min-max scaling turned into zeros) has no peak: NaN.
    """
    maps = np.asarray(maps, dtype=np.float64)
    flat = maps.reshape(len(maps), -1)
    peak = flat.max(1)
    area = (flat >= frac * peak[:, None]).mean(1)
    area[~(peak > 0)] = np.nan
    return area


def overlay(image_uint8_chw, heatmap) -> np.ndarray:
    """(H, W, 3) uint8: the heatmap in the jet colour map over the image (the library's overlay)."""
    img = image_uint8_chw.permute(1, 2, 0).cpu().numpy().astype(np.float32) / 255.0
    return show_cam_on_image(img, np.clip(heatmap, 0, 1), use_rgb=True)
