"""Quantization: the asymmetric round-to-nearest grid (:mod:`.rtn`), GPTQ (:mod:`.gptq`: one class owning a layer
input's Hessian and the column loop) and the one Hessian collector (:mod:`.hessian`)."""
