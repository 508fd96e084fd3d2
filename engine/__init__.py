"""DeepSpeed-driven training and evaluation loop; imported as adarec.engine."""
