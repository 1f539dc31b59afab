"""timm models with normalization inside."""
from atscale.models import convstem, registry, vgg_small  # noqa: F401  (register the papers' variants into timm)
from atscale.models.factory import ModelError, build_from_config, create_model
from atscale.models.normalize import Normalize, NormalizedModel

__all__ = ["ModelError", "build_from_config", "create_model", "Normalize", "NormalizedModel"]
