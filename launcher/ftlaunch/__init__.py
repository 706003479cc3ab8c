"""ftlaunch: fine-tune causal LMs with LoRA/QLoRA, from one CPU to multi-GPU nodes.

The flow runs one way: detect -> plan -> render -> launch -> train -> export.
"""

__version__ = "0.1.0"
