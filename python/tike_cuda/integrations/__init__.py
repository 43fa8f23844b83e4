"""Adapters of tike_cuda to RL trainers. Each submodule imports its trainer library only when
it is itself imported, so ``import tike_cuda`` never needs them:

    from tike_cuda.integrations.trl import TikeGRPOConfig, TikeGRPOTrainer   # needs .[trl]
    # verl: nothing to import; the [verl] extra registers a verl plugin, and
    # ``actor_rollout_ref.actor.kl_loss_type=tike`` switches it on (docs/verl.md)
"""
