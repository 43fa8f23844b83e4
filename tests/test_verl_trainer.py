"""tike_cuda's verl plugin under verl's v1 trainer: a local Ray cluster, TransferQueue, a
worker group with an actor and a reference colocated in one CPU worker process (as the
trainer's ``_setup`` builds it), and the trainer's own ``_compute_old_log_prob``,
``_compute_ref_log_prob``, ``_compute_advantage`` and ``_update_actor`` on synthetic rollouts
put into TransferQueue in place of a rollout.

Checked: what each pass stores survives TransferQueue (shapes, dtypes), the KL the update
logs is tike_cuda's op on the stored data and the policy's logits, and with zero advantages
(equal rewards in every GRPO group) a few updates lower it.
"""
import pytest

import _verl_helpers as H

H.use_cpu_platform()

import ray  # noqa: E402
import torch  # noqa: E402
import transfer_queue as tq  # noqa: E402
from transfer_queue import KVBatchMeta  # noqa: E402

from tike_cuda.integrations import verl as tike_verl  # noqa: E402
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup  # noqa: E402
from verl.single_controller.ray.base import create_colocated_worker_cls  # noqa: E402
from verl.trainer.ppo.v1 import get_trainer_cls  # noqa: E402
from verl.workers.engine_workers import ActorRolloutRefWorker  # noqa: E402

from test_verl_workers import K, expected_kl  # noqa: E402

# thread: a hang inside Ray's C++ (e.g. waiting for resources) ignores SIGALRM
pytestmark = pytest.mark.timeout(300, method="thread")

GROUP = 2  # rollout.n: responses per prompt


# TransferQueue: its controller and one storage unit take a logical CPU each
TQ = "transfer_queue.backend.SimpleStorage.num_data_storage_units=1"


@pytest.fixture(scope="module")
def cluster():
    # 4 logical CPUs: TransferQueue's 2, the worker process 1, one spare
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        tq.init(H.compose("unused", TQ).transfer_queue)
        yield
    finally:
        tq.close()
        ray.shutdown()


@pytest.fixture(scope="module")
def trainer(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("verl_trainer_models")
    actor_path = H.make_tiny_qwen2(root / "actor", seed=10)
    ref_path = H.make_tiny_qwen2(root / "ref", seed=11, like=actor_path, noise=0.05)
    overrides = ["algorithm.adv_estimator=grpo", f"actor_rollout_ref.rollout.n={GROUP}",
                 "actor_rollout_ref.actor.ppo_mini_batch_size=3",  # × n = the 6 samples
                 "actor_rollout_ref.actor.optim.lr=0.005", "actor_rollout_ref.actor.kl_loss_coef=1.0",
                 f"actor_rollout_ref.actor.kl_loss_type=tike_bucket:{K}",
                 "data.train_batch_size=3", "transfer_queue.enable=true", TQ,
                 "actor_rollout_ref.rollout.calculate_log_probs=false"]  # no rollout engine here
    config = H.compose(actor_path, *overrides)
    # the trainer main_ppo picks (sync by default); the plugin's start-time checks run here
    trainer = get_trainer_cls(config.trainer.v1.trainer_mode)(config)
    # what PPOTrainer._setup builds for Role.Actor + Role.RefPolicy in one resource pool
    # (the reference's model is its own checkpoint: a policy that differs from it)
    worker = ray.remote(ActorRolloutRefWorker)
    classes = {"actor": RayClassWithInitArgs(cls=worker, config=config.actor_rollout_ref,
                                             role="actor"),
               "ref": RayClassWithInitArgs(cls=worker,
                                           config=H.compose(ref_path, *overrides).actor_rollout_ref,
                                           role="ref")}
    pool = RayResourcePool(process_on_nodes=[1], use_gpu=False, max_colocate_count=1)
    group = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=create_colocated_worker_cls(classes),
                           device_name="cpu")
    groups = group.spawn(prefix_set=classes.keys())
    trainer.actor_rollout_wg, trainer.ref_policy_wg = groups["actor"], groups["ref"]
    trainer.actor_rollout_wg.init_model()
    trainer.ref_policy_wg.init_model()
    trainer.ref_in_actor, trainer.distillation_config = False, None
    return trainer, actor_path, ref_path


def put_rollouts(samples, partition="train"):
    """What the v1 agent loop puts into TransferQueue, and the batch the replay buffer hands out."""
    keys = [f"{s['uid']}_{i % GROUP}_0" for i, s in enumerate(samples)]  # {uid}_{session}_{turn}
    tags = [{"status": "success", "prompt_len": len(s["prompts"]),
             "response_len": len(s["responses"]),
             "seq_len": len(s["prompts"]) + len(s["responses"])} for s in samples]
    fields = H.to_tensordict(samples)
    from tensordict import NonTensorStack
    fields["uid"] = NonTensorStack(*[s["uid"] for s in samples])
    tq.kv_batch_put(keys=keys, partition_id=partition, fields=fields, tags=tags)
    return KVBatchMeta(keys=keys, tags=tags, partition_id=partition, extra_info={"temperature": 1.0})


def step(trainer, batch):
    metrics = {}
    batch = trainer._compute_old_log_prob(batch, metrics)
    batch = trainer._compute_ref_log_prob(batch, metrics)
    batch = trainer._compute_advantage(batch, metrics)
    batch = trainer._update_actor(batch, metrics)
    return batch, metrics


def test_trainer_passes_store_tike_data_and_lower_the_kl(trainer):
    trainer, actor_path, ref_path = trainer
    samples = H.make_samples(seed=7)  # rm_scores all 0: every GRPO group ties, A = 0
    batch = put_rollouts(samples)
    kl = []
    for i in range(4):
        batch, metrics = step(trainer, batch)
        kl.append(metrics["actor/kl_loss"])
        if i == 0:
            stored = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                     select_fields=["old_log_probs", "advantages",
                                                    *tike_verl.STORED_KEYS])
            for b, s in enumerate(samples):
                R = len(s["responses"])
                assert stored["tike_support"][b].shape == (R, K)
                assert stored["tike_ref_idx"][b].shape == stored["tike_ref_logprobs"][b].shape \
                    == (R, K + 1)
                assert stored["tike_ref_tail_logmass"][b].shape == (R,)
                assert stored["tike_support"][b].dtype == stored["tike_ref_idx"][b].dtype \
                    == torch.int32
                assert (stored["advantages"][b] == 0).all()
            # the first update's KL: tike_cuda's op on the step's stored data and the policy
            # as loaded (its logits from a plain Hugging Face forward)
            expected = expected_kl(samples, stored, H.hf_logits(actor_path, samples), "bucket")
            assert kl[0] == pytest.approx(expected, rel=2e-5)
    assert kl[0] > 1e-2
    assert all(b < a for a, b in zip(kl, kl[1:])), kl
    assert kl[-1] < 0.7 * kl[0], kl
