"""A test-only CPU platform for verl, so that its real workers run without a GPU.

verl 0.9 picks its device through ``verl.plugin.platform`` (``VERL_PLATFORM``) and its
engine class through ``EngineRegistry`` (``VERL_ENGINE_DEVICE``); there is no CPU platform.
This module registers one, ``cputest``: device "cpu", collectives over gloo, Ray resource
"CPU". verl imports it in every process, Ray workers included, through
``VERL_USE_EXTERNAL_MODULES=_verl_cpu`` with tests/ on PYTHONPATH
(``_verl_helpers.use_cpu_platform`` sets the environment).

Two of verl's requests only a CUDA machine can grant are bent here, for the tests only:
pinned memory for the reference's CPU offload, and a process-group backend string that
names the CPU twice ("cpu:gloo,cpu:gloo").
"""
import contextlib
import functools
import types

import torch
import torch.distributed
import torch.distributed.fsdp as _fsdp
from verl.plugin.platform import PlatformBase, PlatformRegistry

NAME = "cputest"


def _nothing(*args, **kwargs):
    return None


def _zero(*args, **kwargs):
    return 0


# What verl calls on torch.cuda-like modules (get_torch_device()).
_device_module = types.SimpleNamespace(
    is_available=lambda: True, current_device=lambda: "cpu", device_count=lambda: 1,
    set_device=_nothing, synchronize=_nothing, empty_cache=_nothing,
    manual_seed=torch.manual_seed, manual_seed_all=torch.manual_seed,
    max_memory_allocated=_zero, max_memory_reserved=_zero, memory_allocated=_zero,
    memory_reserved=_zero, reset_peak_memory_stats=_nothing, mem_get_info=lambda *a: (0, 0),
    get_rng_state=torch.get_rng_state, set_rng_state=torch.set_rng_state,
    is_initialized=lambda: True, get_device_name=lambda *a: "CPU")


@PlatformRegistry.register(platform=NAME)
class PlatformCPUTest(PlatformBase):
    device_name = "cpu"
    vendor_name = NAME
    device_module = _device_module

    def is_available(self):
        return True

    def is_platform_available(self, use_smi_check=False):
        return False  # never auto-detected: only VERL_PLATFORM picks it

    def current_device(self):
        return "cpu"  # what verl passes to .to(): no device index on the CPU

    def device_count(self):
        return 1

    def set_device(self, device_index):
        pass

    def synchronize(self, device_index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings):
        pass

    def empty_cache(self):
        pass

    def get_device_capability(self, device_index=0):
        return None, None

    def communication_backend_name(self):
        return "gloo"

    def visible_devices_envvar(self):
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg):
        yield

    def profiler_start(self):
        pass

    def profiler_stop(self):
        pass

    def ray_resource_name(self):
        return "CPU"

    def ray_noset_envvars(self):
        return []

    def is_ipc_supported(self):
        return False

    def cudart(self):
        return None


_init_process_group = torch.distributed.init_process_group


@functools.wraps(_init_process_group)
def _init_gloo_process_group(*args, backend=None, **kwargs):
    # verl asks for "cpu:gloo,<device>:<backend>": with the CPU as the device, "gloo".
    if backend == "cpu:gloo,cpu:gloo":
        backend = "gloo"
    return _init_process_group(*args, backend=backend, **kwargs)


torch.distributed.init_process_group = _init_gloo_process_group


class _UnpinnedCPUOffloadPolicy(_fsdp.CPUOffloadPolicy):
    """The reference engine offloads with CPUOffloadPolicy(pin_memory=True); pinning
    needs a CUDA driver. Bound before verl.utils.fsdp_utils imports the name."""

    def __init__(self, pin_memory: bool = True):
        super().__init__(pin_memory=False)


_fsdp.CPUOffloadPolicy = _UnpinnedCPUOffloadPolicy
