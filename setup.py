from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("specmoe/_version.py").read_text(), version)

setup(
    name="specmoe",
    version=version["__version__"],
    description="Run Mixture-of-Experts LMs on GPUs too small to hold them: offloaded experts, "
    "a GPU expert cache and speculative prefetch.",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["specmoe", "specmoe.*"]),
    package_data={"specmoe.reference": ["checkpoint/*", "predictors/*/*"], "specmoe.kernels": ["configs/*.json"],
                  "specmoe.sim": ["calibration/*.json"]},
    python_requires=">=3.10",
    # Loose on purpose: the GPU machines ship torch 2.11 / transformers 5.17 / triton 3.6.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.17,<6",  # 5.17.0 is tested in .ci/run (tests marked transformers_floor)
        "accelerate>=1.0",
        "huggingface_hub>=0.24",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "numpy>=1.24",
    ],
    extras_require={
        "dev": ["pytest>=7", "triton>=3.0; platform_system == 'Linux'"],
        "gpu": ["triton>=3.0", "nvidia-ml-py>=12"],
    },
    entry_points={"console_scripts": ["specmoe=specmoe.cli:main"]},
)
