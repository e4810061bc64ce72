"""Diffusers pipeline folders: the shared loading, prompt cache and LoRA roles (`base.py`), one file per family."""
