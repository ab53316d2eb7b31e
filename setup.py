"""Build script for isnet-fast."""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']',
                    (HERE / "isnet_fast" / "__init__.py").read_text(encoding="utf-8"), re.M).group(1)

DEMO = ["scikit-learn", "matplotlib", "tqdm", "pillow"]
LIGHTNING = ["lightning"]

setup(
    name="isnet-fast",
    version=VERSION,
    description="Fused Triton kernels for ISNet's LRP block and a drop-in IsDenseFast.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=["isnet_fast", "isnet_fast.engine", "isnet_fast.engine.densenet", "isnet_fast.engine.resnet",
              "isnet_fast.models", "isnet_fast.kernels"],
    package_dir={"isnet_fast": "isnet_fast", "isnet_fast.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.6",  # torch.library.triton_op
        "triton>=3.2; platform_system=='Linux'",
        "numpy",  # the CLI's data and explain modules; no upper bound (the kernels need none)
    ],
    extras_require={
        # the test extra brings the optional dependencies too, so CI tests what depends on them
        "test": ["pytest", "pytest-benchmark"] + DEMO + LIGHTNING,
        "torchvision": ["torchvision"],
        "demo": DEMO,
        "lightning": LIGHTNING,
    },
    entry_points={"console_scripts": ["isnet-fast = isnet_fast.cli:main"]},
)
