r"""Vocabulary-parallel TIKE: the ops of tike_cuda on logits split along the vocabulary
over the ranks of a tensor-parallel process group (Megatron-style LM heads).

    from tike_cuda.distributed import vocab_parallel_topk_kl
    # logits, ref_logits: [B, T, V_i], this rank's slice of the vocabulary (rank order)
    kl = vocab_parallel_topk_kl(logits, ref_logits, k=16, group=tp_group,
                                sampled_tokens=responses, old_logprobs=old_logprobs,
                                mask=response_mask)          # [B, T], the same on every rank
    loss = ...(kl)...                                        # computed alike on every rank
    loss.backward()                                          # logits.grad: this rank's shard

Every rank gets the single-process result on the concatenated vocabulary; the forward
exchanges O(N·k) bytes in one all-gather (never N×V), the backward nothing. Any
torch.distributed backend (gloo on the CPU, NCCL on GPUs). See docs/distributed.md.
"""
from ._group import CommBytes, ShardLayout, count_bytes
from .full_kl import vocab_parallel_full_kl
from .token_logprobs import vocab_parallel_token_logprobs
from .topk_kl import payload_bytes, vocab_parallel_topk_kl

__all__ = ["vocab_parallel_topk_kl", "vocab_parallel_token_logprobs", "vocab_parallel_full_kl",
           "payload_bytes", "count_bytes", "CommBytes", "ShardLayout"]
