"""atscale: adversarial training at ImageNet scale. Importing it registers the papers' model variants into timm."""
from atscale.models import registry as _registry  # noqa: F401
