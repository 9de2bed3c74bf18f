"""omniquant: OmniQuant (LWC + LET, block-wise calibration) and baselines for LLM quantization."""
from omniquant.methods import METHODS, quantize_
from omniquant.perplexity import perplexity
from omniquant.quantizer import QuantSpec, fake_quantize
from omniquant.setting import QuantSetting

__version__ = "0.1.0"
__all__ = ["METHODS", "QuantSetting", "QuantSpec", "fake_quantize", "perplexity", "quantize_"]
