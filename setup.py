"""Packaging for xception_mx: the Xception classifier (Chollet, CVPR 2017) on MXNet Gluon."""
from setuptools import find_packages, setup

CORE = [
    # mxnet 1.9.1 uses np.bool, removed in numpy 1.24: keep numpy below it.
    "numpy>=1.21,<1.24",
    "gluoncv==0.10.5.post0",
    # headless: training servers have no display libraries; 4.8 is the last line built against numpy<1.24.
    "opencv-python-headless>=4.5,<4.9",
    "pyyaml>=5.4",
    "pillow>=9",  # im2rec_tools verify reads image headers with it
    "tqdm>=4.60",
    "matplotlib>=3.5,<3.11",
]

# Reading timm (.safetensors) and Keras (.h5) weights; versions that keep numpy<1.24.
CONVERT = ["h5py>=3.6,<3.12", "safetensors>=0.4"]

setup(
    name="xception_mx",
    version="0.1.0",
    description="Train, resume, export and score the paper-exact Xception on MXNet Gluon",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["xception_mx", "xception_mx.*", "im2rec_tools", "im2rec_tools.*"]),
    install_requires=["mxnet==1.9.1"] + CORE,
    extras_require={
        # GPU users: `pip install mxnet-cu112==1.9.1` first, then `pip install --no-deps -e .` and the CORE list;
        # the README gives the exact commands. The extra records the pin.
        "gpu": ["mxnet-cu112==1.9.1"],
        "test": [
            "pytest>=7",
            # scikit-learn ships the 8x8 digits used by the demo; <1.8 keeps it on numpy<1.24.
            "scikit-learn>=1.2,<1.8",
            *CONVERT,
        ],
        "convert": CONVERT,
        # Build against the installed mxnet: scripts/install_horovod.sh .venv/bin/python (README, Distributed).
        "horovod": ["horovod==0.28.1"],
        "demo": ["scikit-learn>=1.2,<1.8"],
    },
    entry_points={
        "console_scripts": [
            "im2rec-tools=im2rec_tools.__main__:main",
            "train-xception=xception_mx.cli:train_main",
            "xception-score=xception_mx.cli:score_main",
            "xception-convert=xception_mx.convert:main",
        ],
    },
)
