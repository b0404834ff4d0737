"""refusalscope: find the SAE latents that make a chat model refuse, and how they interact."""

__version__ = "0.1.0"
