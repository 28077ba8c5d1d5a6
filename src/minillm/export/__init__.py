"""Export to other ecosystems: Hugging Face model directories (`hf`), ONNX (`onnx`) and GGUF files for
llama.cpp and Ollama (`gguf`)."""

from minillm.errors import ExportError
from minillm.export.hf import export_hf
from minillm.model.hf import hf_config, hf_family

__all__ = ["ExportError", "export_hf", "hf_config", "hf_family"]
