"""An inference replica: one engine (vLLM or TensorRT-LLM) serving one model in one pool."""
