"""The conventional input pipeline the project is compared with (the original's), and ours."""
from __future__ import annotations

import torch

from .. import data


class PILImages(torch.utils.data.Dataset):
    """The original's input pipeline: like torchvision's CIFAR100, an HWC uint8 array that is
    turned into a PIL image per item and passed through the transforms. Built from the split in
    memory, so nothing is downloaded."""

    def __init__(self, split: data.Split, transform=None):
        # a plain Dataset, as torchvision's VisionDataset is one: importing torchvision.datasets
        # costs 1.5 s of every command's start (it loads torch._dynamo), for one attribute
        self.transform = transform
        self.data = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.fine, self.coarse = split.fine.tolist(), split.coarse.tolist()

    def __len__(self):
        return len(self.fine)

    def __getitem__(self, i):
        from PIL import Image
        img = Image.fromarray(self.data[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.fine[i], self.coarse[i]


def conventional_transform(name):
    from torchvision import transforms as T
    mean, std = data.STATS[name]
    return T.Compose([T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(mean, std)])


def conventional_loader(split, batch, num_workers, device):
    ds = PILImages(split, conventional_transform(split.name))
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                       num_workers=num_workers, persistent_workers=num_workers > 0,
                                       pin_memory=device.type == "cuda")


def to_device(batches, device):
    for x, fine, coarse in batches:
        nb = device.type == "cuda"
        yield {"x": x.to(device, non_blocking=nb), "fine": fine.to(device, non_blocking=nb),
               "coarse": coarse.to(device, non_blocking=nb)}


def project_loader(split, batch, device, channels_last, seed=0):
    return data.DeviceLoader(split, batch, device=device, shuffle=True, augment=True, drop_last=True,
                             seed=seed, channels_last=channels_last)
