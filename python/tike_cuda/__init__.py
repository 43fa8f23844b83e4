"""tike_cuda: the Top-k Importance-weighted KL Estimator (TIKE) as fused CPU/CUDA kernels."""
