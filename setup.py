"""hybrid_d2: hybrid CNN-Transformer backbones for Detectron2.

Prerequisites, installed separately (see README): torch and torchvision, and Detectron2, which is
not on PyPI under its own name (`make install` installs both; users with internet access can
build Detectron2 from its repository instead).
"""
from setuptools import find_packages, setup

setup(
    name="hybrid_d2",
    version="0.1.0",
    description="DMFormer, DilateFormer, DualFormer, MixFormer and Dynamic Mobile-Former for Detectron2",
    packages=find_packages(include=["hybrid_d2", "hybrid_d2.*"]),
    python_requires=">=3.10",
    install_requires=[
        "numpy<2",
        "timm>=1.0",
        "fvcore",
        "pycocotools>=2.0.2",
        "lvis",
        "opencv-python-headless",
        "tqdm",
        "matplotlib",
    ],
)
