"""Install adarec as one import namespace.

kernels/, engine/ and profiling/ live at the top level of the repository (one folder per kind of
work) but are imported as adarec.kernels, adarec.engine and adarec.profiling via package_dir.
Nothing here builds CUDA code: the native extension arrives with csrc/ and is optional.
"""

from setuptools import setup

PACKAGES = {
    "adarec": "adarec",
    "adarec.data": "adarec/data",
    "adarec.models": "adarec/models",
    "adarec.kernels": "kernels",
    "adarec.engine": "engine",
    "adarec.profiling": "profiling",
}

setup(
    name="adarec",
    version="0.1.0",
    description="Training engine for diffusion-augmented sequential recommendation (ADARec)",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    install_requires=[
        # The CPU quick start pins torch==2.13.0 on the command line so that this range does
        # not pull a multi-GB CUDA build; GPU machines bring their own torch.
        "torch>=2.4",
        "triton>=3.0",
        "deepspeed>=0.15",
        "numpy>=1.24",
        "faiss-cpu>=1.8",
        "nvtx>=0.2.10",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
    ],
    extras_require={"dev": ["pytest>=7.4", "ruff>=0.5"]},
    entry_points={"console_scripts": ["adarec=adarec.cli:main"]},
)
