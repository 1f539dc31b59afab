"""Pre-processing defenses (a layer above attacks and models): the defended model P -> classifier, the adversarial
transformation, building and exporting them. JATP / JATP' and its baselines (Zhou et al.), ARN (Zhou et al. 2021) and
the adversarial transformation (Xiao & Zheng 2020); see ``../shared/papers/``."""
from atscale.defenses.build import build_model, build_preprocessor, preprocessor_spec
from atscale.defenses.model import DefendedModel
from atscale.defenses.transform import AdversarialTransform

__all__ = ["AdversarialTransform", "DefendedModel", "build_model", "build_preprocessor", "preprocessor_spec"]
