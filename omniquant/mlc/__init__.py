"""MLC-LLM and TVM deployment: MLC artifacts (:mod:`.artifacts`) and our own TVM build of Llama and Gemma 3 decoders.

:mod:`omniquant.mlc.tvm_decoder` needs ``apache-tvm`` (imported on use); :func:`build_tvm` reports
``skipped`` without it.
"""
from omniquant.mlc.artifacts import validate_mlc_chat_config, write_mlc_artifacts
from omniquant.mlc.build import TVM_PIN, build_tvm

__all__ = ["TVM_PIN", "build_tvm", "validate_mlc_chat_config", "write_mlc_artifacts"]
