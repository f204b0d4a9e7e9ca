"""lorakit: LoRA and QLoRA fine-tuning in PEFT's file format."""

__version__ = "0.1.0"
