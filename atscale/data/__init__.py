"""FFCV datasets: sources -> .beton writers -> device loaders."""
from atscale.data.loaders import DeviceLoader, make_loader
from atscale.errors import DatasetError
from atscale.data.write import build_cifar10, build_digits, build_imagefolder, ensure_dataset, read_meta

__all__ = ["DeviceLoader", "make_loader", "DatasetError", "build_cifar10", "build_digits", "build_imagefolder",
           "ensure_dataset", "read_meta"]
