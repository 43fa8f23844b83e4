"""tike_cuda's verl plugin: registered where verl looks for plugins and loaded by ``import
verl``, the configuration names it serves, and the configurations it refuses at start —
in the workers (tests/test_verl_workers.py) and, here, in the trainer's driver."""
import subprocess
import sys
from importlib import metadata

import pytest

import _verl_helpers as H

H.use_cpu_platform()

import verl  # noqa: E402,F401  (loads the plugin through the verl.plugins entry point)

from tike_cuda.integrations import verl as tike_verl  # noqa: E402
from tike_cuda.integrations.verl import KlChoice, parse_kl_loss_type  # noqa: E402

pytestmark = pytest.mark.timeout(120, method="thread")


def test_entry_point_is_loaded_by_import_verl():
    assert [ep.value for ep in metadata.entry_points(group="verl.plugins")
            if ep.name == "tike_cuda"] == ["tike_cuda.integrations.verl"]
    # a fresh interpreter that imports verl only (verl's default plugin policy, "auto")
    probe = "import sys, verl; print('tike_cuda.integrations.verl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip().splitlines()[-1:] == ["True"], out.stderr[-2000:]


def test_hooks_land_when_verl_imports_its_workers():
    from verl.workers import engine_workers
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    assert engine_workers.ppo_loss is tike_verl.ppo_loss
    assert FSDPEngineWithLMHead.prepare_model_outputs._tike_hook
    assert tike_verl.installed()


@pytest.mark.parametrize("value, choice", [
    ("tike", KlChoice("tike", 16)), ("tike_bucket", KlChoice("tike_bucket", 16)),
    ("tike:32", KlChoice("tike", 32)), ("tike_bucket:1", KlChoice("tike_bucket", 1)),
    ("k3", KlChoice(verl_kind="k3")), ("low_var_kl+", KlChoice(verl_kind="low_var_kl+")),
    ("kl", KlChoice(verl_kind="kl")), ("mse", KlChoice(verl_kind="mse")),
    ("k4", KlChoice(verl_kind="k4")),  # not verl's either: verl's kl_penalty judges it
])
def test_kl_loss_type_names(value, choice):
    assert parse_kl_loss_type(value) == choice
    assert choice.tail == ("bucket" if value.startswith("tike_bucket") else "none")


@pytest.mark.parametrize("value", ["tike:0", "tike:", "tikes", "tike_bucket:x", "tike:16:2"])
def test_unknown_tike_name_names_the_setting(value):
    with pytest.raises(ValueError, match="actor.kl_loss_type"):
        parse_kl_loss_type(value)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return H.make_tiny_qwen2(tmp_path_factory.mktemp("verl_plugin_model") / "m", seed=0)


@pytest.mark.parametrize("override, reason", [
    ("actor_rollout_ref.actor.strategy=megatron", "Megatron"),
    ("actor_rollout_ref.ref.strategy=megatron", "Megatron"),
    ("actor_rollout_ref.actor.ulysses_sequence_parallel_size=2", "sequence parallelism"),
    ("actor_rollout_ref.model.use_fused_kernels=true", "fused kernels"),
    ("actor_rollout_ref.actor.pad_to_length=true", "static pad"),
    ("actor_rollout_ref.actor.use_kl_loss=false", "use_kl_loss"),
    ("distillation.enabled=true", "distillation"),
])
def test_refused_configurations(model, override, reason):
    config = H.compose(model, override)
    with pytest.raises(ValueError, match=reason):
        tike_verl.check_config(config.actor_rollout_ref, distillation=config.distillation)
    # the same configuration without TIKE is verl's business
    config = H.compose(model, override, "actor_rollout_ref.actor.kl_loss_type=low_var_kl")
    assert tike_verl.check_config(config.actor_rollout_ref, distillation=config.distillation) is None


def test_driver_refuses_bypass_mode_and_replaced_passes(model):
    from verl.trainer.ppo.v1 import get_trainer_cls
    sync = get_trainer_cls("sync")
    sync(H.compose(model))  # the configuration the other tests train with: accepted
    with pytest.raises(ValueError, match="bypass_mode"):
        sync(H.compose(model, "algorithm.rollout_correction.bypass_mode=true"))

    class OwnOldPass(sync):  # e.g. the separate_async trainer
        def _compute_old_log_prob(self, batch, metrics):
            return batch

    with pytest.raises(ValueError, match="overrides _compute_old_log_prob"):
        OwnOldPass(H.compose(model))
    OwnOldPass(H.compose(model, "actor_rollout_ref.actor.kl_loss_type=k3"))  # not TIKE: verl's


def test_driver_refuses_the_legacy_trainer(model):
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    with pytest.raises(ValueError, match="v1 trainer"):  # before it needs anything else
        RayPPOTrainer(config=H.compose(model, "trainer.use_v1=false"), tokenizer=None,
                      role_worker_mapping={}, resource_pool_manager=None)


def test_readme_config_lines_switch_verl_to_tike(model):
    import re
    from pathlib import Path
    readme = (Path(H.TESTS_DIR).parent / "README.md").read_text()
    block = re.search(r"### With verl.*?```bash\n(.*?)```", readme, re.S).group(1)
    overrides = re.findall(r"(actor_rollout_ref\.\S+=\S+)", block)
    assert len(overrides) == 3
    config = H.compose(model, *overrides)  # valid overrides of verl's own config
    assert tike_verl.check_config(config.actor_rollout_ref) == KlChoice("tike", 16)
    assert config.actor_rollout_ref.actor.kl_loss_coef == 0.001


def test_a_hook_that_cannot_land_refuses_tike_not_verl(model, monkeypatch):
    """verl's internals moved (a renamed class, here a module without it): the import still
    succeeds, verl still runs, and TIKE is refused at start with the reason."""
    import types
    monkeypatch.setattr(tike_verl, "_failed", {})
    hook = tike_verl._patcher("verl.workers.engine.fsdp.transformer_impl", tike_verl._patch_fsdp_engine)
    hook(types.ModuleType("transformer_impl_without_the_engine"))  # no FSDPEngineWithLMHead
    assert not tike_verl.installed()
    with pytest.raises(ValueError, match="could not hook verl.workers.engine.fsdp.transformer_impl"):
        tike_verl.check_config(H.compose(model).actor_rollout_ref)
    config = H.compose(model, "actor_rollout_ref.actor.kl_loss_type=low_var_kl")
    assert tike_verl.check_config(config.actor_rollout_ref) is None
