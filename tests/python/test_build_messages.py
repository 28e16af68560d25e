"""A build without one of the system packages it needs stops with a message naming the package.

Each case configures the project with CMake (as `pip install .` does) with one package hidden
(CMAKE_DISABLE_FIND_PACKAGE_<name>) and checks the error names the Debian package to install.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CMAKE = os.path.join(os.path.dirname(sys.executable), "cmake")

CASES = [
    ("nlohmann_json", ["-DBUILD_TESTING=OFF", "-DARROWQUANT_PYTHON=OFF"], "nlohmann-json3-dev"),
    ("Eigen3", ["-DBUILD_TESTING=OFF", "-DARROWQUANT_PYTHON=OFF"], "libeigen3-dev"),
    ("GTest", ["-DBUILD_TESTING=ON", "-DARROWQUANT_PYTHON=OFF"], "libgtest-dev"),
    # the extension build (scikit-build sets SKBUILD): Python's headers
    ("Python", ["-DBUILD_TESTING=OFF", "-DARROWQUANT_PYTHON=ON", "-DSKBUILD=ON"], "python3-dev"),
]


@pytest.mark.skipif(not os.path.exists(CMAKE), reason="cmake is not installed next to this Python")
@pytest.mark.parametrize("package,flags,debian", CASES, ids=[c[0] for c in CASES])
def test_missing_system_package_is_named(tmp_path, package, flags, debian):
    cmd = [CMAKE, "-S", ROOT, "-B", str(tmp_path), f"-DPython_EXECUTABLE={sys.executable}",
           f"-DCMAKE_DISABLE_FIND_PACKAGE_{package}=ON", *flags]
    ninja = os.path.join(os.path.dirname(sys.executable), "ninja")
    if os.path.exists(ninja):
        cmd += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, f"configuring without {package} succeeded:\n{r.stdout}"
    message = " ".join(r.stderr.split())  # CMake wraps its messages
    assert f"apt-get install {debian}" in message, r.stderr


def test_numpy_2_is_declared():
    # pyarrow 26 cannot be imported with numpy 1.x: the package must not allow it
    from importlib.metadata import requires
    reqs = [r.replace(" ", "") for r in requires("arrow_quant_v2") or []]
    assert "numpy>=2" in reqs, reqs
    import numpy
    assert int(numpy.__version__.split(".")[0]) >= 2
