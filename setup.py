from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="atscale",
    version="0.1.0",
    description="Adversarial training of image classifiers at ImageNet scale: FFCV data, PGD in the loop, timm models",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["atscale", "atscale.*", "launch", "launch.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "ffcv>=1.0.2",
        "timm>=1.0.20",
        "submitit>=1.5",
        "deepspeed>=0.14",
        "scikit-learn>=1.2",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "pillow>=9.0",
        "torchmetrics>=1.0",
        "pycocotools>=2.0",
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["atscale=atscale.cli:main"]},
)
