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
"""
from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image, show_cam_on_image


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
