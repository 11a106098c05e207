import glob

from setuptools import find_packages, setup

setup(
    name="kitspipe",
    version="0.1.0",
    description="nnU-Net-style pipeline for kidney and kidney-tumour segmentation with a dual-resolution 3D U-Net",
    packages=find_packages(include=["kitspipe", "kitspipe.*"]),
    # Presets live in the top-level plans/ folder, where users look for them; a non-editable
    # install copies them to <prefix>/share/kitspipe/plans (see kitspipe.plans.preset_folder).
    data_files=[("share/kitspipe/plans", sorted(glob.glob("plans/*.json")))],
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by the Makefile (TORCH=...) so the CPU build is chosen by default;
        # a plain requirement here would let pip pull a multi-GB CUDA build.
        "torch>=2.4",  # torch.is_autocast_enabled(device_type)
        "batchgenerators>=0.25",
        "SimpleITK>=2.3",
        "nibabel>=5.0",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-image>=0.21",
        "pandas>=2.0",
        "matplotlib>=3.7",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"],
        "bench": ["nnunetv2==2.8.1"],  # pulls its own torch: see `make bench-nnunet`
    },
    entry_points={"console_scripts": ["kitspipe=kitspipe.cli:main"]},
)
