"""Export to other ecosystems: Hugging Face model directories (`hf`)."""

from minillm.export.hf import ExportError, export_hf, hf_config, hf_family

__all__ = ["ExportError", "export_hf", "hf_config", "hf_family"]
