"""Pluggable layers for the papers' architectures: smooth activations, Mixture BN, feature-denoising blocks."""
