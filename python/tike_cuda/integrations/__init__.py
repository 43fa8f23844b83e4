"""Adapters of tike_cuda to RL trainers. Each submodule imports its trainer library only when
it is itself imported, so ``import tike_cuda`` never needs them:

    from tike_cuda.integrations.trl import TikeGRPOConfig, TikeGRPOTrainer   # needs .[trl]
"""
