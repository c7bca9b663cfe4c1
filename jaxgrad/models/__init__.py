"""Flax NNX models over Hugging Face (or GGUF) weights, with LoRA adapters: the Llama family
(Llama, Mistral, Qwen2), T5, GPT-2, GPT-NeoX and Gemma 3 (``jaxgrad.models.hub.FAMILIES``; each
family's module is imported when a checkpoint of it is loaded)."""

from jaxgrad.models.gguf import describe_gguf_source, gguf_source, gguf_to_hf
from jaxgrad.models.hub import build_model, config_from_hf, load_pretrained, save_pretrained
from jaxgrad.models.llama import LlamaConfig, LlamaForCausalLM
from jaxgrad.models.lora import (LoraConfig, apply_lora, lora_state, merge_lora, num_params,
                                 split_lora, trainable_summary)
from jaxgrad.models.peft import load_peft_adapter, save_peft_adapter
from jaxgrad.models.t5 import T5Config, T5ForConditionalGeneration, shift_right

__all__ = [
    "LlamaConfig", "LlamaForCausalLM", "LoraConfig", "T5Config", "T5ForConditionalGeneration",
    "apply_lora", "build_model", "config_from_hf", "describe_gguf_source", "gguf_source",
    "gguf_to_hf", "load_peft_adapter", "load_pretrained",
    "lora_state", "merge_lora", "num_params", "save_peft_adapter", "save_pretrained", "shift_right", "split_lora",
    "trainable_summary",
]
