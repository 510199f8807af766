"""The environment the project installs: one MXNet build, one OpenCV build, dependencies that agree (pip check), and
one line naming what to install when MXNet or OpenCV's system library is missing (xception_mx/installed.py). The
wheel's metadata comes from pyproject.toml alone, through the setup.py shim too."""
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata

import pytest

from helpers import ROOT
from xception_mx import installed
from xception_mx.errors import RunFailed


def _distributions_providing(top_level: str) -> list[str]:
    """Installed distributions that ship ``top_level/__init__.py``."""
    wanted = f"{top_level}/__init__.py"
    return sorted((d.metadata["Name"] or "").lower() for d in metadata.distributions()
                  if any(str(f) == wanted for f in (d.files or ())))


def test_the_environment_holds_one_mxnet_one_opencv_and_pip_check_passes():
    assert installed.mxnet_builds() == ["mxnet 1.9.1"]
    installed.check_one_mxnet()
    assert _distributions_providing("cv2") == ["opencv-python"], "a second OpenCV build shares the cv2 folder"
    assert installed.import_cv2().__version__.startswith("4.")
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_mxnet_builds_are_refused_in_one_line_naming_both():
    with pytest.raises(RunFailed) as err:
        installed.check_one_mxnet(["mxnet 1.9.1", "mxnet-cu112 1.9.1"])
    line = str(err.value)
    assert "\n" not in line and "mxnet 1.9.1, mxnet-cu112 1.9.1" in line
    assert "pip uninstall -y mxnet mxnet-cu112" in line and "xception_mx[gpu]" in line


def test_an_opencv_without_libgl_or_missing_is_one_line_naming_what_to_install(tmp_path, monkeypatch):
    fake = tmp_path / "cv2"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise ImportError("libGL.so.1: cannot open shared object file: No such file '
                                      'or directory")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cv2", raising=False)
    with pytest.raises(RunFailed) as err:
        installed.import_cv2()
    assert "libGL.so.1" in str(err.value) and "apt-get install -y libgl1" in str(err.value)
    assert "opencv-python-headless" in str(err.value)
    monkeypatch.setitem(sys.modules, "cv2", None)  # what Python does for a module that is not installed
    with pytest.raises(RunFailed, match="is not installed .*pip install 'opencv-python<4.12'"):
        installed.import_cv2()


def test_a_missing_mxnet_is_named_with_the_extra_to_install(monkeypatch):
    exc = ModuleNotFoundError("No module named 'mxnet'", name="mxnet")
    assert "is installed but does not import" in installed.missing_module_line(exc)
    monkeypatch.setattr(installed, "mxnet_builds", lambda: [])
    assert installed.missing_module_line(exc) == f"MXNet is not installed: {installed.INSTALL_MXNET}"
    assert installed.missing_module_line(ModuleNotFoundError("x", name="yaml")) is None


def _requires(wheel: str) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return [line.split(": ", 1)[1] for line in zf.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist: ")]


def test_the_wheel_takes_its_metadata_from_pyproject_with_one_opencv_and_mxnet_per_extra(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    for package in ("xception_mx", "im2rec_tools"):
        shutil.copytree(os.path.join(ROOT, package), src / package, ignore=shutil.ignore_patterns("__pycache__"))
    setup_text = (src / "setup.py").read_text()
    assert "setup()" in setup_text and "name=" not in setup_text, "setup.py must stay a shim: metadata in pyproject"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("xception_mx-*.whl")
    requires = _requires(str(wheel))
    core = [r for r in requires if "extra ==" not in r]
    assert not [r for r in core if r.startswith("mxnet")], "MXNet comes from the cpu or gpu extra only"
    assert [r for r in requires if "opencv" in r] == ["opencv-python<4.12,>=4.5"]
    assert 'mxnet==1.9.1; extra == "cpu"' in requires and 'mxnet-cu112==1.9.1; extra == "gpu"' in requires
    assert [r for r in requires if r.startswith("mxnet")] == ['mxnet==1.9.1; extra == "cpu"',
                                                           'mxnet-cu112==1.9.1; extra == "gpu"']


def _run_with(folder, files: dict, *argv: str) -> subprocess.CompletedProcess:
    """Run a console script in ``folder`` with ``files`` (relative path -> text) there, first on its PYTHONPATH."""
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    env = dict(os.environ, PYTHONPATH=str(folder))
    script = os.path.join(os.path.dirname(sys.executable), argv[0])
    return subprocess.run([script, *argv[1:]], cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_the_commands_say_in_one_line_what_to_install(tmp_path):
    no_libgl = {"cv2/__init__.py": 'raise ImportError("libGL.so.1: cannot open shared object file")\n'}
    result = _run_with(tmp_path / "a", no_libgl, "im2rec-tools", "demo-digits", "digits")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "im2rec-tools demo-digits: error: OpenCV (cv2) cannot load: libGL.so.1" in result.stderr
    assert not list(tmp_path.glob("a/digits/*.rec"))
    trainer_and_scorer = "import xception_mx.train, xception_mx.evaluate, xception_mx.inference, xception_mx.deploy"
    loaded = subprocess.run([sys.executable, "-c", trainer_and_scorer], cwd=tmp_path / "a", capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(tmp_path / "a")))
    assert loaded.returncode == 0, "training and scoring must not need cv2: " + loaded.stderr[-1500:]

    no_mxnet = {"mxnet/__init__.py": 'raise ModuleNotFoundError("No module named \'mxnet\'", name="mxnet")\n'}
    result = _run_with(tmp_path / "b", no_mxnet, "xception-score", "--model-prefix", "x", "--epoch", "1", "--rec", "y")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "pip install 'xception_mx[cpu]'" in result.stderr

    second_build = {"mxnet_cu112-1.9.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: mxnet-cu112\n"
                                                           "Version: 1.9.1\n"}
    result = _run_with(tmp_path / "c", second_build, "train-xception", "--data-dir", "data")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "2 MXNet builds are installed (mxnet 1.9.1, mxnet-cu112 1.9.1)" in result.stderr
