"""The language half of the slide LLM: any local Hugging Face causal LM, plus LoRA.

Two ways to get a model, one code path afterwards:

* :func:`load_llm` loads a chat model from a local directory
  (``AutoModelForCausalLM.from_pretrained(dir, local_files_only=True)``), optionally in
  bf16 or 4-bit (bitsandbytes, CUDA only) and with gradient checkpointing: this is how a
  7B model is used.
* :func:`build_embedded_llm` builds the small Llama-architecture model that ships as
  the default (nothing can be downloaded). It starts from random weights and is trained
  by the language warm-up stage, whose output directory is then loaded with
  :func:`load_llm` like any other model.

:func:`add_lora` wraps a model with peft LoRA adapters (r=128, alpha=256 on every linear
layer by default, the Hepato-LLaVA setting).
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from slidevl.config import Config, setting
from slidevl.errors import InputError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLMLoadError(InputError):
    """A local language model cannot be loaded or configured as asked (its folder, dtype, LoRA settings)."""


@dataclass
class EmbeddedLMConfig(Config):
    """Size of the embedded default LLM (Llama architecture, tied input/output embeddings)."""

    hidden_size: int = setting(256, help="Embedded LM width.", flag="--lm-hidden", min=1)
    num_layers: int = setting(4, help="Embedded LM layers.", flag="--lm-layers", min=1)
    num_heads: int = setting(4, help="Embedded LM attention heads.", flag="--lm-heads", min=1)
    intermediate_size: int = setting(688, help="Embedded LM feed-forward width.", flag="--lm-ffn", min=1)
    max_positions: int = setting(2048, help="Longest sequence the embedded LM can read.", cli=False)


def build_embedded_llm(tokenizer: PreTrainedTokenizerBase, config: EmbeddedLMConfig | None = None) -> LlamaForCausalLM:
    """A randomly initialised small causal LM whose vocabulary is ``tokenizer``'s."""
    config = config or EmbeddedLMConfig()
    if config.hidden_size % config.num_heads:
        raise LLMLoadError(f"hidden_size={config.hidden_size} is not divisible by num_heads={config.num_heads}")
    hf_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(hf_config)


@dataclass
class LLMLoadOptions(Config):
    """Memory-saving switches for large models; the defaults suit the embedded LLM on CPU."""

    dtype: str = setting("float32", help="Weights dtype of the LLM: float32, bfloat16 or float16.", flag="--llm-dtype")
    load_in_4bit: bool = setting(False, help="Load the LLM in 4-bit (bitsandbytes, CUDA).")
    gradient_checkpointing: bool = setting(False, help="Trade compute for LLM activation memory.")

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise LLMLoadError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def load_llm(path: str | Path, options: LLMLoadOptions | None = None) -> PreTrainedModel:
    """Load a causal LM from a local directory, never touching the network."""
    options = options or LLMLoadOptions()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LLMLoadError(
            f"{path}: no config.json; pass the directory of a Hugging Face causal LM (or the output of "
            "`slidevl slidellm warmup` for the embedded default)"
        )
    kwargs: dict[str, Any] = {"dtype": options.torch_dtype, "local_files_only": True}
    if options.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
            raise LLMLoadError("4-bit loading needs the bitsandbytes package and a CUDA GPU; drop --load-in-4bit or install bitsandbytes")
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if options.dtype == "float32" else options.torch_dtype
        kwargs["device_map"] = {"": torch.cuda.current_device()}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True
        )
    try:
        with _no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise LLMLoadError(f"{path}: cannot load a causal LM ({exc})") from exc
    if options.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=options.gradient_checkpointing)
    if options.gradient_checkpointing:
        # Non-reentrant checkpointing lets gradients reach the visual tokens even though the
        # text embeddings of a frozen LLM do not require grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@dataclass
class LoraSettings(Config):
    """peft LoRA settings; ``target_modules="all-linear"`` adapts every linear layer but the output head."""

    r: int = setting(128, help="LoRA rank.", flag="--lora-r", min=1)
    alpha: int = setting(256, help="LoRA scaling alpha.", flag="--lora-alpha", min=1)
    dropout: float = setting(0.05, help="Dropout on the LoRA inputs.", flag="--lora-dropout")
    target_modules: str = setting("all-linear", help="'all-linear' or comma-separated module names.", flag="--lora-targets")

    def __post_init__(self) -> None:
        # Run configs written before this was one string hold a list of module names.
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = ",".join(self.target_modules)

    @property
    def modules(self) -> str | list[str]:
        """``target_modules`` as peft takes it: ``"all-linear"`` or a list of names."""
        if self.target_modules == "all-linear":
            return self.target_modules
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]


def add_lora(model: PreTrainedModel, settings: LoraSettings | None = None) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; only the adapters require grad afterwards."""
    settings = settings or LoraSettings()
    if settings.r < 1:
        raise LLMLoadError(f"LoRA rank must be >= 1, got {settings.r}")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    with _peft_probe_quiet():
        return get_peft_model(model, config)


def load_lora(model: PreTrainedModel, adapter_dir: str | Path, *, trainable: bool) -> PeftModel:
    """Attach adapters saved by ``PeftModel.save_pretrained`` (safetensors) to ``model``."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LLMLoadError(f"{adapter_dir}: no adapter_config.json; this is not a LoRA adapter folder")
    with _peft_probe_quiet():
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)


@contextlib.contextmanager
def _no_loading_bar() -> Iterator[None]:
    # transformers draws a tqdm bar for every model load: it would interleave with our rich
    # progress, and follow every `slidevl ask` answer on stderr. Scoped, so a caller's own
    # setting holds outside the load.
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _peft_probe_quiet() -> Iterator[None]:
    # peft probes `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
    # FutureWarning; nothing a user can act on, and `slidevl ask` printed it on every call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Stop gradients for every parameter of ``module`` and return it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
