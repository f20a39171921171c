from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [line.strip() for line in (here / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "-"))]

setup(
    name="stellarbyte",
    version="0.1.0",
    description="A readable PyTorch LLM training framework: Llama-compatible models, pretraining and SFT from YAML",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["model", "model.*", "utils", "utils.*"]),
    install_requires=requirements,
)
