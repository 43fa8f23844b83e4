"""What the verl tests share: a tiny Qwen2 on disk, verl's own config composed for the CPU,
synthetic rollouts in verl's v1 layout, and the plain Hugging Face computations the stored
data and the loss are checked against.

verl (the [verl] extra) must be importable; tests/_verl_cpu.py must be imported first (it
registers the CPU platform verl then picks), which :func:`use_cpu_platform` arranges.
"""
import os
import socket
from pathlib import Path

import torch

TESTS_DIR = str(Path(__file__).resolve().parent)
VOCAB = 64  # small enough to read, larger than k + 1 for every k the tests use


def use_cpu_platform() -> None:
    """Set the environment of this process (and so of the Ray workers it starts) for verl
    on the CPU platform of tests/_verl_cpu.py; before verl is first imported."""
    path = os.environ.get("PYTHONPATH", "")
    os.environ.update({
        "VERL_PLATFORM": "cputest",
        "VERL_ENGINE_DEVICE": "cuda",  # the key verl's FSDP engine is registered under
        "VERL_USE_EXTERNAL_MODULES": "_verl_cpu",  # imported by `import verl`, everywhere
        "PYTHONPATH": TESTS_DIR + (os.pathsep + path if path else ""),
        "TOKENIZERS_PARALLELISM": "false",
    })
    import _verl_cpu  # noqa: F401


def single_rank_env() -> None:
    """torch.distributed for one in-process rank (what Ray sets for a worker)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def make_tiny_qwen2(path, *, seed: int, like=None, noise: float = 0.0):
    """A 2-layer Qwen2 with a word-level tokenizer, saved as a Hugging Face checkpoint.
    ``like``: start from that checkpoint's weights, plus Gaussian ``noise`` (a reference
    that differs from the policy)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            bos_token="<bos>").save_pretrained(path)
    torch.manual_seed(seed)
    if like is None:
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128, tie_word_embeddings=False,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2)
        model = Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # logits of a few units, so top-k and tails are not flat
            model.lm_head.weight.mul_(8.0)
    else:
        model = Qwen2ForCausalLM.from_pretrained(like, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def compose(model_path, *overrides):
    """verl's ppo_trainer.yaml, set for one CPU rank, float32, the tiny model, TIKE."""
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    base = [
        f"actor_rollout_ref.model.path={model_path}",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=true",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.ref.strategy=fsdp2",
        "actor_rollout_ref.actor.use_kl_loss=true",
        "actor_rollout_ref.actor.kl_loss_type=tike:4",
        "actor_rollout_ref.actor.kl_loss_coef=0.5",
        "actor_rollout_ref.actor.use_torch_compile=false",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=false",
        "actor_rollout_ref.ref.fsdp_config.use_torch_compile=false",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        "+actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype=fp32",
        "actor_rollout_ref.actor.ppo_mini_batch_size=6",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=3",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=3",
        "actor_rollout_ref.rollout.n=1",
        "actor_rollout_ref.actor.optim.lr=0.0",
        "trainer.device=cpu",
    ]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=base + list(overrides))


# (prompt length, response length) of the synthetic rollouts: ragged, as verl packs them
LENGTHS = [(3, 5), (4, 2), (2, 7), (5, 4), (3, 6), (6, 3)]


def make_samples(seed: int, lengths=LENGTHS, *, masked_token: bool = True):
    """Rollouts as verl's v1 agent loop stores them (one dict per sample, unpadded)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, (P, R) in enumerate(lengths):
        prompts = torch.randint(3, VOCAB, (P,), generator=g)
        responses = torch.randint(3, VOCAB, (R,), generator=g)
        input_ids = torch.cat([prompts, responses])
        response_mask = torch.ones(R, dtype=torch.int64)
        if masked_token and R > 2:
            response_mask[1] = 0  # e.g. a tool's output inside a response: not trained on
        samples.append(dict(prompts=prompts, responses=responses, input_ids=input_ids,
                            position_ids=torch.arange(P + R), response_mask=response_mask,
                            loss_mask=response_mask.clone(), rm_scores=torch.zeros(R),
                            uid=f"prompt{i // 2}"))
    return samples


def to_tensordict(samples):
    from verl.utils import tensordict_utils as tu
    return tu.list_of_dict_to_tensordict([{k: v for k, v in s.items() if k != "uid"}
                                          for s in samples])


def hf_logits(model_path, samples) -> list:
    """Plain Hugging Face forward, float64 logits per sample: row t predicts token t + 1."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return [model(s["input_ids"][None]).logits[0].double() for s in samples]


def response_rows(logits, sample):
    """The rows that predict the response tokens, and those tokens."""
    P, R = len(sample["prompts"]), len(sample["responses"])
    return logits[P - 1:P + R - 1], sample["responses"]
