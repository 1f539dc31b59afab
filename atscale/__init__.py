"""atscale: adversarial training at ImageNet scale. Importing the package is light (no torch, no timm), so the
``atscale`` command parses its arguments at once; ``import atscale.models`` registers the papers' model variants into
timm."""
