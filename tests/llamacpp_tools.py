"""llama.cpp from PyPI for the tests: its converter scripts (CI) and a built ``llama-cpp-python`` (opt-in).

Both come from the one source distribution ``llama-cpp-python==0.3.36`` (PyPI has no wheel of it), kept in
``<lorakit cache>/llamacpp/``:

- ``converter-0.3.36/``: ``convert_lora_to_gguf.py``, ``convert_hf_to_gguf.py``, ``conversion/`` and
  ``gguf-py/`` out of the sdist's ``vendor/llama.cpp/`` (pure Python; nothing is built) — what
  tests/test_gguf.py compares lorakit's export with;
- ``wheels/llama_cpp_python-0.3.36-*.whl``: the sdist compiled once (cmake + gcc, ~30 min on two busy
  cores; on x86 a portable AVX2 build, see ``wheel``), then installed with ``--no-deps`` into the running
  interpreter — what tests/test_llamacpp.py runs.

``python tests/llamacpp_tools.py install`` (``make test-llamacpp``) builds the wheel if there is none and
installs it. Every directory appears atomically (extracted beside its final place, then renamed).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
_VENDOR = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
_CONVERTER_MEMBERS = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def cache() -> Path:
    from lorakit.train.defaults import cache_dir

    return cache_dir() / "llamacpp"


def sdist() -> Path:
    """The sdist tarball, downloaded from PyPI with pip on first use."""
    target = cache() / "sdist" / SDIST
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--disable-pip-version-check", "-d", str(target.parent), f"llama-cpp-python=={VERSION}"],
                       check=True, capture_output=True)
    return target


def converter_dir() -> Path:
    """Directory holding llama.cpp's vendored ``convert_lora_to_gguf.py`` and what it imports."""
    final = cache() / f"converter-{VERSION}"
    if (final / "convert_lora_to_gguf.py").is_file():
        return final
    tarball = sdist()
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        with tarfile.open(tarball) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(_VENDOR)
                       and m.name[len(_VENDOR):].startswith(_CONVERTER_MEMBERS)]
            for member in members:
                member.name = member.name[len(_VENDOR):]
            archive.extractall(staging, members=members, filter="data")
        staging.rename(final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (final / "convert_lora_to_gguf.py").is_file():
            raise
    return final


def run_converter(adapter_dir: Path, base_dir: Path, output: Path, outtype: str) -> None:
    """llama.cpp's own PEFT → GGUF conversion of ``adapter_dir`` (offline: ``--base`` has the config)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, str(converter_dir() / "convert_lora_to_gguf.py"), "--base",
                             str(base_dir), "--outfile", str(output), "--outtype", outtype, str(adapter_dir)],
                            env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"convert_lora_to_gguf.py failed ({result.returncode}):\n{result.stderr[-3000:]}")


def wheel() -> Path:
    """The built ``llama-cpp-python`` wheel, compiling the sdist once if there is none."""
    wheels = cache() / "wheels"
    found = sorted(wheels.glob(f"llama_cpp_python-{VERSION}-*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"building llama-cpp-python {VERSION} from source into {wheels} (~30 min on two cores)", flush=True)
    env = dict(os.environ)
    if platform.machine().lower() in ("x86_64", "amd64"):
        # A portable AVX2 build: -march=native (llama.cpp's default) enables AMX / AVX-512 kernels that die
        # with SIGILL on VMs whose CPUID advertises them (seen on the lorakit machines, firecracker kernel).
        # LLAVA_BUILD=OFF skips the multimodal library (mtmd), which the tests never load (it is imported
        # lazily by llama_cpp's vision chat handlers only) and which is a good part of the compile time.
        env.setdefault("CMAKE_ARGS", "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
                                     " -DLLAVA_BUILD=OFF")
    subprocess.run(["nice", "-n", "15", sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "--disable-pip-version-check", "-w", str(wheels), str(sdist())], check=True, env=env)
    return sorted(wheels.glob(f"llama_cpp_python-{VERSION}-*.whl"))[-1]


def install() -> None:
    """Build (if needed) and install ``llama-cpp-python`` into this interpreter, without dependencies."""
    try:
        import llama_cpp

        if llama_cpp.__version__ == VERSION:
            return
    except ImportError:
        pass
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
                    str(wheel())], check=True)


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python tests/llamacpp_tools.py install")
    install()
