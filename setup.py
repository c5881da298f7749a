"""Package list for the two source roots.

`sage` is a PEP 420 namespace rooted at src/sage; `sage.services` maps to services/.
pyproject.toml cannot express a generated list across two roots, so it lives here; both
`pip install .` and `pip install -e .` use it.
"""

from setuptools import find_namespace_packages, setup

LIB = [
    "sage",
    *("sage." + p for p in find_namespace_packages("src/sage", exclude=["*__pycache__*"])),
]
SERVICES = [
    "sage.services",
    *("sage.services." + p for p in find_namespace_packages("services", exclude=["*__pycache__*"])),
]

setup(packages=LIB + SERVICES)
