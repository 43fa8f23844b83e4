"""The README's GRPO snippet runs as written (on small random inputs), with the masks and
padding trainers use: a bool mask, and verl's int64 0/1 mask with -100 padding ids."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _run_snippet(mask_dtype, pad):
    text = README.read_text()
    section = text[text.index("### In a GRPO loss"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    B, T, V = 8, 5, 300
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T + 1, V, generator=g).requires_grad_()
    keep = torch.rand(B, T, generator=g) > 0.2
    responses = torch.randint(0, V, (B, T), generator=g)
    env = {
        "logits": logits,
        "ref_logits": torch.randn(B, T + 1, V, generator=g),
        "responses": responses if pad is None else torch.where(keep, responses, pad),
        "old_logprobs": torch.randn(B, T, generator=g) - 5,
        "response_mask": keep.to(mask_dtype),
        "rewards": torch.randint(0, 2, (B,), generator=g).float(),
    }
    exec(compile(code, str(README), "exec"), env)
    assert torch.isfinite(env["loss"]) and logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    return env["loss"].detach(), logits.grad


@pytest.mark.parametrize("mask_dtype,pad", [(torch.bool, None), (torch.int64, -100),
                                            (torch.float32, -100)])
def test_grpo_snippet_runs(mask_dtype, pad):
    loss, grad = _run_snippet(mask_dtype, pad)
    want_loss, want_grad = _run_snippet(torch.bool, None)  # padding changes nothing
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)
