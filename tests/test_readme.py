"""The README's GRPO snippet runs as written (on small random inputs)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_grpo_snippet_runs():
    text = README.read_text()
    section = text[text.index("### In a GRPO loss"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    B, T, V = 8, 5, 300
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T + 1, V, generator=g).requires_grad_()
    env = {
        "logits": logits,
        "ref_logits": torch.randn(B, T + 1, V, generator=g),
        "responses": torch.randint(0, V, (B, T), generator=g),
        "old_logprobs": torch.randn(B, T, generator=g) - 5,
        "response_mask": torch.rand(B, T, generator=g) > 0.2,
        "rewards": torch.randint(0, 2, (B,), generator=g).float(),
    }
    exec(compile(code, str(README), "exec"), env)
    assert torch.isfinite(env["loss"]) and logits.grad is not None
    assert torch.isfinite(logits.grad).all()
